"""Model runners shared by export, evaluate and the benchmarks: one way to build an ONNX Runtime
session, pin threads, name the graph's inputs and outputs, and turn text into padded batches.

Every runner has the same signature, `run(input_ids, attention_mask) -> logits` (int64 torch
tensors in, float numpy logits out), so a timing loop treats PyTorch, ONNX Runtime and TensorRT
alike. `TextEncoder` is the shared `encoding.Encoder` (a tokenizer configured once, the pre-cut)
with torch batches: nothing is rebuilt per call, so a timed call measures tokenisation and
nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from components.stage import StageError
from components.text.encoding import OUTPUTS, Encoder, session_options
from components.text.tensors import pad_batch

Runner = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def pin_torch_threads(threads: int) -> None:
    """Intra-op threads as asked, one inter-op thread (the same pinning as ORT sessions).

    Torch refuses to change the inter-op pool once it has been used, so a second call in the
    same process keeps the first setting (the intra-op count is still applied)."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or the pool already started
        torch.set_num_interop_threads(1)


def ort_session(path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session; with `threads`, intra-op pinned to it and inter-op to 1
    (sequential execution), so runs are comparable to PyTorch pinned the same way."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the export stage (dvc repro export)")
    try:
        return ort.InferenceSession(str(path), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for bad models
        raise StageError(f"{path} cannot be loaded by ONNX Runtime ({err}); rerun the export "
                         "stage (dvc repro -f export)") from None


def onnx_runner(sess) -> Runner:
    def run(input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return sess.run(list(OUTPUTS), {"input_ids": input_ids.numpy(),
                                        "attention_mask": mask.numpy()})[0]

    return run


def torch_runner(model: torch.nn.Module) -> Runner:
    model.eval()

    def run(input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids, mask).float().numpy()

    return run


class TextEncoder(Encoder):
    """`encoding.Encoder` (one tokenizer configured once, the pre-cut, truncation, padding) with
    batches as int64 torch tensors, what every runner here takes."""

    def batch(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(ids, self.pad, self.min_length)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.ids(texts))
