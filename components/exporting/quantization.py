"""INT8 with ONNX Runtime: dynamic (`quantize_int8`) and static QDQ calibrated on training batches
(`quantize_static_int8`), with the QDQ surgery that keeps float ops reading float inputs
(`unround_float_inputs`)."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from components.config import QUANTIZABLE_OPS, Params, StaticInt8
from components.data.artifacts import split_head
from components.models.runtimes import TextEncoder
from components.stage import StageError
from components.text.encoding import INPUTS


def pre_process(src: Path, dst: Path) -> None:
    """ORT's recommended pre-processing before quantisation: shape inference + graph
    optimisation.

    ORT's symbolic shape inference cannot follow every data-dependent shape (a token-merging
    student's sort/gather ops, the teacher's `Min(512, sequence)` position slice) and then
    raises after dumping a debug model into the working directory. Pre-processing therefore
    runs inside a temporary working directory, and when symbolic inference fails it is retried
    with ONNX's own shape inference only, which is all that quantisation needs."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    with tempfile.TemporaryDirectory(prefix="still-quant-") as scratch, \
            contextlib.chdir(scratch):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception as err:  # ORT raises a bare Exception here
            if "symbolic shape inference" not in str(err):
                raise
            warnings.warn(f"INT8 pre-processing: {err}; using ONNX shape inference only",
                          stacklevel=3)
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def quantize_int8(src: Path, dst: Path) -> None:
    """Pre-processing, then dynamic quantisation of the MatMul/Gather weights to int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="still-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        pre_process(src, prepared)
        quantize_dynamic(str(prepared), str(Path(dst).resolve()), weight_type=QuantType.QInt8)


def static_calibration(params: Params, encoder: TextEncoder) -> list[dict[str, np.ndarray]]:
    """The first `calibration_batches` batches of `calibration_batch_size` *training* texts,
    tokenised and padded as evaluate feeds a graph (`encoder`, per-batch right padding). Train,
    so that the agreement with FP32 is measured on validation texts calibration never saw."""
    cfg = params.export.static_int8
    texts = split_head(params.paths, "train", cfg.calibration_batches * cfg.calibration_batch_size)
    ids = encoder.ids(texts)
    if not ids:
        raise StageError("the train split is empty: static INT8 calibration needs examples "
                         "(or set export.static_int8.enabled: false)")
    size = cfg.calibration_batch_size
    return [dict(zip(INPUTS, (t.numpy() for t in encoder.batch(ids[i : i + size])),
                     strict=True))
            for i in range(0, len(ids), size)]


class CalibrationFeeds:
    """ONNX Runtime's CalibrationDataReader protocol (`get_next`, plus `__len__`/`set_range`
    for strided collection) over in-memory feeds; duck-typed, as ORT's base class allows."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._next = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self.feeds[start_index:end_index])


def quantized_op_types(cfg: StaticInt8) -> list[str]:
    return [op for op in QUANTIZABLE_OPS if op not in cfg.float_ops]


def quantized_ops(graph, cfg: StaticInt8) -> dict[str, int]:
    """Nodes of each quantised op type that read a dequantised tensor: the ones ORT runs on
    int8 data once it fuses the Q/DQ pairs around them."""
    kinds = set(quantized_op_types(cfg))
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts = Counter(n.op_type for n in graph.node
                     if n.op_type in kinds and dequantized & set(n.input))
    return dict(sorted(counts.items()))


def unround_float_inputs(graph, cfg: StaticInt8) -> int:
    """Point float ops back at the float tensor wherever ORT's quantiser rewired them to its
    dequantised copy. ORT gives every consumer of a quantised activation the DQ output, so in
    a post-norm encoder the residual Add would read the LayerNorm output rounded to 8 bits
    because the next MatMul reads it quantised. Only tensors that also feed a quantised op are
    touched (when every consumer is float, the pair belongs to an int8 producer such as an
    embedding Gather and is lossless). Returns how many inputs were rewired."""
    kinds = set(quantized_op_types(cfg))
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        users = readers.get(dq.output[0], [])
        floats = [u for u in users if u.op_type not in kinds]
        if q is None or q.op_type != "QuantizeLinear" or len(floats) in (0, len(users)):
            continue
        for user in floats:
            for i, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[i] = q.input[0]
                    rewired += 1
    return rewired


def quantize_static_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]],
                         cfg: StaticInt8) -> dict:
    """Static QDQ quantisation of `src` into `dst`, calibrated on `feeds` (see the module
    docstring). Returns what was quantised and how it was calibrated."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="still-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        pre_process(src, prepared)
        activation = QuantType.QInt8 if cfg.activation_symmetric else QuantType.QUInt8
        # ORT's histogram calibrators print progress on stdout; the stage prints its summary.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared), str(Path(scratch) / "quantized.onnx"), CalibrationFeeds(feeds),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=quantized_op_types(cfg),
                per_channel=cfg.per_channel, activation_type=activation,
                weight_type=QuantType.QInt8, calibrate_method=methods[cfg.method],
                extra_options={
                    "ActivationSymmetric": cfg.activation_symmetric,
                    "WeightSymmetric": True,
                    # Float outputs: ORT runs MatMul as MatMulIntegerToFloat and the logits
                    # are not rounded to 8 bits (measured on the student: 8x less logit drift,
                    # no slower than QLinearMatMul).
                    "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                    # One batch per calibration pass: batches differ in length, and the
                    # histogram methods would otherwise hold every batch's activations at once.
                    "CalibStridedMinMax": 1,
                },
            )
        quantized = onnx.load(str(Path(scratch) / "quantized.onnx"))
        rewired = unround_float_inputs(quantized.graph, cfg)
        onnx.checker.check_model(quantized)
        onnx.save(quantized, str(dst))
    return {"quantized_ops": quantized_ops(quantized.graph, cfg),
            "float_ops": list(cfg.float_ops), "float_inputs_unrounded": rewired,
            "calibration": {"method": cfg.method, "batches": len(feeds),
                            "examples": sum(len(f[INPUTS[0]]) for f in feeds),
                            "split": "train"},
            "per_channel": cfg.per_channel, "activation_symmetric": cfg.activation_symmetric}
