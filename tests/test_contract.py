"""params.yaml <-> config classes <-> dvc.yaml agree: every stage's params exist, every command
is a real module with run/main, every output path is a `paths:` key."""

import importlib
import re

import yaml

from components.config import Params, load_params
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} not in params.yaml"
        node = node[part]
    return node


def test_params_yaml_matches_config_classes_exactly():
    dumped = load_params(ROOT / "params.yaml").to_dict()
    assert set(dumped) == set(Params.model_fields)

    def keys(tree, prefix=""):
        for k, v in tree.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")

    # Every key in params.yaml is spelled out, so nothing silently falls back to a default.
    assert set(keys(PARAMS)) == set(keys(dumped))


def test_stage_params_exist():
    for stage in DVC["stages"].values():
        for key in stage["params"]:
            _lookup(PARAMS, key)


def test_commands_are_runnable_modules():
    for name, stage in DVC["stages"].items():
        match = re.fullmatch(r"python -m (components(\.\w+)*)", stage["cmd"])
        assert match, f"stage {name}: cmd {stage['cmd']!r} is not `python -m components.X`"
        module = importlib.import_module(match.group(1))
        target = importlib.import_module("components.distill.train") if name == "distill" \
            else module
        assert callable(target.run) and callable(target.main), name
        assert match.group(1).split(".")[1] == name, f"stage {name} runs {match.group(1)}"


def test_outputs_and_metrics_use_paths_keys():
    used = set()
    for stage in DVC["stages"].values():
        for out in stage["outs"]:
            out = out if isinstance(out, str) else next(iter(out))
            m = re.fullmatch(r"\$\{paths\.(\w+)\}", out)
            assert m, f"out {out!r} is not a ${{paths.x}} reference"
            used.add(m.group(1))
    for metric in DVC["metrics"]:
        assert re.match(r"\$\{paths\.\w+\}/", metric), metric
    assert used == set(PARAMS["paths"]) - {"wandb"}


def test_every_stage_section_is_tracked_by_a_stage():
    tracked = {p.split(".")[0] for s in DVC["stages"].values() for p in s["params"]}
    assert tracked >= set(PARAMS) - {"paths", "tracking"}
