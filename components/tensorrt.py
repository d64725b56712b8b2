"""TensorRT engines for the exported student (CUDA GPU + `pip install 'still[trt]'` only).

Produces in `paths.export`/tensorrt/, one set per precision in `export.tensorrt.precisions`:
`<precision>.engine` (serialised TensorRT engine), `<precision>.onnx` (the exact graph it was
built from) and `<precision>.engine.json` (sidecar: TensorRT version, GPU, profiles, precision,
layers pinned to FP32, build time). The export stage calls `export_engines`, which checks each
engine against ONNX Runtime on the parity batches; the evaluate stage calls `evaluate_runners`.
Without a GPU or TensorRT both return a "skipped (reason)" status instead (`enabled: auto`), or
fail with a `StageError` that says what is missing (`enabled: true`).

Design choices:

- **int32 inputs.** The ONNX export has int64 `input_ids`/`attention_mask`; TensorRT's native
  index type is int32, so `int32_onnx` rewrites the graph inputs to int32 and inserts a Cast to
  int64 right after each one. The rest of the graph is untouched, so the same graph gives the same
  logits in ONNX Runtime (checked by a CPU test).
- **Optimisation profiles.** One explicit profile, min/opt/max (batch, sequence) from
  `export.tensorrt`, with sequence lengths clipped to `distill.max_length` (the student has that
  many position embeddings, so longer inputs are impossible anyway). `TensorRTRunner` pads a
  batch up to the profile minimum (masked padding does not change the logits) and splits
  batches larger than the profile maximum.
- **FP16 with FP32 islands.** FP16 is known to overflow in LayerNorm (the variance of a
  residual stream with large activations exceeds 65504) and to lose accuracy in Softmax, so the
  normalisation, softmax and reduction layers are pinned to FP32 (`layer.precision` + output
  types) and the builder must obey it (`BuilderFlag.OBEY_PRECISION_CONSTRAINTS`). Export with
  `export.opset >= 17` so LayerNorm arrives as one `LayerNormalization` op (TensorRT's
  INormalizationLayer) rather than a chain of elementwise ops.
- **INT8 by explicit quantisation (Q/DQ), not a TensorRT calibrator.** TensorRT's calibrators
  (IInt8EntropyCalibrator2, implicit quantisation) are deprecated since 10.1 and removed in 11,
  and implicit INT8 leaves most of a BERT-like encoder in FP16 because TensorRT only picks INT8
  where it happens to be faster. Instead ONNX Runtime's static quantiser inserts symmetric
  QuantizeLinear/DequantizeLinear pairs around the weight MatMuls (per-channel int8 weights,
  per-tensor int8 activations, entropy calibration on real validation batches), leaving the
  embedding, LayerNorm, Softmax, attention products and the classifier head in float. This is
  the graph TensorRT must honour, it is plain ONNX (built and checked on a CPU, see the tests),
  and its INT8 parity reference is the same Q/DQ graph run by ONNX Runtime, so the check measures
  TensorRT's compilation, not the quantisation error (reported separately against FP32).
- **Version.** The FP16 path uses TensorRT 10's weakly typed builder flags, which TensorRT 11
  removed; `availability()` reports any other major version as unavailable.

Run: through the export and evaluate stages (`dvc repro export evaluate`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.common import StageError, atomic_write_bytes, file_size, read_json, write_json
from components.config import Params, TensorRT

ENGINE_DIR = "tensorrt"
PRECISIONS = ("fp16", "int8")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'still[trt]'"
SUPPORTED_MAJOR = 10

Shape = tuple[int, int]


class TensorRTBuildError(StageError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


class TensorRTParityError(StageError):
    """A TensorRT engine disagrees with ONNX Runtime beyond `export.tensorrt.atol`."""


# --------------------------------------------------------------------------- availability


def availability() -> tuple[bool, str]:
    """(True, "") when a CUDA device and TensorRT 10 are present, else (False, reason)."""
    problems = []
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA device (torch.cuda.is_available() is False)")
    except ImportError:
        problems.append("torch is not installed")
    try:
        import tensorrt as trt
    except ModuleNotFoundError as err:
        problems.append(f"tensorrt not installed: {INSTALL_HINT}" if err.name == "tensorrt"
                        else f"tensorrt cannot be imported ({err})")
    except Exception as err:  # e.g. OSError: its CUDA libraries are missing
        problems.append(f"tensorrt cannot be imported ({err}); reinstall: {INSTALL_HINT}")
    else:
        major = int(str(trt.__version__).split(".")[0])
        if major != SUPPORTED_MAJOR:
            problems.append(f"tensorrt {trt.__version__} found but this pipeline needs "
                            f"TensorRT {SUPPORTED_MAJOR}.x: {INSTALL_HINT}")
    return not problems, "; ".join(problems)


def _require() -> None:
    ok, reason = availability()
    if not ok:
        raise StageError(f"TensorRT is unavailable: {reason}")


@functools.cache
def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


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


class _Reader:
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
            str(prepared), str(out), _Reader(calibration_batches, dtypes),
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


# --------------------------------------------------------------------------- build


def _pin_fp32(network) -> list[str]:
    """Force normalisation, softmax and reduction layers (and their outputs) to FP32."""
    import tensorrt as trt

    kinds = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    floats = {trt.float32, trt.float16}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        if any(layer.get_output(j).dtype not in floats for j in range(layer.num_outputs)):
            continue  # e.g. an integer reduction over shapes: nothing to protect
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(f"{layer.type.name}:{layer.name}")
    return pinned


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str, cfg: TensorRT,
                 max_length: int,
                 calibration_batches: list[dict[str, np.ndarray]] | None = None,
                 min_length: int = 1) -> dict:
    """Build one engine with an explicit optimisation profile; write it atomically plus a JSON
    sidecar `<engine>.json`, and keep the graph it was built from as `<stem>.onnx`.

    Returns:
        The sidecar's content plus `bytes` (engine size).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    if precision == "int8" and not calibration_batches:
        raise ValueError("INT8 engines need calibration batches from the validation split")
    shapes = profile_shapes(cfg, max_length, min_length)
    _require()
    import tensorrt as trt
    import torch

    engine_path = Path(engine_path)
    graph_path = engine_path.with_suffix(".onnx")
    start = time.perf_counter()
    prepared = prepare_onnx(onnx_path, graph_path, precision, calibration_batches)

    builder = trt.Builder(_logger())
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(graph_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT cannot parse {graph_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)  # INT8 too: layers outside Q/DQ run in FP16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    pinned = _pin_fp32(network)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT {trt.__version__} failed to build the {precision} engine from "
            f"{graph_path} (see the TensorRT log above); try a larger "
            "export.tensorrt.workspace_mb or smaller max_batch/max_seq")
    atomic_write_bytes(engine_path, serialized)

    info = {
        "precision": precision,
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "profiles": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                     for name, (lo, opt, hi) in shapes.items()},
        "workspace_mb": cfg.workspace_mb,
        "fp32_layers": pinned,
        "onnx": graph_path.name,
        "onnx_sha256": _sha256(graph_path),
        "source_onnx_sha256": _sha256(Path(onnx_path)),
        **prepared,
    }
    # No build time or date in the sidecar (it is inside the export stage's hashed output).
    # The engine itself is specific to the GPU and TensorRT version (tactics are timed while
    # building), so on GPU machines the export hash is per machine; CPU-only runs have none.
    write_json(engine_path.with_name(engine_path.name + ".json"), info)
    seconds = time.perf_counter() - start
    print(f"export: {engine_path.name} built in {seconds:.1f} s")
    return {**info, "bytes": file_size(engine_path), "build_seconds": seconds}


# --------------------------------------------------------------------------- run


class TensorRTRunner:
    """`runner(input_ids, attention_mask) -> logits` (numpy in, numpy out) on the GPU.

    Device buffers are torch CUDA tensors (no pycuda). Batches below the profile minimum are
    padded (masked rows/positions, dropped from the result), batches above the maximum are run
    in chunks; a sequence longer than the profile maximum is an error.
    """

    def __init__(self, engine_path: str | Path):
        path = Path(engine_path)
        ok, reason = availability()
        if not ok:
            raise StageError(f"cannot run {path}: {reason}")
        if not path.is_file():
            raise StageError(f"{path} not found: run the export stage (dvc repro export)")
        import tensorrt as trt
        import torch

        self.path = path
        self.engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise StageError(
                f"{path} cannot be loaded by TensorRT {trt.__version__} on "
                f"{torch.cuda.get_device_name(0)}: engines only run on the GPU model and "
                "TensorRT version that built them; rebuild with dvc repro -f export")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        missing = sorted(set(INPUT_NAMES) - set(inputs))
        if missing or not outputs:
            raise StageError(f"{path}: engine inputs {inputs} / outputs {outputs} do not match "
                             f"the student's ({list(INPUT_NAMES)} -> {OUTPUT_NAME})")
        self.output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        self.dtypes = {n: _torch_dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
                       for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)
        (self.min_batch, self.min_seq), (self.max_batch, self.max_seq) = tuple(lo), tuple(hi)
        self.stream = torch.cuda.Stream()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape or not len(ids):
            raise ValueError(f"need non-empty 2-D input_ids and attention_mask of one shape "
                             f"(got {ids.shape} and {mask.shape})")
        if ids.shape[1] > self.max_seq:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds the engine profile's "
                             f"{self.max_seq} (export.tensorrt.max_seq, clipped to "
                             "distill.max_length)")
        seq = max(ids.shape[1], self.min_seq)
        return np.concatenate([
            self._run(ids[i : i + self.max_batch], mask[i : i + self.max_batch], seq)
            for i in range(0, len(ids), self.max_batch)
        ])

    def _run(self, ids: np.ndarray, mask: np.ndarray, seq: int) -> np.ndarray:
        import torch

        rows, batch = len(ids), max(len(ids), self.min_batch)
        keep = []  # device buffers must outlive the asynchronous execution
        with torch.cuda.stream(self.stream):
            for name, arr in zip(INPUT_NAMES, (ids, mask), strict=True):
                padded = np.zeros((batch, seq), dtype=np.int64)  # masked padding: pad id 0
                padded[:rows, : arr.shape[1]] = arr
                tensor = torch.from_numpy(padded).to("cuda", dtype=self.dtypes[name])
                self.context.set_input_shape(name, (batch, seq))
                self.context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)),
                              dtype=self.dtypes[self.output], device="cuda")
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed for {self.path}")
        self.stream.synchronize()
        return out[:rows].float().cpu().numpy()


