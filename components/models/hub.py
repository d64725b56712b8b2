"""Where a Hugging Face model reference points, and its tokenizer, without importing torch.

A reference (`teacher.model`) is a local folder, a hub id, or `pkg:MODULE/sub/path` (a folder
inside an installed package). The tokenizer stage reads the teacher's tokenizer through here to
count its tokens, so it never pays for importing torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from components.data.locations import resolve_location
from components.stage import StageError


def model_path(ref: str) -> str:
    """The local folder or hub id `ref` names; a local path must be a model folder."""
    path = resolve_location(ref)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise StageError(f"teacher.model={ref!r}: {local} has no config.json; point it at a "
                         "Hugging Face model folder")
    if not local.exists() and (path.startswith((".", "/")) or path.count("/") > 1):
        raise StageError(f"teacher.model={ref!r}: folder {path} does not exist; point "
                         "teacher.model at a Hugging Face model folder, a hub id or "
                         "pkg:MODULE/sub/path")
    return path


@contextlib.contextmanager
def loading(what: str, fix: str) -> Iterator[None]:
    """Turn a loader's own exception (OSError, safetensors' errors, ...) into a StageError
    naming `what` and the fix."""
    try:
        yield
    except StageError:
        raise
    except Exception as err:  # transformers/safetensors raise many types for a bad folder
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StageError(f"{what} cannot be loaded ({first}); {fix}") from None


def load_tokenizer(ref: str):
    """The Hugging Face tokenizer of the model `ref` names."""
    from transformers import AutoTokenizer

    path = model_path(ref)
    with loading(f"teacher.model={ref!r}: the tokenizer in {path}",
                 "point teacher.model at a model folder with tokenizer files (or a hub id "
                 "reachable from here)"):
        return AutoTokenizer.from_pretrained(path)


def load_backend_tokenizer(ref: str):
    """The model's fast tokenizer as a raw `tokenizers.Tokenizer`. A local folder's
    `tokenizer.json` is read directly (the same object transformers builds from it, without
    importing torch); anything else goes through transformers."""
    from tokenizers import Tokenizer

    path = model_path(ref)
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        with loading(f"teacher.model={ref!r}: {file}",
                     "point teacher.model at an intact Hugging Face model folder"):
            return Tokenizer.from_file(str(file))
    return load_tokenizer(ref).backend_tokenizer
