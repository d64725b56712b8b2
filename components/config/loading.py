"""Reading params.yaml: YAML, `key.sub=value` overrides, validation with every problem gathered
into one ParamsError naming its key."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from components.config.paths import PATHS_REFUSED, checked_paths, input_problems
from components.config.schema import Params, ParamsError, Paths

DEFAULT_PARAMS = Path("params.yaml")


def parse_override(item: str) -> tuple[str, Any]:
    """Parse `key.sub=value`; the value is read as YAML so `3`, `true`, `1e-3` get their types."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {item!r} is not of the form key.sub=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides applied (new keys are kept, then rejected
    by validation if unknown, so a typo in an override is reported like a typo in the file)."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo? see params.yaml for the accepted keys)"
        if e["type"] == "missing":
            lines.append(f"  - {key}: required key is missing")
        elif isinstance(e.get("input"), dict | list):  # a section-level check: no dump
            lines.append(f"  - {key}: {msg}")
        else:
            lines.append(f"  - {key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate(raw: dict[str, Any], origin: str = "params", root: Path | None = None) -> Params:
    """Validate raw params; every problem in one ParamsError, each naming its key.

    With `root` (the project folder: `load_params` reading its params.yaml), `raw` may not
    hold `paths` (output locations are fixed in dvc.yaml, see `Paths`) and local inputs are
    read from `root`. Without it (params built in code: tests, notebooks), `paths` may point
    at other folders, checked by `path_problems`, and inputs are read from the working folder.
    Either way no input may sit inside an output folder (`input_problems`).
    """
    lines: list[str] = []
    n = 0
    given_paths = raw.get("paths")
    if root is not None and "paths" in raw:
        raw = {k: v for k, v in raw.items() if k != "paths"}
        lines.append(f"  - paths: {PATHS_REFUSED} (got {given_paths!r})")
        n += 1
    params = None
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        n, lines = n + len(err.errors()), lines + [format_errors(err)]
    outputs = Paths().model_dump()
    problems = []
    if root is None:  # built in code: inputs are checked against the locations that passed
        problems, accepted = checked_paths(given_paths)
        if isinstance(given_paths, dict):
            outputs = {k: v for k, v in {**outputs, **given_paths}.items()
                       if k not in given_paths or k in accepted}
    problems += input_problems(raw, outputs, Path(os.path.abspath(root or Path.cwd())))
    n += len(problems)
    lines += [f"  - {p}" for p in problems]
    if n:
        raise ParamsError(f"{origin} has {n} problem(s):\n" + "\n".join(lines))
    return params


def load_params(
    path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Params:
    """Read, override and validate params.yaml (`validate` with the file's folder as the
    project root: a `paths` section, or a `paths.x` override, is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    return validate(apply_overrides(raw, overrides or {}), origin=str(path),
                    root=path.resolve().parent)
