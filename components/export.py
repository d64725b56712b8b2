"""export: the student and the teacher to ONNX (dynamic batch and sequence axes), parity-checked,
plus INT8 for each.

Produces in `paths.export` (file names in `components/data/artifacts.py`): `model.onnx` (FP32;
inputs `input_ids`, `attention_mask` int64 [batch, sequence], output `logits` [batch, num_labels]),
`model.int8.onnx` (ONNX Runtime dynamic quantisation: int8 weights, activations quantised on
the fly), `model.static_int8.onnx` (static quantisation, below), `tokenizer.json`; the
fine-tuned teacher the same way (`teacher.onnx`, `teacher.int8.onnx`,
`teacher.static_int8.onnx`, `teacher.tokenizer.json`; `export.teacher: false` skips it), because
a user who does not distill would deploy the teacher in ONNX Runtime, quantised, and that is the
baseline a student has to beat; `metrics.json` (parity errors, INT8 agreement, sizes) and
`params.json`.

Static INT8 (`export.static_int8`): ONNX Runtime's `quantize_static` in QDQ form
(QuantizeLinear/DequantizeLinear pairs around the quantised ops, which ORT's CPU provider fuses
into integer kernels), activation ranges calibrated on the first training batches, encoded
and padded exactly as evaluate feeds a graph. Int8 weights (per output channel by default),
uint8 activations (int8 with zero point 0 when `activation_symmetric`); every MatMul is
quantised, the attention products included, and MatMul/Gemm outputs stay float, so ORT runs
them as `MatMulIntegerToFloat` and the logits are never rounded to 8 bits. The op types in
`float_ops` are not quantised and read float inputs (`unround_float_inputs`). Q/DQ is also the
form TensorRT's INT8 path consumes (with symmetric activations; `components/exporting/trt` builds
its engine graph itself). Like dynamic INT8, a quantised graph is not held to the FP32 tolerance:
its argmax agreement with FP32 and largest logit drift on held-out validation texts (never the
calibration texts) are recorded, not checked. Measured on 2 threads (`benchmarks/int8.py`):
about 1.8-1.9x FP32 model throughput for both models, a few percent faster than dynamic INT8,
test accuracy unchanged; quantising every op type (`float_ops: []`) was slower and lost
accuracy, symmetric activations were slower.

`export.ort_optimize`: run ONNX Runtime's transformer optimizer (the fusions Optimum applies:
attention, LayerNorm, GELU) on each FP32 graph before the parity check and quantisation. Off by
default: measured on 2 CPU threads it made both models slightly slower
(`benchmarks/evaluate_crosscheck.py --ort-optimize` measures it again).

Parity: PyTorch and ONNX Runtime run the same real validation batches (different batch sizes
and lengths); if any output differs by more than `export.atol + export.rtol * |torch|` the
stage fails with `ParityError`, naming the output, the batch and the max error.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`; it handles the
student's plain ops with named dynamic axes and needs no extra package (the dynamo exporter
needs `onnxscript`).

TensorRT (`export.tensorrt`; CUDA GPU + `pip install 'still[trt]'` only): `export_engines`
builds one engine per precision into `tensorrt/` (`<precision>.engine`, the `<precision>.onnx`
graph it was built from, a `.engine.json` sidecar; see `components/exporting/trt/`) and checks each
against ONNX Runtime on the parity batches. Without a GPU or TensorRT, `metrics.json` records
`"tensorrt": {"status": "skipped (reason)"}` (`enabled: auto`) or the stage fails with a
`StageError` that says what is missing (`enabled: true`).

Run: `python -m components.export` (or `dvc repro export`).
"""

from __future__ import annotations

import torch

from components.config import Params
from components.data.files import atomic_dir, write_json
from components.exporting.parity import parity_batches
from components.exporting.sides import export_side, student_side, teacher_side
from components.exporting.trt.build import export_engines
from components.stage import stage_main


def run(params: Params) -> dict:
    cfg = params.export
    torch.set_num_threads(params.trainer.num_threads)
    # Each side is loaded when its turn comes, so the two models are never both in memory.
    loaders = [student_side] + ([teacher_side] if cfg.teacher else [])
    with atomic_dir(params.paths.export, params, "export") as out:
        metrics: dict = {"opset": cfg.opset}
        for load in loaders:
            side = load(params)
            data = parity_batches(params, side.encoder)
            result = export_side(params, side, data, out)
            if side.name == "teacher":
                metrics["teacher"] = result
                continue
            metrics.update(min_tokens=side.min_tokens, **result)
            metrics["tensorrt"] = export_engines(params, out / side.files[0], out, data,
                                                 side.tokenizer, side.min_tokens)
        write_json(out / "metrics.json", metrics)
    print(summary_line(metrics))
    return metrics


def summary_line(metrics: dict) -> str:
    """What the stage prints: parity and INT8 agreement of each side, TensorRT's status."""
    line = f"export: student ONNX parity max abs error {metrics['fp32']['max_abs_error']:.2e}"
    for key, name in (("int8", "INT8"), ("static_int8", "static INT8")):
        if key in metrics:
            line += f", {name} argmax agreement {metrics[key]['argmax_agreement']:.3f}"
    if "teacher" in metrics:
        t = metrics["teacher"]
        line += f"; teacher parity {t['fp32']['max_abs_error']:.2e}"
        for key, name in (("int8", "INT8"), ("static_int8", "static INT8")):
            if key in t:
                line += f", {name} agreement {t[key]['argmax_agreement']:.3f}"
    return line + f"; TensorRT {metrics['tensorrt']['status']}"


def main() -> None:
    stage_main("export", run)


if __name__ == "__main__":
    main()
