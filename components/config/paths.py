"""Output-location safety: the project's protected entries, which stage writes each location, and
the checks that no output location built in code (`checked_paths`) and no local input
(`input_problems`) could make a stage delete something it did not make."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from components.config.schema import Paths

# Top-level entries of this project's code folder that an output location built in code (tests,
# notebooks) must never be or sit in: every stage replaces its whole output folder
# (components/data/files.py atomic_dir).
PROTECTED_ENTRIES = ("components", "flows", "tests", "infra", "benchmarks", ".git", ".dvc",
                     "params.yaml", "dvc.yaml", "dvc.lock", "pyproject.toml")
# The folder holding this code (components/ and its siblings).
CODE_ROOT = Path(__file__).resolve().parents[2]


# The stage that writes each location, replacing it whole (DVC deletes the DVC outputs among
# them before that stage runs). `wandb` is only ever added to.
WRITTEN_BY = {"source_version": "source", "data": "prepare", "tokenizer": "tokenizer",
              "teacher": "teacher", "teacher_outputs": "teacher_cache", "student": "distill",
              "export": "export", "evaluate": "evaluate", "results": "evaluate",
              "bundle": "ship"}
# Written whole by their stage, but not DVC outputs: results/ holds timings (git-tracked, out of
# dvc.lock), the bundle its run's commit (rebuilt on every repro).
NOT_DVC_OUTPUTS = ("results", "bundle")
# A symlinked artifacts/ does not work: DVC refuses an output whose real path is outside the
# git repository. DVC's cache on the other disk with symlinked files does (checked with DVC
# 3.67).
PATHS_REFUSED = ("output locations are fixed in dvc.yaml (data/source.json, data/prepared, "
                 "artifacts/<stage>, results), so that no params value decides what DVC deletes "
                 "before a stage runs; remove this section (to keep outputs on a bigger disk, "
                 "put DVC's cache there: dvc cache dir PATH; dvc config cache.type symlink)")


def path_problems(paths: Any, base: Path | None = None) -> list[str]:
    """`checked_paths`' problems."""
    return checked_paths(paths, base)[0]


def checked_paths(paths: Any, base: Path | None = None) -> tuple[list[str], dict[str, Path]]:
    """Every output location given in code (`validate(raw)` with a `paths` mapping: tests,
    notebooks) that a stage could not safely replace, as `paths.x: why (got ...)`.

    Each stage swaps its whole output folder for a new one, so an entry must not be empty, be
    or hold the working folder `base` (default: the current one, which relative entries are
    read from) or this project's code folder (`CODE_ROOT`), sit inside one of the code
    folder's source or control entries (PROTECTED_ENTRIES), or be equal to, inside or around
    another entry (one stage would delete another's output). params.yaml cannot set these at
    all (`load_params`), so they are checked only here. Returns the problems and the entries
    without one, resolved.
    """
    if not isinstance(paths, dict):
        return [], {}  # a mistyped section is reported by pydantic
    problems, resolved = [], {}
    # Lexical, like the stage's own rename of that path: `..` is folded, symlinks are kept (the
    # rename replaces a link, not its target).
    base = Path(os.path.abspath(base or Path.cwd()))
    for key in Paths.model_fields:
        value = paths.get(key)
        if not isinstance(value, str):
            continue
        name, got = f"paths.{key}", f"(got {value!r})"
        if not value.strip():
            problems.append(f"{name}: is empty: the stage would replace the working folder "
                            f"with its output; name a folder {got}")
            continue
        where = Path(os.path.normpath(base / value))
        for around, what in ((base, "the working folder"), (CODE_ROOT, "this project's code")):
            if around.is_relative_to(where):
                problems.append(f"{name}: is or holds {what} ({around}); the stage replaces "
                                f"its output folder and would delete it {got}")
                break
        else:
            if where.is_relative_to(CODE_ROOT):
                top = where.relative_to(CODE_ROOT).parts[0]
                if top in PROTECTED_ENTRIES:
                    problems.append(f"{name}: is inside {CODE_ROOT / top}, one of the "
                                    f"project's source or control entries; the stage "
                                    f"replaces its output folder and would delete it {got}")
                    continue
            resolved[key] = where
    keys = list(resolved)
    for i, key in enumerate(keys):
        same = [k for k in keys[:i] if resolved[k] == resolved[key]]
        inner = [k for k in keys if resolved[k] != resolved[key]
                 and resolved[k].is_relative_to(resolved[key])]
        if same:
            problems.append(f"paths.{key}: is the same folder as "
                            + ", ".join(f"paths.{k}" for k in same)
                            + f"; one stage would replace the other's output "
                            f"(got {paths[key]!r})")
        if inner:
            problems.append(f"paths.{key}: contains "
                            + ", ".join(f"paths.{k} ({paths[k]!r})" for k in inner)
                            + f"; the stage writing paths.{key} replaces the whole folder and "
                            f"would delete them (got {paths[key]!r})")
    return problems, resolved


def _local_input(value: Any) -> str | None:
    """The local path an input location names (`file://` stripped), or None for a URI, a
    `pkg:` or `hf:` location, or a value of the wrong type (pydantic reports that)."""
    if not isinstance(value, str) or not value.strip():
        return None
    if value.startswith("file://"):
        return value.removeprefix("file://")
    if value.startswith(("pkg:", "hf:")) or "://" in value:
        return None
    return value


def input_problems(raw: dict[str, Any], paths: dict[str, str], base: Path) -> list[str]:
    """A local `prepare.source` or `teacher.model` inside a stage's output folder, as
    `key: why (got ...)`. DVC deletes a stage's outputs before it runs the stage, and the
    stage then replaces its folder whole: such an input would be gone before its reader runs.
    Relative locations are read from `base` (the project folder); compared both as written
    (`..` folded) and with symlinks resolved, so a link into an output folder is caught too.
    """
    def forms(path: Path) -> set[Path]:
        return {Path(os.path.normpath(path)), Path(os.path.realpath(path))}

    outputs = [(key, value, forms(base / value)) for key, value in paths.items()
               if key in WRITTEN_BY and isinstance(value, str) and value.strip()]
    problems = []
    for section, field in (("prepare", "source"), ("teacher", "model")):
        value = (raw.get(section) or {}).get(field) if isinstance(raw.get(section), dict) \
            else None
        local = _local_input(value)
        if local is None:
            continue
        where = forms(base / local)
        for key, out, out_forms in outputs:
            if any(w.is_relative_to(o) for w in where for o in out_forms):
                stage = WRITTEN_BY[key]
                how = (f"which {stage} replaces whole on every run" if key in NOT_DVC_OUTPUTS
                       else f"which DVC deletes before {stage} runs")
                problems.append(
                    f"{section}.{field}: is inside {out}, the output of stage {stage}, {how}: "
                    f"it would be gone before it is read; move it outside the stage outputs "
                    f"(e.g. to data-raw/ or models/) (got {value!r})")
                break
    return problems
