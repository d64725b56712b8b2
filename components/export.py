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

import contextlib
import io
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from components.config import QUANTIZABLE_OPS, Params, StaticInt8
from components.data.artifacts import (
    BATCH_ROWS,
    STUDENT_FP32,
    STUDENT_INT8,
    STUDENT_PREPROCESSING,
    STUDENT_STATIC_INT8,
    STUDENT_TOKENIZER,
    TEACHER_FP32,
    TEACHER_INT8,
    TEACHER_PREPROCESSING,
    TEACHER_STATIC_INT8,
    TEACHER_TOKENIZER,
    iter_split_texts,
    load_split,
)
from components.data.files import atomic_dir, file_size, reading, write_json
from components.exporting.trt import engines, graphs
from components.models import student as student_io
from components.models.runtimes import TextEncoder, ort_session
from components.models.teacher import load_saved
from components.serving.bundle import preprocessing
from components.stage import StageError, stage_main
from components.text.batches import encode
from components.text.datasets import batches, pad_batch
from components.text.encoding import INPUTS, OUTPUTS, pad_id


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


# --------------------------------------------------------------------------- static INT8


def split_head(params: Params, split: str, n: int) -> list[str]:
    """The first `n` texts of a prepared split, read only as far as needed."""
    texts: list[str] = []
    for batch in iter_split_texts(params.paths, split, batch_rows=max(1, min(n, BATCH_ROWS))):
        texts += batch[: n - len(texts)]
        if len(texts) >= n:
            break
    return texts


def static_calibration(params: Params, encoder: TextEncoder) -> list[dict[str, np.ndarray]]:
    """The first `calibration_batches` batches of `calibration_batch_size` *training* texts,
    tokenised and padded as evaluate feeds a graph (`encoder`, per-batch right padding). Train,
    so that the agreement with FP32 is measured on validation texts calibration never saw."""
    cfg = params.export.static_int8
    texts = split_head(params, "train", cfg.calibration_batches * cfg.calibration_batch_size)
    ids = encoder.ids(texts)
    if not ids:
        raise StageError("the train split is empty: static INT8 calibration needs examples "
                         "(or set export.static_int8.enabled: false)")
    size = cfg.calibration_batch_size
    return [dict(zip(INPUTS, (t.numpy() for t in encoder.batch(ids[i : i + size])),
                     strict=True))
            for i in range(0, len(ids), size)]


# Validation texts an INT8 graph's agreement with FP32 is measured on (all of a small split).
AGREEMENT_EXAMPLES = 1024


def heldout_batches(params: Params, encoder: TextEncoder) -> list[tuple[torch.Tensor, ...]]:
    """Validation batches of `export.parity_batch_size` (at most AGREEMENT_EXAMPLES texts):
    held out from calibration, which reads train texts."""
    texts = split_head(params, "validation", AGREEMENT_EXAMPLES)
    ids = encoder.ids(texts)
    return list(batches(ids, params.export.parity_batch_size, encoder.pad, encoder.min_length))


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


# --------------------------------------------------------------------------- TensorRT


def calibration_batches(params: Params, tokenizer,
                        min_length: int = 1) -> list[dict[str, np.ndarray]]:
    """`export.tensorrt.calibration_batches` real training batches of `opt_batch` examples
    (train: the engines are checked on validation batches), full length (truncated to
    `distill.max_length`), padded to the profile's shortest length."""
    cfg = params.export.tensorrt
    texts = split_head(params, "train", cfg.calibration_batches * cfg.opt_batch)
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


def run(params: Params) -> dict:
    from tokenizers import Tokenizer

    cfg = params.export
    torch.set_num_threads(params.trainer.num_threads)
    student_dir = Path(params.paths.student)
    damaged = ("it is damaged or was written by another version of the code: rerun the distill "
               "stage (dvc repro -f distill)")
    with reading(f"{student_dir} ({student_io.CONFIG_FILE}, {student_io.WEIGHTS_FILE})",
                 "the student model", damaged):
        model = student_io.load(student_dir)
    with reading(student_dir / STUDENT_TOKENIZER, "the student's tokenizer", damaged):
        tokenizer = Tokenizer.from_file(str(student_dir / STUDENT_TOKENIZER))
    encoder = TextEncoder(tokenizer, params.distill.max_length, model.cfg.min_tokens())
    data = parity_batches(params, encoder)
    static = cfg.static_int8.enabled

    with atomic_dir(params.paths.export, params, "export") as out:
        sc = model.cfg
        metrics = {"opset": cfg.opset, "min_tokens": sc.min_tokens(),
                   **export_model(model, data, out, STUDENT_FP32,
                                  STUDENT_INT8 if cfg.int8 else None, cfg, sc.heads, sc.hidden,
                                  STUDENT_STATIC_INT8 if static else None,
                                  static_calibration(params, encoder) if static else None,
                                  heldout_batches(params, encoder))}
        metrics["tensorrt"] = export_engines(
            params, out / STUDENT_FP32, out, data, tokenizer, sc.min_tokens())
        shutil.copyfile(student_dir / STUDENT_TOKENIZER, out / STUDENT_TOKENIZER)
        write_json(out / STUDENT_PREPROCESSING, preprocessing(
            tokenizer.to_str(), encoder.pad, params.distill.max_length, sc.min_tokens()))
        if cfg.teacher:
            teacher, hf_tok = load_saved(params.paths.teacher, attn_implementation="eager")
            t_tok = hf_tok.backend_tokenizer
            t_enc = TextEncoder(t_tok, params.teacher.max_length)
            t_data = parity_batches(params, t_enc)
            tc = teacher.hf.config
            metrics["teacher"] = export_model(
                teacher, t_data, out, TEACHER_FP32, TEACHER_INT8 if cfg.int8 else None, cfg,
                tc.num_attention_heads, tc.hidden_size,
                TEACHER_STATIC_INT8 if static else None,
                static_calibration(params, t_enc) if static else None,
                heldout_batches(params, t_enc))
            t_tok.save(str(out / TEACHER_TOKENIZER))
            write_json(out / TEACHER_PREPROCESSING, preprocessing(
                t_tok.to_str(), pad_id(t_tok), params.teacher.max_length))
        write_json(out / "metrics.json", metrics)
    line = f"export: student ONNX parity max abs error {metrics['fp32']['max_abs_error']:.2e}"
    for key, name in (("int8", "INT8"), ("static_int8", "static INT8")):
        if key in metrics:
            line += f", {name} argmax agreement {metrics[key]['argmax_agreement']:.3f}"
    if cfg.teacher:
        t = metrics["teacher"]
        line += f"; teacher parity {t['fp32']['max_abs_error']:.2e}"
        for key, name in (("int8", "INT8"), ("static_int8", "static INT8")):
            if key in t:
                line += f", {name} agreement {t[key]['argmax_agreement']:.3f}"
    print(line + f"; TensorRT {metrics['tensorrt']['status']}")
    return metrics


def main() -> None:
    stage_main("export", run)


if __name__ == "__main__":
    main()
