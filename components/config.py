"""Typed, validated view of params.yaml: the only place params are read.

`load_params()` returns a `Params` object with one section per stage. Every problem in the file
(wrong type, unknown key, impossible combination) is gathered into a single `ParamsError` whose
message names each offending key, so a user fixes params.yaml in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message lists every problem with its key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    data: str
    tokenizer: str
    teacher: str
    teacher_outputs: str
    student: str
    export: str
    evaluate: str
    wandb: str


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
    precision: str = "32-true"
    num_threads: int = Field(2, ge=1)


class Prepare(_Section):
    source: str
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "folder", "hf"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    hf_split: str = "train"
    min_chars: int = Field(1, ge=1)
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    deduplicate: bool = True
    # skip: drop bad rows (malformed, undecodable, empty, unlabeled, classes too small to split)
    # and count them in report.json; error: stop, naming them.
    on_bad_rows: Literal["skip", "error"] = "skip"

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> Prepare:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "validation_fraction + test_fraction must be < 0.9 so the train split keeps data"
            )
        return self


class Tokenizer(_Section):
    type: Literal["bpe", "wordpiece", "unigram"] = "wordpiece"
    vocab_size: int = 8000
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = True

    @field_validator("vocab_size")
    @classmethod
    def _room_beyond_special_tokens(cls, v: int) -> int:
        if v <= len(SPECIAL_TOKENS):
            raise ValueError(f"must be larger than the {len(SPECIAL_TOKENS)} special tokens "
                             f"{list(SPECIAL_TOKENS)} so the tokenizer learns any real token")
        return v

    @model_validator(mode="after")
    def _bpe_has_room_beyond_its_bytes(self) -> Tokenizer:
        floor = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from all 256 bytes
        if self.type == "bpe" and self.vocab_size <= floor:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} leaves byte-level BPE no "
                             f"merges: it starts from 256 byte tokens + {len(SPECIAL_TOKENS)} "
                             f"special tokens; use more than {floor} (or type wordpiece)")
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


class Merge(_Section):
    """Token merging inside the student (ToMe bipartite soft matching / PiToMe energy)."""

    method: Literal["none", "tome", "pitome"] = "none"
    r: int = Field(0, ge=0)  # tokens removed by each merging layer (fixed: ONNX-friendly)
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
            # The last merging layer still needs r tokens on each side of the bipartite split
            # plus [CLS]: the same bound as StudentConfig.min_tokens().
            needed = m.r * (merging + 1) + 2
            if needed > self.max_length:
                problems.append(
                    f"distill.merge.r: r={m.r} over {merging} layer(s) needs sequences of "
                    f"{needed} tokens, more than distill.max_length={self.max_length}"
                )
        if self.feature.hidden_weight > 0 and not self.feature.layer_map:
            problems.append("distill.feature.hidden_weight: > 0 needs distill.feature.layer_map")
        bad_map = [k for k in self.feature.layer_map if not 0 <= k < self.layers]
        if bad_map:
            problems.append(f"distill.feature.layer_map: student layers {bad_map} outside "
                            f"0..{self.layers - 1}")
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


class Export(_Section):
    opset: int = Field(17, ge=14, le=21)
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, ge=0)
    parity_batches: int = Field(4, ge=1)
    parity_batch_size: int = Field(16, ge=1)
    int8: bool = True
    tensorrt: TensorRT = TensorRT()


class Cascade(_Section):
    enabled: bool = True
    student: str = "student_onnx"  # the evaluated system that answers first
    confidence: Literal["max_prob", "margin", "entropy"] = "max_prob"
    thresholds: int = Field(51, ge=2)  # evenly spaced in [0, 1]
    target_accuracy: float | None = Field(None, ge=0, le=1)  # None: teacher's minus tolerance
    tolerance: float = Field(0.005, ge=0, le=1)


class Evaluate(_Section):
    latency_batch_size: int = Field(1, ge=1)
    latency_examples: int = Field(100, ge=1)
    warmup: int = Field(10, ge=0)
    throughput_batch_size: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)  # timed passes; the median is reported
    num_threads: int = Field(2, ge=1)
    cascade: Cascade = Cascade()


class Params(_Section):
    seed: int = 42
    paths: Paths
    tracking: Tracking = Tracking()
    trainer: Trainer = Trainer()
    prepare: Prepare
    tokenizer: Tokenizer = Tokenizer()
    teacher: Teacher
    distill: Distill
    export: Export = Export()
    evaluate: Evaluate = Evaluate()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(item: str) -> tuple[str, Any]:
    """Parse `key.sub=value`; the value is read as YAML so `3`, `true`, `1e-3` get their types."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {item!r} is not of the form key.sub=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides applied (new keys are kept, then rejected
    by validation if unknown, so a typo in an override is reported like a typo in the file)."""
    out = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo? see params.yaml for the accepted keys)"
        if e["type"] == "missing":
            lines.append(f"  - {key}: required key is missing")
        elif isinstance(e.get("input"), dict | list):  # a section-level check: no dump
            lines.append(f"  - {key}: {msg}")
        else:
            lines.append(f"  - {key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate(raw: dict[str, Any], origin: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        n = len(err.errors())
        raise ParamsError(f"{origin} has {n} problem(s):\n{format_errors(err)}") from None


def load_params(
    path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Params:
    """Read, override and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    return validate(apply_overrides(raw, overrides or {}), origin=str(path))
