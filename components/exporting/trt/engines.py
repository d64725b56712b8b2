"""TensorRT engines for the exported student (CUDA GPU + `pip install 'still[trt]'` only): build
one from the graph `components.exporting.trt.graphs` prepares, run it, check it against ONNX
Runtime.

`build_engine` writes, per precision in `export.tensorrt.precisions`: `<precision>.engine` (the
serialised engine), `<precision>.onnx` (the exact graph it was built from) and
`<precision>.engine.json` (sidecar: TensorRT version, GPU, profiles, precision, layers pinned to
FP32). The export stage builds and checks them (`export_engines`), the evaluate stage times them
(`tensorrt_runners`). The `tensorrt` package is imported only inside functions, so this module
imports on any machine; `availability()` says whether the engines can run here.

- **FP16 with FP32 islands.** FP16 is known to overflow in LayerNorm (the variance of a
  residual stream with large activations exceeds 65504) and to lose accuracy in Softmax, so the
  normalisation, softmax and reduction layers are pinned to FP32 (`layer.precision` + output
  types) and the builder must obey it (`BuilderFlag.OBEY_PRECISION_CONSTRAINTS`). Export with
  `export.opset >= 17` so LayerNorm arrives as one `LayerNormalization` op (TensorRT's
  INormalizationLayer) rather than a chain of elementwise ops.
- **INT8** engines are built from the explicitly quantised (Q/DQ) graph (see `graphs`), with the
  INT8 flag on top of FP16 for the layers outside Q/DQ.
- **Profiles at run time.** `TensorRTRunner` pads a batch up to the profile minimum (masked
  padding does not change the logits) and splits batches larger than the profile maximum.
- **Version.** The FP16 path uses TensorRT 10's weakly typed builder flags, which TensorRT 11
  removed; `availability()` reports any other major version as unavailable.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from components.config import TensorRT
from components.data.files import atomic_write_bytes, file_size, sha256_file, write_json
from components.exporting.trt.graphs import (
    INPUT_NAMES,
    OUTPUT_NAME,
    PRECISIONS,
    TensorRTBuildError,
    prepare_onnx,
    profile_shapes,
    reference_logits,
)
from components.stage import StageError

INSTALL_HINT = "pip install 'still[trt]'"
SUPPORTED_MAJOR = 10


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
        "onnx_sha256": sha256_file(graph_path),
        "source_onnx_sha256": sha256_file(Path(onnx_path)),
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


# --------------------------------------------------------------------------- parity


def check_engine_parity(runner, reference, fp32, feeds: list[dict[str, np.ndarray]],
                        atol: float, precision: str) -> dict:
    """Max |engine - reference| over the parity batches (raises past `atol`), plus the drift
    and argmax agreement against the FP32 ONNX model."""
    worst = drift = 0.0
    same = total = 0
    for i, feed in enumerate(feeds):
        got = runner(feed["input_ids"], feed["attention_mask"])
        expected = reference_logits(reference, feed)
        err = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
        if err > atol:
            raise TensorRTParityError(
                f"TensorRT {precision} engine diverges from ONNX Runtime on parity batch {i} "
                f"(shape {feed['input_ids'].shape}): max abs error {err:.3e} exceeds "
                f"export.tensorrt.atol={atol}. An overflow (inf/nan) points at FP16 ranges; "
                "otherwise loosen export.tensorrt.atol or drop the precision from "
                "export.tensorrt.precisions.")
        worst = max(worst, err)
        base = reference_logits(fp32, feed)
        drift = max(drift, float(np.abs(got - base).max()))
        same += int((got.argmax(-1) == base.argmax(-1)).sum())
        total += len(got)
    return {"max_abs_error": worst, "max_abs_error_vs_fp32": drift,
            "argmax_agreement_vs_fp32": same / total, "batches": len(feeds)}
