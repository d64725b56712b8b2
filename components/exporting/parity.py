"""Whether an exported graph computes what PyTorch computes: real validation batches of varying
size and length (`parity_batches`), the tolerance check that fails with `ParityError`
(`check_parity`), and a quantised graph's agreement with FP32 on held-out texts (`agreement`,
`heldout_batches`)."""

from __future__ import annotations

import numpy as np
import torch

from components.config import Params
from components.data.artifacts import load_split, split_head
from components.models.runtimes import TextEncoder
from components.stage import StageError
from components.text.encoding import OUTPUTS
from components.text.tensors import batches


class ParityError(StageError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance in params."""


def parity_batches(params: Params,
                   encoder: TextEncoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real validation batches of shrinking size, so batch and sequence axes both vary
    (never shorter than the encoder's `min_length`, the shortest input a token-merging
    student takes)."""
    cfg = params.export
    texts = load_split(params.paths, "validation")["text"].tolist()
    ids = encoder.ids(texts[: 2 * cfg.parity_batch_size + cfg.parity_batches])
    out, start = [], 0
    for i in range(cfg.parity_batches):
        size = max(1, cfg.parity_batch_size >> i)
        chunk = ids[start : start + size] or ids[:size]
        # Clip some batches to a shorter length so the sequence axis changes too.
        limit = max(4, encoder.max_length >> i)
        chunk = [x[:limit] for x in chunk]
        out.extend(batches(chunk, size, encoder.pad, encoder.min_length))
        start += size
    return out


def check_parity(model: torch.nn.Module, sess, data, atol: float, rtol: float) -> dict:
    worst = 0.0
    for i, (input_ids, mask) in enumerate(data):
        with torch.no_grad():
            expected = model(input_ids, mask).numpy()
        got = sess.run(list(OUTPUTS), {"input_ids": input_ids.numpy(),
                                       "attention_mask": mask.numpy()})[0]
        err = np.abs(got - expected)
        worst = max(worst, float(err.max()))
        if not np.all(err <= atol + rtol * np.abs(expected)):
            raise ParityError(
                f"ONNX output 'logits' diverges from PyTorch on parity batch {i} "
                f"(shape {tuple(input_ids.shape)}): max abs error {err.max():.3e} exceeds "
                f"atol={atol} + rtol={rtol} * |value|. Check for ops the exporter traced as "
                "constants, or loosen export.atol/export.rtol if the drift is expected."
            )
    return {"max_abs_error": worst, "batches": len(data)}


def agreement(reference, other, data) -> dict:
    """How often a quantised model picks the same class as FP32, and its largest drift, on
    `data` (held-out validation batches: never the calibration texts)."""
    same, total, worst = 0, 0, 0.0
    for input_ids, mask in data:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
        a, b = reference.run(None, feed)[0], other.run(None, feed)[0]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
        worst = max(worst, float(np.abs(a - b).max()))
    return {"argmax_agreement": same / total, "max_abs_error": worst, "examples": total,
            "texts": "validation (held out from calibration)"}


# Validation texts an INT8 graph's agreement with FP32 is measured on (all of a small split).
AGREEMENT_EXAMPLES = 1024


def heldout_batches(params: Params, encoder: TextEncoder) -> list[tuple[torch.Tensor, ...]]:
    """Validation batches of `export.parity_batch_size` (at most AGREEMENT_EXAMPLES texts):
    held out from calibration, which reads train texts."""
    texts = split_head(params.paths, "validation", AGREEMENT_EXAMPLES)
    ids = encoder.ids(texts)
    return list(batches(ids, params.export.parity_batch_size, encoder.pad, encoder.min_length))
