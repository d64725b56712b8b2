"""export: the student to ONNX (dynamic batch and sequence axes), parity-checked, plus INT8.

Produces in `paths.export`: `model.onnx` (FP32; inputs `input_ids`, `attention_mask` int64
[batch, sequence], output `logits` [batch, num_labels]), `model.int8.onnx` (ONNX Runtime
dynamic quantisation: int8 weights, activations quantised on the fly), `tokenizer.json`,
`metrics.json` (parity errors, INT8 agreement, sizes) and `params.json`.

Parity: PyTorch and ONNX Runtime run the same real validation batches (different batch sizes
and lengths); if any output differs by more than `export.atol + export.rtol * |torch|` the
stage fails with `ParityError`, naming the output, the batch and the max error.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`; it handles the
student's plain ops with named dynamic axes and needs no extra package (the dynamo exporter
needs `onnxscript`).

Run: `python -m components.export` (or `dvc repro export`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from components import tensorrt as trt_engines
from components.common import StageError, atomic_dir, file_size, stage_main, write_json
from components.config import Params
from components.distill import student as student_io
from components.prepare import load_split
from components.textdata import batches, encode, pad_id
from components.tokenizer import TOKENIZER_FILE

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits",)


class ParityError(StageError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance in params."""


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                opset: int) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer notes
        torch.onnx.export(
            model.eval(), example, str(path), input_names=list(INPUTS),
            output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the export stage (dvc repro export)")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for bad models
        raise StageError(f"{path} cannot be loaded by ONNX Runtime ({err}); rerun the export "
                         "stage (dvc repro -f export)") from None


def parity_batches(params: Params, tokenizer,
                   min_length: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real validation batches of shrinking size, so batch and sequence axes both vary
    (never shorter than `min_length`, the shortest input a token-merging student takes)."""
    cfg = params.export
    texts = load_split(params, "validation")["text"].tolist()
    ids = encode(tokenizer, texts, params.distill.max_length)
    out, start = [], 0
    for i in range(cfg.parity_batches):
        size = max(1, cfg.parity_batch_size >> i)
        chunk = ids[start : start + size] or ids[:size]
        # Clip some batches to a shorter length so the sequence axis changes too.
        limit = max(4, params.distill.max_length >> i)
        chunk = [x[:limit] for x in chunk]
        out.extend(batches(chunk, size, pad_id(tokenizer), min_length))
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
    """How often a quantised model picks the same class as FP32, and its largest drift."""
    same, total, worst = 0, 0, 0.0
    for input_ids, mask in data:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
        a, b = reference.run(None, feed)[0], other.run(None, feed)[0]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
        worst = max(worst, float(np.abs(a - b).max()))
    return {"argmax_agreement": same / total, "max_abs_error": worst}


def quantize_int8(src: Path, dst: Path) -> None:
    """Shape inference + graph optimisation first (ORT's recommended pre-processing), then
    dynamic quantisation of the MatMul/Gather weights to int8.

    ORT's symbolic shape inference cannot follow every data-dependent shape (a token-merging
    student's sort/gather ops leave some dims unknown) and then raises after dumping a debug
    model into the working directory. Pre-processing therefore runs inside a temporary working
    directory, and when symbolic inference fails it is retried with ONNX's own shape inference
    only, which is all that dynamic weight quantisation needs."""
    import contextlib
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    prepared = dst.with_suffix(".prep.onnx")
    try:
        with tempfile.TemporaryDirectory(prefix="still-quant-") as scratch, \
                contextlib.chdir(scratch):
            try:
                quant_pre_process(str(src), str(prepared))
            except Exception as err:  # ORT raises a bare Exception here
                if "symbolic shape inference" not in str(err):
                    raise
                warnings.warn(f"INT8 pre-processing: {err}; using ONNX shape inference only",
                              stacklevel=2)
                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def run(params: Params) -> dict:
    cfg = params.export
    torch.set_num_threads(params.trainer.num_threads)
    student_dir = Path(params.paths.student)
    model = student_io.load(student_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(student_dir / TOKENIZER_FILE))
    data = parity_batches(params, tokenizer, model.cfg.min_tokens())

    with atomic_dir(params.paths.export, params) as out:
        export_onnx(model, data[0], out / FP32_FILE, cfg.opset)
        fp32 = session(out / FP32_FILE)
        metrics = {"opset": cfg.opset, "min_tokens": model.cfg.min_tokens(),
                   "fp32": check_parity(model, fp32, data, cfg.atol, cfg.rtol)}
        metrics["fp32"]["bytes"] = file_size(out / FP32_FILE)
        if cfg.int8:
            quantize_int8(out / FP32_FILE, out / INT8_FILE)
            metrics["int8"] = agreement(fp32, session(out / INT8_FILE), data)
            metrics["int8"]["bytes"] = file_size(out / INT8_FILE)
        metrics["tensorrt"] = trt_engines.export_engines(
            params, out / FP32_FILE, out, data, tokenizer, model.cfg.min_tokens())
        shutil.copyfile(student_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
        write_json(out / "metrics.json", metrics)
    print(f"export: ONNX parity max abs error {metrics['fp32']['max_abs_error']:.2e}"
          + (f", INT8 argmax agreement {metrics['int8']['argmax_agreement']:.3f}"
             if cfg.int8 else "") + f", TensorRT {metrics['tensorrt']['status']}")
    return metrics


def main() -> None:
    stage_main("export", run)


if __name__ == "__main__":
    main()
