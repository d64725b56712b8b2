"""The graph a TensorRT engine is built from: ONNX rewrites of the exported student, plus the
optimisation profile. Plain ONNX and ONNX Runtime only (no `tensorrt` import, no GPU), so all of
it runs and is tested on a CPU; `components.exporting.trt.engines` compiles the result on the GPU.

- **int32 inputs.** The ONNX export has int64 `input_ids`/`attention_mask`; TensorRT's native
  index type is int32, so `int32_onnx` rewrites the graph inputs to int32 and inserts a Cast to
  int64 right after each one. The rest of the graph is untouched, so the same graph gives the same
  logits in ONNX Runtime (checked by a CPU test).
- **Optimisation profiles.** One explicit profile, min/opt/max (batch, sequence) from
  `export.tensorrt`, with sequence lengths clipped to `distill.max_length` (the student has that
  many position embeddings, so longer inputs are impossible anyway).
- **INT8 by explicit quantisation (Q/DQ), not a TensorRT calibrator.** TensorRT's calibrators
  (IInt8EntropyCalibrator2, implicit quantisation) are deprecated since 10.1 and removed in 11,
  and implicit INT8 leaves most of a BERT-like encoder in FP16 because TensorRT only picks INT8
  where it happens to be faster. Instead ONNX Runtime's static quantiser inserts symmetric
  QuantizeLinear/DequantizeLinear pairs around the weight MatMuls (per-channel int8 weights,
  per-tensor int8 activations, entropy calibration on real training batches), leaving the
  embedding, LayerNorm, Softmax, attention products and the classifier head in float. This is
  the graph TensorRT must honour, and its INT8 parity reference is the same Q/DQ graph run by
  ONNX Runtime (`reference_session(..., optimize=False)`), so the parity check measures
  TensorRT's compilation, not the quantisation error (reported separately against FP32).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from components.config import TensorRT
from components.stage import StageError
from components.text.encoding import INPUTS, OUTPUTS

ENGINE_DIR = "tensorrt"
PRECISIONS = ("fp16", "int8")
INPUT_NAMES = INPUTS  # the graphs' interface (components.text.encoding)
OUTPUT_NAME = OUTPUTS[0]

Shape = tuple[int, int]


class TensorRTBuildError(StageError):
    """TensorRT could not parse the ONNX graph or build an engine from it (raised here when the
    graph cannot become the engine asked for, e.g. an INT8 graph with nothing to quantise)."""


# --------------------------------------------------------------------------- profiles


def profile_shapes(cfg: TensorRT, max_length: int,
                   min_length: int = 1) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Min/opt/max (batch, sequence) for both inputs, sequences clipped to `max_length` and
    raised to `min_length` (the shortest input a token-merging student accepts).

    Raises:
        ValueError: naming the param when a value is not a positive integer or the profile is
            not ordered min <= opt <= max.
    """
    values = {"distill.max_length": max_length, "min_length": min_length}
    for key in ("min_batch", "opt_batch", "max_batch", "min_seq", "opt_seq", "max_seq"):
        values[f"export.tensorrt.{key}"] = getattr(cfg, key)
    problems = [f"{key} must be an integer >= 1 (got {value!r})" for key, value in values.items()
                if isinstance(value, bool) or not isinstance(value, int) or value < 1]
    if problems:
        raise ValueError("; ".join(problems))
    if not cfg.min_batch <= cfg.opt_batch <= cfg.max_batch:
        raise ValueError("export.tensorrt: need min_batch <= opt_batch <= max_batch (got "
                         f"{cfg.min_batch}, {cfg.opt_batch}, {cfg.max_batch})")
    if not cfg.min_seq <= cfg.opt_seq <= cfg.max_seq:
        raise ValueError("export.tensorrt: need min_seq <= opt_seq <= max_seq (got "
                         f"{cfg.min_seq}, {cfg.opt_seq}, {cfg.max_seq})")
    if min_length > max_length:
        raise ValueError(f"the student needs at least {min_length} tokens but "
                         f"distill.max_length is {max_length}")
    seq = [max(min(s, max_length), min_length) for s in (cfg.min_seq, cfg.opt_seq, cfg.max_seq)]
    batch = (cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    shapes = tuple((b, s) for b, s in zip(batch, seq, strict=True))
    return {name: shapes for name in INPUT_NAMES}


# --------------------------------------------------------------------------- ONNX rewrites


def int32_onnx(src: str | Path, dst: str | Path) -> list[str]:
    """Rewrite every int64 graph input to int32 and cast it back to int64 right after, so
    TensorRT receives int32 indices while the rest of the graph is unchanged.

    Returns:
        The names of the rewritten inputs.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    casts, renamed = [], {}
    for inp in graph.input:
        if inp.name in initializers or inp.type.tensor_type.elem_type != TensorProto.INT64:
            continue
        renamed[inp.name] = f"{inp.name}__int64"
        inp.type.tensor_type.elem_type = TensorProto.INT32
        casts.append(helper.make_node("Cast", [inp.name], [renamed[inp.name]],
                                      name=f"{inp.name}__to_int64", to=TensorProto.INT64))
    _rename_inputs(graph, renamed)
    for i, node in enumerate(casts):
        graph.node.insert(i, node)
    onnx.checker.check_model(model)
    _save_onnx(model, dst)
    return list(renamed)


def _rename_inputs(graph, renamed: dict[str, str]) -> None:
    """Point every consumer (including nested subgraphs) at the renamed tensors."""
    from onnx import AttributeProto

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _rename_inputs(attr.g, renamed)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_inputs(g, renamed)


def _save_onnx(model, dst: str | Path) -> None:
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _quantizable_matmuls(model) -> tuple[list[str], str | None]:
    """Weight MatMul/Gemm nodes in graph order, minus the last one (the classifier head: tiny,
    and the layer whose error reaches the logits undiluted)."""
    weights = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node
             if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]
    return nodes[:-1], (nodes[-1] if nodes else None)


class _CalibrationReader:
    """ONNX Runtime CalibrationDataReader over in-memory batches.

    ORT's histogram calibrators stack every collected tensor into one array, so all feeds must
    share a shape: each example is fed on its own, right-padded (masked) to the longest batch.
    """

    def __init__(self, batches: list[dict[str, np.ndarray]], dtypes: dict[str, np.dtype]):
        seq = max(np.asarray(b[INPUT_NAMES[0]]).shape[1] for b in batches)
        self._feeds = []
        for batch in batches:
            arrays = {k: np.asarray(v) for k, v in batch.items() if k in dtypes}
            for row in range(len(arrays[INPUT_NAMES[0]])):
                feed = {}
                for name, arr in arrays.items():
                    padded = np.zeros((1, seq), dtype=dtypes[name])
                    padded[0, : arr.shape[1]] = arr[row]
                    feed[name] = padded
                self._feeds.append(feed)
        self._iter = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def qdq_onnx(src: str | Path, dst: str | Path,
             calibration_batches: list[dict[str, np.ndarray]]) -> dict:
    """Explicitly quantised (Q/DQ) copy of `src` for a TensorRT INT8 engine.

    Symmetric int8 everywhere (TensorRT only supports zero points of 0): per-channel weights,
    per-tensor activations whose ranges come from entropy calibration on `calibration_batches`.
    Only weight MatMuls are quantised; biases stay float.

    Returns:
        What was quantised, for the engine's sidecar.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_batches:
        raise ValueError("INT8 needs calibration batches (export.tensorrt.calibration_batches)")
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):  # nodes_to_quantize selects by name
        node.name = node.name or f"{node.op_type}_{i}"
    nodes, head = _quantizable_matmuls(model)
    if not nodes:
        raise TensorRTBuildError(f"{src}: no weight MatMul to quantise; INT8 would equal FP16")
    dtypes = {i.name: _np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        named, prepared, out = (Path(tmp) / f"{n}.onnx" for n in ("named", "prep", "qdq"))
        onnx.save(model, str(named))
        # Shape inference only: ORT's graph optimiser could emit ops TensorRT does not parse.
        quant_pre_process(str(named), str(prepared), skip_optimization=True)
        quantize_static(
            str(prepared), str(out), _CalibrationReader(calibration_batches, dtypes),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.Entropy,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                "MatMulConstBOnly": True, "QuantizeBias": False,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
        _save_onnx(onnx.load(str(out)), dst)
    return {"quantized_nodes": len(nodes), "float_head": head,
            "calibration_batches": len(calibration_batches), "calibration": "entropy"}


def _np_dtype(elem_type: int) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def prepare_onnx(onnx_path: str | Path, dst: str | Path, precision: str,
                 calibration_batches: list[dict[str, np.ndarray]] | None = None) -> dict:
    """The graph an engine is built from: int32 inputs, plus Q/DQ nodes for INT8 (CPU only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    dst = Path(dst)
    int32 = int32_onnx(onnx_path, dst)
    info: dict[str, Any] = {"int32_inputs": int32}
    if precision == "int8":
        info.update(qdq_onnx(dst, dst, calibration_batches or []))
    return info


# --------------------------------------------------------------------------- parity reference


def reference_session(path: str | Path, optimize: bool = True):
    """An ONNX Runtime CPU session that an engine's logits are compared with; `optimize=False`
    for a Q/DQ graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:  # run Q/DQ as plain float ops: exactly the math TensorRT is asked for
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def reference_logits(sess, feed: dict[str, np.ndarray]) -> np.ndarray:
    """`sess`'s logits for `feed`, cast to the int32 or int64 inputs the graph declares."""
    dtypes = {i.name: np.int32 if i.type == "tensor(int32)" else np.int64
              for i in sess.get_inputs()}
    return sess.run([OUTPUT_NAME], {k: v.astype(dtypes[k]) for k, v in feed.items()})[0]
