"""infra/README.md "Scale out", checked without GPUs or a cluster.

- Every command of the section parses with its own tool's parser: torchrun's
  (`torch.distributed.run.get_args_parser`), Prefect's CLI (cyclopts `parse_args`, nothing run),
  DVC's (`dvc.cli.parse_args`) and `still` (its `validate`, which loads params.yaml with the
  overrides); each shell block passes `bash -n`.
- The trainer values the section tells users to put in params.yaml pass components/config/
  and agree with the launchers: torchrun's `--nnodes`/`--nproc-per-node` and
  slurm/stage.sbatch's `--nodes`/`--ntasks-per-node`/`--gpus-per-node` (Lightning refuses to
  start otherwise); the modules launched are this project's stages, as dvc.yaml runs them.
- The Kubernetes run: its parameters bind to the pipeline flow with the nightly deployment's,
  its overrides validate, its job variables fit the work pool template and ask for as many GPUs
  as processes.
- Real DVC against a local S3 API (moto): the remote setup and the worker steps as written, a
  second worker pulling instead of rerunning, and slurm/stage.sbatch itself (with a stand-in
  `srun`) pulling, running, committing and pushing a stage that a fresh clone then pulls.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, sh

INFRA = ROOT / "infra"
README = INFRA / "README.md"
SBATCH = INFRA / "slurm" / "stage.sbatch"
JOB_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
BIN = str(Path(sys.executable).parent)


# ------------------------------------------------------------------------- the README section


def section(title: str = "Scale out", level: int = 2) -> str:
    """The text of a README section, up to the next heading of the same or a higher level."""
    lines, fenced, found = README.read_text().splitlines(keepends=True), False, None
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        heading = not fenced and re.match(r"(#+) ", line)
        if found is None and heading and line == f"{'#' * level} {title}\n":
            found = i + 1
        elif found is not None and heading and len(heading.group(1)) <= level:
            return "".join(lines[found:i])
    assert found is not None, f"infra/README.md has no section {title!r}"
    return "".join(lines[found:])


def blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block as argv lists: continuations joined, comments
    dropped, `$(...)` substitutions taken as commands of their own (and replaced by a word),
    lists split at && || ; |, leading VAR=value assignments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        inner = re.findall(r"\$\(([^()]*)\)", line)
        line = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", line)
        for text in [*inner, line]:
            lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
            lex.whitespace_split, lex.commenters = True, "#"
            argv: list[str] = []
            for token in [*lex, ";"]:
                if token in (";", "&&", "||", "|", "&"):
                    while argv and re.match(r"^\w+=", argv[0]):
                        argv.pop(0)  # an assignment, alone or before a command
                    if argv:
                        out.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return out


def section_commands(program: str, text: str | None = None) -> list[list[str]]:
    text = section() if text is None else text
    return [argv for block in blocks(text) for argv in commands(block) if argv[0] == program]


def documented_trainer() -> dict:
    (block,) = blocks(section("Training on several GPUs and nodes", 3), "yaml")
    return yaml.safe_load(block)["trainer"]


def raw_params(**overrides) -> dict:
    from components.config import apply_overrides

    return apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)


def validated(raw: dict):
    from components.config import validate

    return validate(raw, origin="params.yaml + infra/README.md", root=ROOT)


def stage_of(module: str) -> str:
    """The dvc.yaml stage that runs `python -m <module>`, which must be a module of this
    project (found without importing it)."""
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    stages = [name for name, spec in DVC_YAML["stages"].items()
              if spec["cmd"] == f"python -m {module}"]
    assert len(stages) == 1, f"no dvc.yaml stage runs `python -m {module}`"
    return stages[0]


def test_commands_in_the_helper_are_split_as_bash_would():
    block = ('jid=$(sbatch --parsable x.sbatch teacher)  # comment\n'
             'A=1 dvc commit --force distill && dvc push distill\n'
             "prefect deployment run a/b \\\n  --param 'o={\"k\": 4}'\n")
    assert commands(block) == [
        ["sbatch", "--parsable", "x.sbatch", "teacher"],
        ["dvc", "commit", "--force", "distill"], ["dvc", "push", "distill"],
        ["prefect", "deployment", "run", "a/b", "--param", 'o={"k": 4}']]


def test_every_shell_block_of_the_section_is_valid_bash():
    found = blocks(section())
    assert len(found) >= 6
    for block in found:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, f"{proc.stderr}\n{block}"
    # and every command is one the checks below know how to parse
    programs = {argv[0] for block in found for argv in commands(block)}
    assert programs <= {"dvc", "still", "sbatch", "torchrun", "prefect", "git", "export"}, \
        programs


# ------------------------------------------------------------------------------ training


def test_documented_trainer_values_are_valid_params():
    trainer = documented_trainer()
    params = validated(raw_params(**{f"trainer.{k}": v for k, v in trainer.items()}))
    assert params.trainer.num_nodes > 1 and int(params.trainer.devices) > 1
    assert params.trainer.strategy == "ddp" and params.trainer.accelerator == "gpu"
    # teacher and distill record the launch shape in dvc.lock, teacher_cache does not (the
    # section says so)
    for stage in ("teacher", "distill"):
        assert "trainer" in DVC_YAML["stages"][stage]["params"]
    cache = {p for p in DVC_YAML["stages"]["teacher_cache"]["params"]
             if p.startswith("trainer")}
    assert cache <= {"trainer.num_threads", "trainer.precision"}, cache


def test_one_node_command_is_an_experiment_with_valid_overrides(tmp_path, capsys):
    from components.cli import dvc_command, main

    (argv,) = section_commands("still")
    assert argv[1] == "repro"
    sets = [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]
    assert dvc_command(sets)[:3] == ["dvc", "exp", "run"]
    # `still validate` with the same overrides: what `still repro` checks before running DVC
    assert main(["validate", "--params", str(ROOT / "params.yaml"), *argv[2:]]) == 0, \
        capsys.readouterr().err
    trainer = documented_trainer()
    values = dict(s.split("=", 1) for s in sets)
    assert values["trainer.devices"] == str(trainer["devices"])
    assert values["trainer.strategy"] == trainer["strategy"]
    assert values["trainer.accelerator"] == trainer["accelerator"]


def test_torchrun_command_parses_and_matches_the_trainer_values():
    from torch.distributed.run import get_args_parser

    (argv,) = section_commands("torchrun")
    args = get_args_parser().parse_args(argv[1:])
    trainer = documented_trainer()
    # Lightning's TorchElasticEnvironment: devices * num_nodes == WORLD_SIZE
    assert int(args.nnodes) == trainer["num_nodes"]
    assert int(args.nproc_per_node) == trainer["devices"]
    assert args.rdzv_backend == "c10d" and args.rdzv_id != "none"
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host and port.isdigit()
    assert args.module and not args.training_script_args  # stages take no arguments
    stage = stage_of(args.training_script)
    assert "trainer" in DVC_YAML["stages"][stage]["params"]
    # the DVC steps around it (its block) pull, commit and push that same stage
    (block,) = [b for b in blocks(section()) if "torchrun " in b]
    steps = [argv[1:] for argv in commands(block) if argv[0] == "dvc"]
    assert steps == [["pull", "--allow-missing", "--with-deps", stage],
                     ["commit", "--force", stage], ["push", stage]]


def sbatch_directives() -> dict[str, str]:
    found = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            found[key] = value
    return found


def sbatch_stages() -> list[str]:
    match = re.search(r'case "\$stage" in\n\s*([\w |]+)\)', SBATCH.read_text())
    return [s.strip() for s in match.group(1).split("|")]


def test_sbatch_script_agrees_with_the_trainer_values():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    directives = sbatch_directives()
    trainer = documented_trainer()
    # Lightning's SLURMEnvironment refuses any other allocation
    assert int(directives["--nodes"]) == trainer["num_nodes"]
    assert int(directives["--ntasks-per-node"]) == trainer["devices"]
    assert int(directives["--gpus-per-node"]) == trainer["devices"]  # one GPU per task
    assert "--ntasks" not in directives  # Lightning rejects --ntasks without --ntasks-per-node
    # srun runs the stage the way dvc.yaml does, for each stage the script accepts
    srun = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("srun ")]
    assert srun == ['srun --kill-on-bad-exit=1 python -m "components.$stage"']
    for stage in sbatch_stages():
        assert stage_of(f"components.{stage}") == stage


def test_documented_sbatch_chain_runs_the_stages_in_dvc_order():
    from dvc.cli import parse_args

    chain = section_commands("sbatch")
    assert [argv[-2] for argv in chain] == ["infra/slurm/stage.sbatch"] * 3
    stages = [argv[-1] for argv in chain]
    assert stages == sbatch_stages() == ["teacher", "teacher_cache", "distill"]
    order = list(DVC_YAML["stages"])
    assert sorted(stages, key=order.index) == stages
    # each waits for the previous one to succeed (its dvc commit included)
    assert all("--dependency=afterok:$jid" in " ".join(argv) or i == 0
               for i, argv in enumerate(chain))
    for argv in section_commands("dvc"):
        args = parse_args(argv[1:])  # raises on an unknown option
        for target in getattr(args, "targets", None) or []:
            assert target in DVC_YAML["stages"], (argv, target)


def test_sbatch_script_refuses_other_stages(tmp_path):
    for args in ([], ["export"]):
        proc = subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True,
                              cwd=tmp_path, env={"PATH": os.environ["PATH"]})
        assert proc.returncode == 2 and "usage: sbatch infra/slurm/stage.sbatch" in proc.stderr


# ---------------------------------------------------------------------- Kubernetes work pool


def prefect_parse(argv: list[str]):
    from prefect.cli._app import _app, _normalize_top_level_flags

    return _app.parse_args(_normalize_top_level_flags(argv[1:]), exit_on_error=False,
                           print_error=False)


def test_prefect_commands_of_the_infra_notes_parse():
    """Every `prefect ...` command in infra/README.md and infra/k8s/README.md, with Prefect's
    own CLI parser (nothing is run)."""
    text = README.read_text() + (INFRA / "k8s" / "README.md").read_text()
    found = section_commands("prefect", text)
    assert {tuple(argv[1:3]) for argv in found} >= {("work-pool", "create"),
                                                    ("deployment", "run")}
    for argv in found:
        command, bound, _ = prefect_parse(argv)
        if command.__name__ == "create":
            assert bound.arguments["type"] == "kubernetes"
            assert (ROOT / bound.arguments["base_job_template"]).is_file()


def test_kubernetes_run_with_more_gpus_is_a_valid_run_of_the_nightly_deployment():
    import jsonschema
    from prefect.cli._utilities import load_json_key_values
    from prefect.utilities.templating import apply_values

    from flows.deploy import deployments
    from flows.pipeline import pipeline
    from flows.tasks import validate_overrides

    (argv,) = section_commands("prefect", section("Flow runs on a Kubernetes work pool", 3))
    command, bound, _ = prefect_parse(argv)
    assert command.__name__ == "run"
    flow_name, name = bound.arguments["name"].split("/")
    (nightly,) = [d for d in deployments(module_entrypoints=True) if d.name == name]
    assert flow_name == pipeline.name == "still-pipeline"

    params = load_json_key_values(bound.arguments["params"], "parameter")
    merged = {**nightly.parameters, **params}
    inspect.signature(pipeline.fn).bind(**merged)  # every parameter is one the flow takes
    pipeline.validate_parameters(merged)  # and of the type it takes
    resolved = validate_overrides.fn(str(ROOT), params["overrides"])  # what the flow checks first

    job_variables = load_json_key_values(bound.arguments["job_variables"], "job variable")
    template = json.loads(JOB_TEMPLATE.read_text())
    schema = template["variables"]
    assert set(job_variables) <= set(schema["properties"])
    values = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    values.update(job_variables, dvc_remote_endpoint="http://minio.still.svc:9000")
    jsonschema.validate(values, schema)
    job = apply_values(template["job_configuration"], values)
    (container,) = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
    # one process per GPU in the pod, Lightning's own launcher
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == resolved["trainer"]["devices"] == job_variables["gpu_count"] > 1
    assert resolved["trainer"]["strategy"] == "ddp" and resolved["trainer"]["num_nodes"] == 1


# ---------------------------------------------------------------------- DVC, for real


STAGE_CODE = '''"""A stand-in stage: reads params.yaml and its input, writes its output."""
import json, os, pathlib, yaml
params = yaml.safe_load(open("params.yaml"))
name = pathlib.Path(__file__).stem
with open("runs.log", "a") as log:  # untracked: which stages ran in this checkout
    log.write(name + "\\n")
if name == "prepare":
    out = pathlib.Path("data/prepared")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("text,label\\n" * params["seed"])
else:
    out = pathlib.Path("artifacts/student")
    out.mkdir(parents=True, exist_ok=True)
    data = pathlib.Path("data/prepared/train.txt").read_text()
    (out / "model.json").write_text(json.dumps({
        "trainer": params["trainer"], "rows": data.count("\\n"),
        "slurm_procid": os.environ.get("SLURM_PROCID")}, sort_keys=True))
'''

STAGES_YAML = {"stages": {
    "prepare": {"cmd": "python -m components.prepare", "deps": ["components/prepare.py"],
                "params": ["seed"], "outs": ["data/prepared"]},
    "distill": {"cmd": "python -m components.distill",
                "deps": ["components/distill.py", "data/prepared"],
                "params": ["seed", "trainer"], "outs": ["artifacts/student"]},
}}


def dvc(*args: str, cwd: Path) -> str:
    return sh([sys.executable, "-m", "dvc", *args], cwd)


def run_block(block: str, cwd: Path, env: dict[str, str], **replace: str) -> str:
    """A README shell block run by bash as written, except for the placeholder addresses."""
    for old, new in replace.items():
        assert old in block, old
        block = block.replace(old, new)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture
def worker_env(moto_s3, tmp_path) -> dict[str, str]:
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="still-dvc")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "DVC_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
           "DVC_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key)  # the README's export sets them from the DVC_* ones
    return env


@pytest.fixture
def first_worker(tmp_path) -> Path:
    """A git + DVC repo with the project's committed DVC config and two stand-in stages
    named like the project's, committed."""
    import shutil

    repo = tmp_path / "worker-a"
    (repo / "components").mkdir(parents=True)
    (repo / "components" / "__init__.py").write_text("")
    for stage in STAGES_YAML["stages"]:
        (repo / "components" / f"{stage}.py").write_text(STAGE_CODE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(STAGES_YAML, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump(
        {"seed": 3, "trainer": {"accelerator": "auto", "devices": 1, "strategy": "auto",
                                "num_nodes": 1}}, sort_keys=False))
    (repo / ".gitignore").write_text("runs.log\n__pycache__/\n")
    sh(["git", "init", "-q", "-b", "main"], repo)
    dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the committed remote
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "pipeline"], repo)
    return repo


