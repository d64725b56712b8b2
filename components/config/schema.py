"""Typed, validated view of params.yaml: the only place params are read.

`load_params()` returns a `Params` object with one section per stage. Every problem in the file
(wrong type, unknown key, impossible combination) is gathered into a single `ParamsError` whose
message names each offending key, so a user fixes params.yaml in one pass.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The smallest prepare.max_chars: a few pages of text, more than any model here reads of a text
# (its max_length tokens, or the distill windows' first few hundred words).
MIN_MAX_CHARS = 10_000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Lightning's accepted `precision=` values, copied from lightning_fabric.plugins.precision.precision
# (_PRECISION_INPUT_STR, _PRECISION_INPUT_INT and the legacy _PRECISION_INPUT_STR_ALIAS), so a typo
# fails here instead of at the start of training; importing Lightning would take seconds.
LightningPrecision = Literal[
    "16-mixed", "bf16-mixed", "32-true", "64-true", "16-true", "bf16-true",
    "transformer-engine", "transformer-engine-float16",
    16, 32, 64, "16", "32", "64", "bf16",
]


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message lists every problem with its key."""


def _mentions(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a type annotation names one of `kinds` anywhere (`int | None`, `dict[int, int]`)."""
    if annotation in kinds:
        return True
    return any(_mentions(arg, kinds) for arg in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(_holds_bool(k) or _holds_bool(v) for k, v in value.items())
    return isinstance(value, list | tuple) and any(_holds_bool(v) for v in value)


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf`/`.nan` pass every `gt=`/`ge=` bound (nan compares false both
    # ways, inf is "greater than 0"), yet no learning rate, tolerance or weight can be infinite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `true` as 1 for an int or float field, and YAML 1.1 reads
        `yes`/`on` (e.g. `--set distill.epochs=yes`) as true: refuse a boolean wherever the field
        takes numbers and no booleans. (`strict=True` would also refuse `2.0` for an int and an
        int for a float, which YAML produces all the time.)"""
        annotation = cls.model_fields[info.field_name].annotation
        if (_holds_bool(value) and _mentions(annotation, (int, float))
                and not _mentions(annotation, (bool,))):
            raise ValueError("expected a number, not a boolean (true/false/yes/no/on/off)")
        return value


class Paths(_Section):
    """Where every stage writes. These are fixed: dvc.yaml names the same locations literally
    (outs, deps, metrics, plots; tests/test_contract.py keeps the two equal) and params.yaml has
    no `paths:` section (`load_params` refuses one), because DVC deletes a stage's declared
    outputs before it runs the stage: no params value may decide what gets deleted. Code that
    builds params itself (tests, notebooks: `validate(raw)`) may point them at other folders;
    `path_problems` checks those. To keep outputs on a bigger disk, put DVC's cache there
    (`dvc cache dir PATH`, `dvc config cache.type symlink`): the workspace then holds links."""

    source_version: str = "data/source.json"  # source: what identifies prepare.source's data
    data: str = "data/prepared"  # prepare: train/validation/test Parquet, label map, report
    tokenizer: str = "artifacts/tokenizer"  # tokenizer: tokenizer.json + metrics.json
    teacher: str = "artifacts/teacher"  # teacher: HF folder (safetensors) + metrics.json
    teacher_outputs: str = "artifacts/teacher_outputs"  # teacher_cache: its cached outputs
    student: str = "artifacts/student"  # distill: model.safetensors + config + metrics.json
    export: str = "artifacts/export"  # export: ONNX graphs, parity.json
    evaluate: str = "artifacts/evaluate"  # evaluate: quality.json (what predictions decide)
    # evaluate's measured speed and the decisions that follow from it: git-tracked, declared
    # as DVC metrics and plots but not as an output (timings stay out of dvc.lock).
    results: str = "results"
    bundle: str = "artifacts/bundle"  # ship: what a user deploys (rebuilt on every repro)
    wandb: str = "artifacts/wandb"  # W&B run files (offline runs sync later)


class Tracking(_Section):
    project: str = "still"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "offline"


class Trainer(_Section):
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "auto"
    devices: int | str = 1
    # Lightning's own multi-device / multi-node training: any registered strategy name
    # ("auto", "ddp", "fsdp", "deepspeed", ...); no custom distributed code here.
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: LightningPrecision = "32-true"
    num_threads: int = Field(2, ge=1)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty: an empty location means the working folder, i.e. the "
                         "project itself; name a file, folder, URI, hub id or pkg:MODULE/path")
    return value


