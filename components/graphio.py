"""How text reaches an exported graph, without torch: the graph's input and output names, the
tokenizer configuration (truncation at `max_length`, no padding), right padding to the batch's
longest sequence and the ONNX Runtime session options with pinned threads.

Training and evaluation (`textdata`, `runtimes`, which add torch on top) and the shipped bundle
(`bundle`, which must not need torch) use these same functions, so a bundle feeds its graph
exactly what evaluate measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits",)


def configured(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """A copy of `tokenizer` that truncates at `max_length` and does not pad (batches are padded
    by `pad_arrays`). Copying re-parses the whole vocabulary (tens of ms), so callers that encode
    repeatedly configure once and keep the copy (see `components.runtimes.TextEncoder`)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())  # never mutate the caller's tokenizer settings
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>", "<PAD>"):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return idx
    return 0


def pad_arrays(ids: Sequence[Sequence[int]], pad: int,
               min_length: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence in the batch (at least `min_length`, which a
    token-merging student needs); returns int64 ids and attention mask."""
    length = max(min_length, max(len(x) for x in ids))
    input_ids = np.full((len(ids), length), pad, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return input_ids, mask


def session_options(threads: int = 0):
    """ONNX Runtime options; with `threads`, intra-op pinned to it and inter-op to 1 (sequential
    execution), so runs are comparable to PyTorch pinned the same way."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initialisers are not the user's problem
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts
