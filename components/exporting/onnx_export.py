"""One model to ONNX: the TorchScript exporter with dynamic batch and sequence axes
(`export_onnx`), ONNX Runtime's transformer optimizer (`ort_optimize`), and the whole per-model
step (`export_model`: FP32, parity, dynamic and static INT8 with their agreement)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from components.data.files import file_size
from components.exporting.parity import agreement, check_parity
from components.exporting.quantization import quantize_int8, quantize_static_int8
from components.models.runtimes import ort_session
from components.text.encoding import INPUTS, OUTPUTS


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


def ort_optimize(path: Path, num_heads: int, hidden: int) -> dict:
    """ONNX Runtime's transformer optimizer (BERT fusions) on `path`, in place. Returns which
    fused ops it produced, so the metrics say whether anything matched."""
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(str(path), model_type="bert", num_heads=num_heads,
                               hidden_size=hidden, opt_level=1)
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(path))
    return {"fused_ops": fused}


def export_model(model: torch.nn.Module, data, out: Path, fp32_name: str, int8_name: str | None,
                 cfg, heads: int, hidden: int, static_name: str | None = None,
                 calibration: list[dict[str, np.ndarray]] | None = None,
                 heldout: list | None = None) -> dict:
    """One model to ONNX FP32 (+ optional optimizer pass), parity-checked on `data`, then
    dynamic INT8 (`int8_name`) and static INT8 calibrated on `calibration` (`static_name`), each
    INT8 graph's agreement with FP32 measured on `heldout` (default: `data`)."""
    heldout = heldout or data
    export_onnx(model, data[0], out / fp32_name, cfg.opset)
    result = {}
    if cfg.ort_optimize:
        result["ort_optimize"] = ort_optimize(out / fp32_name, heads, hidden)
    fp32 = ort_session(out / fp32_name)
    result["fp32"] = check_parity(model, fp32, data, cfg.atol, cfg.rtol)
    result["fp32"]["bytes"] = file_size(out / fp32_name)
    if int8_name:
        quantize_int8(out / fp32_name, out / int8_name)
        result["int8"] = agreement(fp32, ort_session(out / int8_name), heldout)
        result["int8"]["bytes"] = file_size(out / int8_name)
    if static_name:
        info = quantize_static_int8(out / fp32_name, out / static_name, calibration,
                                    cfg.static_int8)
        result["static_int8"] = {**agreement(fp32, ort_session(out / static_name), heldout),
                                 "bytes": file_size(out / static_name), **info}
    return result