class Prepare(_Section):
    source: str
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "folder", "hf"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    hf_split: str = "train"
    min_chars: int = Field(1, ge=1)
    # Longer texts are cut at a word boundary (whitespace) at or before this many characters and
    # counted (report.json `truncated`): a whole book in one row would otherwise cost every
    # later stage time for text no model reads. The floor is far beyond what a model reads.
    max_chars: int = Field(1_000_000, ge=MIN_MAX_CHARS)
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    deduplicate: bool = True
    # skip: drop bad rows (malformed, undecodable, empty, unlabeled, classes too small to split)
    # and count them in report.json; error: stop, naming them.
    on_bad_rows: Literal["skip", "error"] = "skip"
    # Label names are always NFC-normalised and stripped; these two merge more spellings into
    # one class (every merge is listed in report.json `label_merges`).
    labels_casefold: bool = True  # "Spam", "SPAM" -> "spam"
    labels_numeric: bool = True  # "1", "1.0", "01", 1 -> "1"
    # The longest wait (seconds) for a remote source to answer: connecting, fsspec's retries and
    # re-requests, and any stall of a read (a download that keeps coming is never cut). A silent
    # server fails the stage after this long; a wait over 5 s prints what it waits for.
    timeout_s: float = Field(60.0, gt=0)

    _source_not_blank = field_validator("source")(_not_blank)

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> Prepare:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "validation_fraction + test_fraction must be < 0.9 so the train split keeps data"
            )
        return self

    @model_validator(mode="after")
    def _max_chars_above_min_chars(self) -> Prepare:
        if self.max_chars < self.min_chars:
            raise ValueError(f"prepare.max_chars={self.max_chars} is below prepare.min_chars="
                             f"{self.min_chars}: every text would be too short or cut")
        return self

    @model_validator(mode="after")
    def _text_and_label_are_different_columns(self) -> Prepare:
        if self.text_column == self.label_column:
            raise ValueError(
                f"prepare.text_column and prepare.label_column are both {self.text_column!r}: "
                "the label would be the text itself; name two different columns")
        return self


