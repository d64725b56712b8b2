"""Secrets never reach the repo, params.json or W&B; weights and user files are only read
through loaders that cannot execute code."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

from components.config import validate
from components.config.redaction import redact
from components.data.files import atomic_dir
from components.reporting import tracking
from tests.conftest import ROOT, tiny_raw_params

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret assignment": re.compile(
        r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}\b", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA |PGP )?PRIVATE KEY"),
    "W&B API key": re.compile(r"WANDB_API_KEY\s*[=:]\s*['\"]?[0-9a-f]{40}\b"),
    "wandb login key": re.compile(r"\bwandb login\s+[0-9a-f]{40}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z]{34}\b"),
}


def test_no_likely_secret_in_tracked_files():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    assert len(files) > 20  # really looked at the repo
    hits = []
    for name in filter(None, files):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        hits += [f"{name}: {what}" for what, pattern in SECRET_PATTERNS.items()
                 if pattern.search(text)]
    assert hits == []


def test_logged_and_saved_params_are_redacted(tmp_path, monkeypatch):
    fake_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    source = "https://alice:hunter2@data.example.com/d.csv?X-Amz-Signature=s3cr3t&part=1"
    raw = tiny_raw_params(tmp_path, Path("unused.csv"), Path("unused"),
                          **{"prepare.source": source})
    params = validate(raw)
    config = tracking.init_kwargs(params, "prepare")["config"]
    logged = json.dumps(config)
    assert "hunter2" not in logged and "s3cr3t" not in logged and fake_key not in logged
    assert config["prepare"]["source"] == (
        "https://alice:***@data.example.com/d.csv?X-Amz-Signature=***&part=1")
    assert config["tokenizer"] == params.to_dict()["tokenizer"]  # `tokenizer` is no secret
    assert redact({"a": [{"api_key": "x", "accessToken": "y", "n": 1}]}) == \
        {"a": [{"api_key": "***", "accessToken": "***", "n": 1}]}

    with atomic_dir(tmp_path / "out", params):
        pass
    written = (tmp_path / "out" / "params.json").read_text()
    assert "hunter2" not in written and "alice:***@" in written


def test_wandb_run_files_hold_no_api_key(tmp_path, monkeypatch):
    import wandb

    fake_key = "fedcba9876543210fedcba9876543210fedcba98"
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    params = validate(tiny_raw_params(tmp_path, Path("unused.csv"), Path("unused")))
    wandb.teardown()  # forget settings cached by earlier runs in this process (e.g. disabled)
    run = tracking.start_run(params, "reliability")
    config = dict(run.config)
    run.log({"x": 1.0})
    wandb.finish()
    assert config["tokenizer"]["type"] == "wordpiece"  # the resolved params were logged
    assert fake_key not in repr(config)
    files = [p for p in Path(params.paths.wandb).rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), files  # the offline run was written
    leaked = [str(p) for p in files if fake_key.encode() in p.read_bytes()]
    assert leaked == []


def _call_name(node: ast.Call) -> str:
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_sources_use_only_safe_loaders():
    """No pickle/eval/exec/unsafe yaml in components/ or flows/; torch.load only with
    weights_only=True; numpy only without allow_pickle; Lightning resumes with
    weights_only=True."""
    problems, calls = [], 0
    sources = sorted([*(ROOT / "components").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])
    assert len(sources) > 10
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        # Names bound to ruamel's YAML() (round-trip/safe loaders build no Python objects).
        ruamel_safe = {
            t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Call) and _call_name(n.value) == "YAML"
            and not (isinstance(_kw(n.value, "typ"), ast.Constant)
                     and _kw(n.value, "typ").value in {"unsafe", "full"})
            for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "dill", "marshal", "shelve"}
                       for n in names):
                    problems.append(f"{where}: imports an unsafe deserialiser")
            if not isinstance(node, ast.Call):
                continue
            calls += 1
            name = _call_name(node)
            literal_import = name == "__import__" and all(
                isinstance(a, ast.Constant) for a in node.args)
            builtin = isinstance(node.func, ast.Name)  # not `module.eval()` (eval mode)
            if builtin and name in {"eval", "exec", "compile", "__import__"} \
                    and not literal_import:
                problems.append(f"{where}: {name}()")
            if name in {"yaml.unsafe_load", "yaml.full_load"} or (
                    name == "yaml.load" and "yaml" not in ruamel_safe):
                loader = _kw(node, "Loader")
                if not (isinstance(loader, ast.Attribute) and "Safe" in loader.attr):
                    problems.append(f"{where}: {name} without SafeLoader")
            if name.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
            if name in {"np.load", "numpy.load"} and _is_true(_kw(node, "allow_pickle")):
                problems.append(f"{where}: np.load(allow_pickle=True)")
            if _kw(node, "ckpt_path") is not None and not _is_true(_kw(node, "weights_only")):
                problems.append(f"{where}: resumes a checkpoint without weights_only=True")
    assert calls > 100
    assert problems == []