def _torch_dtype(np_dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype


# --------------------------------------------------------------------------- stage hooks


def _as_feed(batch) -> dict[str, np.ndarray]:
    """A parity batch, (input_ids, mask) tensors or a dict, as numpy arrays."""
    items = batch.items() if isinstance(batch, dict) else zip(INPUT_NAMES, batch, strict=True)
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in items}


def _ort_session(path: Path, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:  # run Q/DQ as plain float ops: exactly the math TensorRT is asked for
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_logits(sess, feed: dict[str, np.ndarray]) -> np.ndarray:
    dtypes = {i.name: np.int32 if i.type == "tensor(int32)" else np.int64
              for i in sess.get_inputs()}
    return sess.run([OUTPUT_NAME], {k: v.astype(dtypes[k]) for k, v in feed.items()})[0]


def check_engine_parity(runner, reference, fp32, feeds: list[dict[str, np.ndarray]],
                        atol: float, precision: str) -> dict:
    """Max |engine - reference| over the parity batches (raises past `atol`), plus the drift
    and argmax agreement against the FP32 ONNX model."""
    worst = drift = 0.0
    same = total = 0
    for i, feed in enumerate(feeds):
        got = runner(feed["input_ids"], feed["attention_mask"])
        expected = _ort_logits(reference, feed)
        err = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
        if err > atol:
            raise TensorRTParityError(
                f"TensorRT {precision} engine diverges from ONNX Runtime on parity batch {i} "
                f"(shape {feed['input_ids'].shape}): max abs error {err:.3e} exceeds "
                f"export.tensorrt.atol={atol}. An overflow (inf/nan) points at FP16 ranges; "
                "otherwise loosen export.tensorrt.atol or drop the precision from "
                "export.tensorrt.precisions.")
        worst = max(worst, err)
        base = _ort_logits(fp32, feed)
        drift = max(drift, float(np.abs(got - base).max()))
        same += int((got.argmax(-1) == base.argmax(-1)).sum())
        total += len(got)
    return {"max_abs_error": worst, "max_abs_error_vs_fp32": drift,
            "argmax_agreement_vs_fp32": same / total, "batches": len(feeds)}


def calibration_batches(params: Params, tokenizer,
                        min_length: int = 1) -> list[dict[str, np.ndarray]]:
    """`export.tensorrt.calibration_batches` real validation batches of `opt_batch` examples,
    full length (truncated to `distill.max_length`), padded to the profile's shortest length."""
    from components.prepare import load_split
    from components.textdata import encode, pad_batch, pad_id

    cfg = params.export.tensorrt
    texts = load_split(params, "validation")["text"].tolist()
    ids = encode(tokenizer, texts, params.distill.max_length)
    out = []
    for start in range(0, len(ids), cfg.opt_batch):
        if len(out) == cfg.calibration_batches:
            break
        input_ids, mask = pad_batch(ids[start : start + cfg.opt_batch], pad_id(tokenizer))
        shortest = profile_shapes(cfg, params.distill.max_length, min_length)[INPUT_NAMES[0]][0][1]
        seq = max(input_ids.shape[1], shortest)
        feed = {}
        for name, tensor, fill in zip(INPUT_NAMES, (input_ids, mask), (pad_id(tokenizer), 0),
                                      strict=True):
            arr = np.full((len(tensor), seq), fill, dtype=np.int32)  # up to the profile's min
            arr[:, : tensor.shape[1]] = tensor.numpy()
            feed[name] = arr
        out.append(feed)
    if not out:
        raise StageError("the validation split is empty: INT8 calibration needs examples")
    return out


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
    ok, reason = availability()
    if not ok:
        if cfg.enabled == "auto":
            return {"status": f"skipped ({reason})"}
        raise StageError(
            f"export.tensorrt.enabled is true but TensorRT cannot run here: {reason}. Run on a "
            f"machine with a CUDA GPU and TensorRT 10 ({INSTALL_HINT}), or set "
            "export.tensorrt.enabled: auto to skip TensorRT where it is unavailable "
            "(false to never build engines).")
    from components.runtimes import ort_session as session

    folder = Path(out_dir) / ENGINE_DIR
    feeds = [_as_feed(b) for b in parity_batches]
    calib, calib_source = None, None
    if "int8" in cfg.precisions:
        if tokenizer is not None:
            calib = calibration_batches(params, tokenizer, min_length)
            calib_source = "validation split"
        else:
            calib, calib_source = feeds, "parity batches"
    fp32 = session(onnx_path)
    result: dict[str, Any] = {"status": "built"}
    for precision in cfg.precisions:
        engine = folder / f"{precision}.engine"
        info = build_engine(onnx_path, engine, precision, cfg, params.distill.max_length,
                            calib if precision == "int8" else None, min_length)
        reference = fp32 if precision == "fp16" else _ort_session(
            engine.with_suffix(".onnx"), optimize=False)
        parity = check_engine_parity(TensorRTRunner(engine), reference, fp32, feeds, cfg.atol,
                                     precision)
        result[precision] = {
            "status": "built", "bytes": info["bytes"], **parity,
            "parity_reference": "model.onnx" if precision == "fp16" else f"{ENGINE_DIR}/int8.onnx",
            "fp32_layers": len(info["fp32_layers"]),
            **({"calibration": calib_source} if precision == "int8" else {}),
        }
        result.setdefault("tensorrt_version", info["tensorrt_version"])
        result.setdefault("gpu", info["gpu"])
    return result


def evaluate_runners(params: Params, export_dir: str | Path) -> tuple[list, str | None]:
    """`(name, runner, size_bytes)` for each engine the export stage built
    (`student_trt_<precision>`; a runner takes torch CPU tensors like every other runner), or
    `([], reason)` when there are none to run here."""
    export_dir = Path(export_dir)
    try:
        entry = read_json(export_dir / "metrics.json").get("tensorrt")
    except StageError as err:
        return [], str(err)
    if entry is None:
        return [], ("export metrics have no 'tensorrt' entry (made before TensorRT support): "
                    "rerun dvc repro -f export")
    status = entry.get("status", "unknown")
    if status != "built":
        return [], status
    ok, reason = availability()
    if not ok:
        return [], f"skipped (engines exist but cannot run here: {reason})"
    runners = []
    for precision in PRECISIONS:
        if entry.get(precision, {}).get("status") != "built":
            continue
        path = export_dir / ENGINE_DIR / f"{precision}.engine"
        try:
            engine = TensorRTRunner(path)
        except StageError as err:
            return [], f"skipped ({err})"
        runners.append((f"student_trt_{precision}", _torch_inputs(engine), file_size(path)))
    return runners, None if runners else "no TensorRT engine marked built in export metrics"


def _torch_inputs(runner: TensorRTRunner):
    def run(input_ids, mask) -> np.ndarray:  # torch CPU tensors, as from TextEncoder
        return runner(input_ids.numpy(), mask.numpy())

    return run
