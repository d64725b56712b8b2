"""The export stage's TensorRT step: calibration batches from the train split, then one engine per
precision built, checked against ONNX Runtime and described (`export_engines`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.config import Params
from components.data.artifacts import split_head
from components.exporting.trt import engines, graphs
from components.models.runtimes import ort_session
from components.stage import StageError
from components.text.batches import encode
from components.text.encoding import pad_id
from components.text.tensors import pad_batch

# --------------------------------------------------------------------------- TensorRT


def calibration_batches(params: Params, tokenizer,
                        min_length: int = 1) -> list[dict[str, np.ndarray]]:
    """`export.tensorrt.calibration_batches` real training batches of `opt_batch` examples
    (train: the engines are checked on validation batches), full length (truncated to
    `distill.max_length`), padded to the profile's shortest length."""
    cfg = params.export.tensorrt
    texts = split_head(params.paths, "train", cfg.calibration_batches * cfg.opt_batch)
    ids = encode(tokenizer, texts, params.distill.max_length)
    shortest = graphs.profile_shapes(cfg, params.distill.max_length,
                                     min_length)[graphs.INPUT_NAMES[0]][0][1]
    out = []
    for start in range(0, len(ids), cfg.opt_batch):
        input_ids, mask = pad_batch(ids[start : start + cfg.opt_batch], pad_id(tokenizer))
        seq = max(input_ids.shape[1], shortest)
        feed = {}
        for name, tensor, fill in zip(graphs.INPUT_NAMES, (input_ids, mask),
                                      (pad_id(tokenizer), 0), strict=True):
            arr = np.full((len(tensor), seq), fill, dtype=np.int32)  # up to the profile's min
            arr[:, : tensor.shape[1]] = tensor.numpy()
            feed[name] = arr
        out.append(feed)
    if not out:
        raise StageError("the train split is empty: INT8 calibration needs examples")
    return out


def _as_feed(batch) -> dict[str, np.ndarray]:
    """A parity batch, (input_ids, mask) tensors or a dict, as numpy arrays."""
    items = (batch.items() if isinstance(batch, dict)
             else zip(graphs.INPUT_NAMES, batch, strict=True))
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in items}


def export_engines(params: Params, onnx_path: str | Path, out_dir: str | Path, parity_batches,
                   tokenizer=None, min_length: int = 1) -> dict:
    """The export stage's TensorRT step: build, check and describe one engine per precision.

    Args:
        params: validated params (`export.tensorrt`, `distill.max_length`).
        onnx_path: the FP32 ONNX model (int64 inputs) written by the export stage.
        out_dir: the export folder; engines go to `out_dir/tensorrt/`.
        parity_batches: real validation batches, `(input_ids, attention_mask)` or dicts.
        tokenizer: the student's tokenizer, for INT8 calibration batches from the validation
            split; without it the parity batches calibrate (weaker: they are also the check).
        min_length: the shortest input the student accepts (`StudentConfig.min_tokens()`).

    Returns:
        `{"status": "skipped (reason)"}` or `{"status": "built", "<precision>": {...}}`.

    Raises:
        StageError: `enabled: true` but no GPU/TensorRT (the message says how to fix it).
        TensorRTParityError / TensorRTBuildError: an engine failed to build or to match.
    """
    cfg = params.export.tensorrt
    if cfg.enabled is False:
        return {"status": "skipped (disabled in params)"}
    ok, reason = engines.availability()
    if not ok:
        if cfg.enabled == "auto":
            return {"status": f"skipped ({reason})"}
        raise StageError(
            f"export.tensorrt.enabled is true but TensorRT cannot run here: {reason}. Run on a "
            f"machine with a CUDA GPU and TensorRT 10 ({engines.INSTALL_HINT}), or set "
            "export.tensorrt.enabled: auto to skip TensorRT where it is unavailable "
            "(false to never build engines).")
    folder = Path(out_dir) / graphs.ENGINE_DIR
    feeds = [_as_feed(b) for b in parity_batches]
    calib, calib_source = None, None
    if "int8" in cfg.precisions:
        if tokenizer is not None:
            calib = calibration_batches(params, tokenizer, min_length)
            calib_source = "train split"
        else:
            calib, calib_source = feeds, "parity batches"
    fp32 = ort_session(onnx_path)
    result: dict = {"status": "built"}
    for precision in cfg.precisions:
        engine = folder / f"{precision}.engine"
        info = engines.build_engine(onnx_path, engine, precision, cfg, params.distill.max_length,
                                    calib if precision == "int8" else None, min_length)
        reference = fp32 if precision == "fp16" else graphs.reference_session(
            engine.with_suffix(".onnx"), optimize=False)
        parity = engines.check_engine_parity(engines.TensorRTRunner(engine), reference, fp32,
                                             feeds, cfg.atol, precision)
        result[precision] = {
            "status": "built", "bytes": info["bytes"], **parity,
            "parity_reference": ("model.onnx" if precision == "fp16"
                                 else f"{graphs.ENGINE_DIR}/int8.onnx"),
            "fp32_layers": len(info["fp32_layers"]),
            **({"calibration": calib_source} if precision == "int8" else {}),
        }
        result.setdefault("tensorrt_version", info["tensorrt_version"])
        result.setdefault("gpu", info["gpu"])
    return result