def runs(repo: Path) -> list[str]:
    log = repo / "runs.log"
    return log.read_text().split() if log.exists() else []


def test_workers_share_one_remote_and_a_cluster_job_commits_its_stage(
        first_worker, worker_env, moto_s3, tmp_path):
    remote_block, worker_block = blocks(section("One DVC remote for every worker", 3))
    endpoints = {"s3://team-bucket/still": "s3://still-dvc/still",
                 "https://s3.example.com": moto_s3}

    # Once, in git: the shared bucket as the default remote.
    run_block(remote_block, first_worker, worker_env, **endpoints)
    config = (first_worker / ".dvc" / "config").read_text()
    assert "remote = shared" in config and "s3://still-dvc/still" in config
    assert "still-test" not in config  # no credentials committed

    # Worker A builds everything and pushes it.
    here = {"http://s3.internal:9000": moto_s3}
    run_block(worker_block, first_worker, worker_env, **here)
    assert runs(first_worker) == ["prepare", "distill"]
    sh(["git", "add", "dvc.lock"], first_worker)
    sh(["git", "commit", "-qm", "lock"], first_worker)

    # Worker B, a fresh clone: the same steps pull both stages' outputs and run nothing.
    second = tmp_path / "worker-b"
    sh(["git", "clone", "-q", str(first_worker), str(second)], tmp_path)
    out = run_block(worker_block, second, worker_env, **here)
    assert runs(second) == [], out
    assert (second / "artifacts/student/model.json").read_bytes() == \
        (first_worker / "artifacts/student/model.json").read_bytes()

    # A cluster checkout: the documented trainer values committed, then the sbatch script
    # with an `srun` that runs its command once, as task 0.
    cluster = tmp_path / "cluster"
    sh(["git", "clone", "-q", str(first_worker), str(cluster)], tmp_path)
    dvc("remote", "modify", "--local", "shared", "endpointurl", moto_s3, cwd=cluster)
    params = yaml.safe_load((cluster / "params.yaml").read_text())
    params["trainer"].update(documented_trainer())
    (cluster / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "commit", "-qam", "trainer: 2 nodes x 4 GPUs"], cluster)
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "srun $*" >> "$SRUN_LOG"\n'
                    'while [ "${1#-}" != "$1" ]; do shift; done\n'
                    'SLURM_PROCID=0 exec "$@"\n')
    fake.chmod(0o755)
    env = {**worker_env, "PATH": f"{fake.parent}{os.pathsep}{worker_env['PATH']}",
           "SLURM_SUBMIT_DIR": str(cluster), "SRUN_LOG": str(tmp_path / "srun.log"),
           "AWS_ACCESS_KEY_ID": worker_env["DVC_ACCESS_KEY_ID"],
           "AWS_SECRET_ACCESS_KEY": worker_env["DVC_SECRET_ACCESS_KEY"]}
    proc = subprocess.run(["bash", str(SBATCH), "distill"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "srun.log").read_text() == \
        "srun --kill-on-bad-exit=1 python -m components.distill\n"
    assert runs(cluster) == ["distill"]  # its input was pulled, not rebuilt
    model = json.loads((cluster / "artifacts/student/model.json").read_text())
    assert model["trainer"] == params["trainer"] and model["slurm_procid"] == "0"
    # dvc.lock now holds the stage as `dvc repro` would have recorded it
    lock = yaml.safe_load((cluster / "dvc.lock").read_text())["stages"]["distill"]
    assert lock["params"]["params.yaml"]["trainer"] == params["trainer"]
    assert "Data and pipelines are up to date" in dvc("status", cwd=cluster)
    assert "Data and pipelines are up to date" in dvc("repro", "--dry", cwd=cluster)

    # and the output is in the remote: a fresh clone of the committed lock pulls it.
    sh(["git", "commit", "-qam", "distill on the cluster"], cluster)
    last = tmp_path / "after"
    sh(["git", "clone", "-q", str(cluster), str(last)], tmp_path)
    dvc("remote", "modify", "--local", "shared", "endpointurl", moto_s3, cwd=last)
    subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=last, env=env, check=True,
                   capture_output=True)
    assert (last / "artifacts/student/model.json").read_bytes() == \
        (cluster / "artifacts/student/model.json").read_bytes()