class Tokenizer(_Section):
    type: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = 16000
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = True
    # Vocabulary sizes the stage also trains, to report text covered vs size; [] = none.
    curve_vocab_sizes: list[int] = [4000, 8000, 16000, 24000, 32000]

    @field_validator("vocab_size")
    @classmethod
    def _room_beyond_special_tokens(cls, v: int) -> int:
        if v <= len(SPECIAL_TOKENS):
            raise ValueError(f"must be larger than the {len(SPECIAL_TOKENS)} special tokens "
                             f"{list(SPECIAL_TOKENS)} so the tokenizer learns any real token")
        return v

    @field_validator("curve_vocab_sizes")
    @classmethod
    def _distinct_sizes_beyond_special_tokens(cls, sizes: list[int]) -> list[int]:
        problems = []
        repeated = sorted({v for v in sizes if sizes.count(v) > 1})
        if repeated:
            problems.append(f"lists {repeated} more than once (each size is one point of the "
                            "curve)")
        small = [v for v in sizes if v <= len(SPECIAL_TOKENS)]
        if small:
            problems.append(f"sizes {small} are not larger than the {len(SPECIAL_TOKENS)} "
                            f"special tokens {list(SPECIAL_TOKENS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return sizes

    @model_validator(mode="after")
    def _bpe_has_room_beyond_its_bytes(self) -> Tokenizer:
        floor = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from all 256 bytes
        if self.type != "bpe":
            return self
        why = (f"leaves byte-level BPE no merges: it starts from 256 byte tokens + "
               f"{len(SPECIAL_TOKENS)} special tokens; use more than {floor} (or type wordpiece)")
        problems = []
        if self.vocab_size <= floor:
            problems.append(f"tokenizer.vocab_size={self.vocab_size} {why}")
        small = [v for v in self.curve_vocab_sizes if v <= floor]
        if small:
            problems.append(f"tokenizer.curve_vocab_sizes: {small} {why}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class _Optim(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(ge=8, le=8192)


class Teacher(_Optim):
    model: str
    finetune: Literal["auto", "always", "never"] = "auto"
    eval_batch_size: int = Field(64, ge=1)

    _model_not_blank = field_validator("model")(_not_blank)


class Merge(_Section):
    """Token merging inside the student (ToMe bipartite soft matching / PiToMe energy)."""

    method: Literal["none", "tome", "pitome"] = "tome"
    r: int = Field(8, ge=0)  # tokens removed by each merging layer (fixed: ONNX-friendly)
    layers: list[int] = Field(default_factory=list)  # 0-based layers that merge; [] = all
    protect_first: bool = True  # never merge the [CLS]/first token
    proportional_attention: bool = True  # add log(size) to attention logits
    pitome_margin: float = Field(0.9, gt=-1, lt=1)  # PiToMe energy margin at the first layer
    pitome_alpha: float = Field(1.0, gt=0)  # PiToMe: slope of the energy below the margin


class FeatureDistill(_Section):
    """Hidden-state distillation terms added to the logit KD loss."""

    pooled_weight: float = Field(0.0, ge=0)  # MSE(proj(student pooled), teacher pooled)
    hidden_weight: float = Field(0.0, ge=0)  # per-layer MSE via learned projections
    layer_map: dict[int, int] = Field(default_factory=dict)  # student layer -> teacher layer


class Windows(_Section):
    """Distil on more of each text: every training text is sliced into windows of `words`
    whitespace-separated words, `stride` words apart (the first starts at word `stride`: the
    training example itself already covers the text's start), at most `max_per_text` per text.
    The teacher_cache stage runs the teacher on every window once; distill trains on the examples
    and the windows (KD on the teacher's logits, hard labels from the text's label)."""

    enabled: bool = True
    words: int = Field(48, ge=1)
    stride: int = Field(48, ge=1)
    max_per_text: int = Field(8, ge=1)


def merge_min_tokens(r: int, merging_layers: int) -> int:
    """Shortest input a token-merging student accepts: the last merging layer still needs r
    mergeable tokens on each side of the bipartite split, plus the protected [CLS]."""
    return r * (merging_layers + 1) + 2 if merging_layers and r else 1


class Distill(_Optim):
    layers: int = Field(ge=1)
    hidden: int = Field(ge=8)
    heads: int = Field(ge=1)
    intermediate: int = Field(ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    pooling: Literal["cls", "mean"] = "cls"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    patience: int = Field(3, ge=1)
    merge: Merge = Merge()
    feature: FeatureDistill = FeatureDistill()
    # scratch: a new pre-LN student on the domain tokenizer (layers/hidden/heads/intermediate
    # as set here). teacher: DistilBERT-style, `layers` of the teacher's own layers (evenly
    # spread, or exactly `teacher_layers`), its embeddings and its tokenizer; the width comes
    # from the teacher, so hidden/heads/intermediate are not used.
    init: Literal["scratch", "teacher"] = "scratch"
    teacher_layers: list[int] = Field(default_factory=list)  # 0-based teacher layers; [] = even
    windows: Windows = Windows()

    @model_validator(mode="after")
    def _consistent(self) -> Distill:
        # Each problem names its full key; all of them are reported together.
        problems = []
        if self.hidden % self.heads:
            problems.append(f"distill.heads: hidden ({self.hidden}) must be divisible by heads "
                            f"({self.heads})")
        m = self.merge
        bad_layers = [i for i in m.layers if not 0 <= i < self.layers]
        if bad_layers:
            problems.append(f"distill.merge.layers: {bad_layers} outside 0..{self.layers - 1}")
        if m.method != "none":
            merging = len(m.layers or range(self.layers))
            needed = merge_min_tokens(m.r, merging)
            if needed > self.max_length:
                problems.append(
                    f"distill.merge.r: r={m.r} over {merging} layer(s) needs sequences of "
                    f"{needed} tokens, more than distill.max_length={self.max_length}"
                )
        if self.teacher_layers and self.init != "teacher":
            problems.append("distill.teacher_layers: only used with distill.init: teacher")
        if self.teacher_layers and len(self.teacher_layers) != self.layers:
            problems.append(f"distill.teacher_layers: {len(self.teacher_layers)} layers listed "
                            f"but distill.layers is {self.layers}")
        if self.teacher_layers != sorted(set(self.teacher_layers)) or any(
                i < 0 for i in self.teacher_layers):
            problems.append(f"distill.teacher_layers: {self.teacher_layers} must be distinct, "
                            "increasing 0-based layer indices")
        if self.feature.hidden_weight > 0 and not self.feature.layer_map:
            problems.append("distill.feature.hidden_weight: > 0 needs distill.feature.layer_map")
        bad_map = [k for k in self.feature.layer_map if not 0 <= k < self.layers]
        if bad_map:
            problems.append(f"distill.feature.layer_map: student layers {bad_map} outside "
                            f"0..{self.layers - 1}")
        negative = sorted(t for t in self.feature.layer_map.values() if t < 0)
        if negative:
            problems.append(f"distill.feature.layer_map: teacher layers {negative} are negative "
                            "(0 = embeddings, 1.. = transformer layers)")
        if len(problems) == 1:
            raise ValueError(problems[0])
        if problems:
            raise ValueError(f"{len(problems)} inconsistent values:\n      - "
                             + "\n      - ".join(problems))
        return self


class TensorRT(_Section):
    """TensorRT engines (CUDA GPU + `still[trt]` only; skipped with a reason elsewhere)."""

    enabled: bool | Literal["auto"] = "auto"  # auto: build when a GPU and TensorRT exist
    precisions: list[Literal["fp16", "int8"]] = Field(default_factory=lambda: ["fp16", "int8"])
    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(8, ge=1)
    max_batch: int = Field(32, ge=1)
    min_seq: int = Field(8, ge=1)
    opt_seq: int = Field(128, ge=1)
    max_seq: int = Field(128, ge=1)
    workspace_mb: int = Field(1024, ge=64)
    calibration_batches: int = Field(8, ge=1)
    atol: float = Field(5e-2, gt=0)  # vs ONNX Runtime; FP16/INT8 drift is larger than FP32

    @model_validator(mode="after")
    def _ordered_profiles(self) -> TensorRT:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        if not self.min_seq <= self.opt_seq <= self.max_seq:
            raise ValueError("need min_seq <= opt_seq <= max_seq")
        return self


# Op types ONNX Runtime's static QDQ quantiser can quantise (its QDQ and QLinear registries,
# onnxruntime 1.32; tests/test_export.py checks each is still one). Static INT8 quantises these
# minus `export.static_int8.float_ops`, a fixed set, so a newer ORT never quantises more.
QUANTIZABLE_OPS = (
    "Add", "ArgMax", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv",
    "ConvTranspose", "CumSum", "EmbedLayerNormalization", "Flatten", "Gather", "GatherElements",
    "Gemm", "GlobalAveragePool", "InstanceNormalization", "LayerNormalization", "LeakyRelu",
    "MatMul", "MaxPool", "Mul", "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice",
    "Softmax", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where",
)


class StaticInt8(_Section):
    """ONNX Runtime static INT8 (QDQ) of each exported graph, calibrated on training batches
    (the agreement with FP32 is measured on validation texts it never saw)."""

    enabled: bool = True
    calibration_batches: int = Field(8, ge=1)  # train batches (fewer if the split is short)
    calibration_batch_size: int = Field(32, ge=1)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"  # activation ranges
    per_channel: bool = True  # one weight scale per output channel
    # false: uint8 activations with a zero point (ORT's choice for x86 CPUs); true: int8 with
    # zero point 0, the form TensorRT requires.
    activation_symmetric: bool = False
    # Op types kept in float (quantising them too measured slower and less accurate; GELU's Erf
    # is never quantised); the rest of QUANTIZABLE_OPS is quantised where ORT supports it, the
    # attention products included. MatMul is always quantised.
    float_ops: list[str] = Field(default_factory=lambda: [
        "Add", "Mul", "Softmax", "LayerNormalization", "Where"])

    @field_validator("float_ops")
    @classmethod
    def _known_float_ops(cls, ops: list[str]) -> list[str]:
        unknown = [op for op in ops if op not in QUANTIZABLE_OPS]
        if unknown:
            raise ValueError(f"{unknown} not op type(s) ONNX Runtime quantises (spelled as in "
                             f"ONNX, e.g. LayerNormalization); known: {', '.join(QUANTIZABLE_OPS)}")
        if "MatMul" in ops:
            raise ValueError("MatMul cannot stay float: it is where static INT8 saves the time "
                             "(turn export.static_int8.enabled off instead)")
        twice = sorted({op for op in ops if ops.count(op) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once")
        return ops


class Export(_Section):
    opset: int = Field(17, ge=14, le=21)
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, ge=0)
    parity_batches: int = Field(4, ge=1)
    parity_batch_size: int = Field(16, ge=1)
    int8: bool = True
    static_int8: StaticInt8 = StaticInt8()
    teacher: bool = True  # also export the fine-tuned teacher (the baseline a user would deploy)
    ort_optimize: bool = False  # ORT transformer optimizer on the FP32 graphs (measured slower)
    tensorrt: TensorRT = TensorRT()


# The systems evaluate can build (TensorRT ones only where an engine was built and runs).
TEACHER_SYSTEMS = ("teacher", "teacher_onnx", "teacher_onnx_int8", "teacher_onnx_static_int8")
STUDENT_SYSTEMS = ("student", "student_onnx", "student_onnx_int8", "student_onnx_static_int8",
                   "student_trt_fp16", "student_trt_int8")


def int8_switch(system: str, export: Export) -> tuple[str, bool] | None:
    """`(param key, its value)` of the export switch an ONNX INT8 system needs (the FP32
    graphs are always exported), else None."""
    if system.endswith("_onnx_static_int8"):
        return "export.static_int8.enabled", export.static_int8.enabled
    if system.endswith("_onnx_int8"):
        return "export.int8", export.int8
    return None


class Cascade(_Section):
    enabled: bool = True
    # The student system that answers first and the teacher system it defers to: fixed by
    # params (what a bundle ships), not picked from this machine's timings.
    student: Literal[STUDENT_SYSTEMS] = "student_onnx_int8"
    teacher: Literal[TEACHER_SYSTEMS] = "teacher_onnx_int8"
    confidence: Literal["max_prob", "margin", "entropy"] = "max_prob"
    thresholds: int = Field(51, ge=2)  # evenly spaced in [0, 1]
    target_accuracy: float | None = Field(None, ge=0, le=1)  # None: teacher's minus tolerance
    tolerance: float = Field(0.005, ge=0, le=1)


class Evaluate(_Section):
    latency_batch_size: int = Field(1, ge=1)
    latency_examples: int = Field(100, ge=1)
    warmup: int = Field(10, ge=0)
    throughput_batch_size: int = Field(32, ge=1)
    repeats: int = Field(5, ge=5)  # timed rounds; medians and IQRs over rounds are reported
    # A timed pass shorter than this repeats within its turn (a fixed count per round).
    min_pass_seconds: float = Field(0.3, ge=0, le=10)
    num_threads: int = Field(2, ge=1)
    bootstrap: int = Field(1000, ge=1000)  # resamples for the 95% intervals
    cascade: Cascade = Cascade()


class Ship(_Section):
    # The student `still predict` runs by default (every exported student graph ships).
    model: Literal["student_onnx", "student_onnx_int8", "student_onnx_static_int8"] = (
        "student_onnx_int8")
    # Ship the validation-chosen cascade policy and the teacher graph it defers to, when
    # evaluate chose one with ONNX systems on both sides (otherwise the student alone ships).
    cascade: bool = True


class SearchSpace(_Section):
    """The student levers a search trial may set: each a list of values to choose from (one
    value: fixed for every trial; []: not searched, params.yaml's value stays). `hidden` also
    sets `distill.intermediate` (4x); `merge_r` applies with merging, `teacher_layers` with
    `init: teacher` (whose width is the teacher's: `hidden` and `heads` do not apply)."""

    layers: list[int] = [1, 2]
    hidden: list[int] = [64, 128, 256]
    heads: list[int] = [2]
    max_length: list[int] = [32, 64, 128]
    windows: list[bool] = [True]
    init: list[Literal["scratch", "teacher"]] = ["scratch"]
    teacher_layers: list[list[int]] = []
    merge: list[Literal["none", "tome", "pitome"]] = ["none", "tome"]
    merge_r: list[int] = [8]
    vocab_size: list[int] = []

    @field_validator("*")
    @classmethod
    def _distinct_and_positive(cls, values: list, info: ValidationInfo) -> list:
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"{info.field_name}: a value is listed twice ({values})")
        for v in values:
            numbers = v if isinstance(v, list) else [v]
            if any(isinstance(n, int) and not isinstance(n, bool) and n < 0 for n in numbers):
                raise ValueError(f"{info.field_name}: values must be >= 0 (got {values})")
        return values


class Search(_Section):
    """`still search` (flows/search.py): an Optuna study over `space`, chosen on validation."""

    n_trials: int = Field(12, ge=1)
    max_parallel: int = Field(1, ge=1)  # trials at once, each a DVC experiment in a clone
    max_drop: float = Field(1.5, ge=0, le=100)  # validation points below the teacher allowed
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    population: int = Field(6, ge=2)  # NSGA-II trials per generation
    seed: int = Field(42, ge=0, lt=2**32)
    finalists: int = Field(4, ge=1)  # candidates timed side by side (the cheapest in GFLOPs)
    # Optuna storage: a journal file (relative to the repo) or a SQLAlchemy URL.
    storage: str = "artifacts/search/study.journal"
    study: str = "still-search"
    space: SearchSpace = SearchSpace()

    _storage_not_blank = field_validator("storage", "study")(_not_blank)

    @field_validator("study")
    @classmethod
    def _study_is_a_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError(f"study: {value!r} must be letters, digits, '_', '.' or '-' (it "
                             "names DVC experiments and a folder)")
        return value

    def space_dict(self) -> dict[str, list]:
        return self.space.model_dump()


class Params(_Section):
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seeds are unsigned 32-bit
    paths: Paths = Paths()  # fixed in dvc.yaml; only code that builds params sets it
    tracking: Tracking = Tracking()
    trainer: Trainer = Trainer()
    prepare: Prepare
    tokenizer: Tokenizer = Tokenizer()
    teacher: Teacher
    distill: Distill
    export: Export = Export()
    evaluate: Evaluate = Evaluate()
    ship: Ship = Ship()
    search: Search = Search()

    @model_validator(mode="after")
    def _search_storage_outside_outputs(self) -> Params:
        from components.config.paths import WRITTEN_BY  # paths imports this module

        url = self.search.storage
        if "://" in url or Path(url).is_absolute():
            return self
        where = Path(os.path.normpath(url))
        # the fixed layout (the project's) and the locations these params write to
        outputs = [*Paths().model_dump().items(), *self.paths.model_dump().items()]
        for key, out in outputs:
            if key in WRITTEN_BY and where.is_relative_to(Path(os.path.normpath(out))):
                raise ValueError(f"search.storage: {url} is inside {out}, which the "
                                 f"{WRITTEN_BY[key]} stage replaces whole: the study would be "
                                 "lost; keep it outside (default "
                                 "artifacts/search/study.journal)")
        return self

    @model_validator(mode="after")
    def _shipped_model_is_exported(self) -> Params:
        # ship.cascade with no cascade to ship (evaluate.cascade off, a PyTorch or TensorRT
        # system in it, no threshold reaching the target) is not an error: the bundle ships
        # the student alone and its card and the stage say why.
        switch = int8_switch(self.ship.model, self.export)
        if switch and not switch[1]:
            raise ValueError(f"ship.model: {self.ship.model} needs {switch[0]}: true (got "
                             "false); set it, or ship student_onnx")
        return self

    @model_validator(mode="after")
    def _cascade_systems_are_exported(self) -> Params:
        cascade, export = self.evaluate.cascade, self.export
        if not cascade.enabled:
            return self
        needs = [(cascade.teacher, "teacher_onnx" in cascade.teacher, export.teacher,
                  "export.teacher"),
                 *((name, True, switch[1], switch[0])
                   for name in (cascade.student, cascade.teacher)
                   if (switch := int8_switch(name, export)))]
        missing = [f"evaluate.cascade: {name} needs {key}: true (got false); "
                   f"set it, or pick another system" for name, needed, on, key in needs
                   if needed and not on]
        if missing:
            raise ValueError("; ".join(dict.fromkeys(missing)))
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
