"""The student: a small transformer encoder classifier, written out in plain PyTorch ops so that
attention internals (keys, sizes, masks) are reachable for token merging and every op exports to
ONNX with dynamic batch and sequence axes.

Two block layouts (`norm_position`): "pre" (pre-LayerNorm blocks and a final LayerNorm, the
layout of a student trained from scratch) and "post" (BERT's post-LayerNorm blocks, no final
LayerNorm), the layout of a student initialised from the teacher's own layers by
`from_teacher` (DistilBERT-style: a subset of the teacher's layers, its embeddings and so its
tokenizer).

Token merging (optional, `merge_method` tome|pitome): in each merging layer, after attention
(post-LN: after its LayerNorm) and before the MLP (where ToMe merges), `r` tokens are merged
into their most similar partners using the attention keys (`components.models.merging`).
Every slot carries a size (how many input tokens it stands for): attention adds log(size) to
its logits (proportional attention) and mean pooling weights by size. A merging model needs
at least `min_tokens()` positions; callers pad short batches up to it
(`tensors.pad_batch(..., min_length=...)`), and padded positions never change real tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from components.config import merge_min_tokens
from components.stage import StageError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Additive mask value: large enough to zero a softmax weight, finite so a fully padded row
# stays NaN-free in FP16/INT8 runtimes.
MASK_VALUE = -1e4
NORM_POSITIONS = ("pre", "post")


@dataclass(frozen=True)
class StudentConfig:
    vocab_size: int
    num_labels: int
    max_length: int = 128
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024
    dropout: float = 0.1
    pooling: str = "cls"
    pad_id: int = 0
    merge_method: str = "none"  # none|tome|pitome
    merge_r: int = 0  # tokens removed per merging layer
    merge_layers: tuple[int, ...] = ()  # () = every layer
    protect_first: bool = True
    proportional_attention: bool = True
    pitome_margin: float = 0.9
    pitome_alpha: float = 1.0
    # "pre": x + attn(LN(x)), x + mlp(LN(x)), final LN. "post" (BERT): LN(x + attn(x)),
    # LN(x + mlp(x)), no final LN. Saved students without these keys are "pre" with 1e-5.
    norm_position: str = "pre"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")

    def merging_layers(self) -> list[int]:
        if self.merge_method == "none" or self.merge_r == 0:
            return []
        return sorted(self.merge_layers) if self.merge_layers else list(range(self.layers))

    def min_tokens(self) -> int:
        """Shortest input this model accepts (`config.merge_min_tokens`)."""
        return merge_min_tokens(self.merge_r, len(self.merging_layers()))


class SelfAttention(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the attention output and the keys averaged over heads ([B, N, head_dim]),
        which token merging uses as its similarity signal."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + bias
        weights = self.drop(scores.softmax(dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d)), k.mean(dim=1)


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig, index: int = 0):
        super().__init__()
        self.cfg = cfg
        self.r = cfg.merge_r if index in cfg.merging_layers() else 0
        if self.r and cfg.merge_method == "pitome":
            from components.models.merging import pitome_margin

            self.margin = pitome_margin(index, cfg.layers, cfg.pitome_margin)
        else:
            self.margin = cfg.pitome_margin
        self.post_norm = cfg.norm_position == "post"
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.intermediate), nn.GELU(),
            nn.Linear(cfg.intermediate, cfg.hidden), nn.Dropout(cfg.dropout),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor):
        """x [B, N, D], mask [B, N] (1 real), sizes [B, N, 1] -> the same, N shrunk by r."""
        bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
        if self.cfg.proportional_attention and self.cfg.merging_layers():
            from components.models.merging import proportional_attention_bias

            bias = bias + proportional_attention_bias(sizes)
        attn, keys = self.attn(x if self.post_norm else self.norm1(x), bias)
        x = x + self.drop(attn)
        if self.post_norm:
            x = self.norm1(x)
        if self.r:
            from components.models.merging import merge_tokens

            x, sizes, mask = merge_tokens(
                x, keys, sizes, mask, self.r, method=self.cfg.merge_method,
                protect_first=self.cfg.protect_first, margin=self.margin,
                alpha=self.cfg.pitome_alpha)
        if self.post_norm:
            return self.norm2(x + self.mlp(x)), mask, sizes
        return x + self.mlp(self.norm2(x)), mask, sizes


class Student(nn.Module):
    """`forward(input_ids, attention_mask) -> logits`; `features()` also returns the pooled
    representation and every layer's hidden states for feature distillation."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_length, cfg.hidden)
        self.emb_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        # Post-LN blocks already end in a LayerNorm.
        self.norm = (nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
                     if cfg.norm_position == "pre" else nn.Identity())
        self.head = nn.Linear(cfg.hidden, cfg.num_labels)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Returns (logits [B, C], pooled [B, D], layer_pooled [B, layers + 1, D]): the last is
        the size-weighted mean of the real tokens after the embeddings and after each block,
        which feature distillation matches to the teacher's pooled layers."""
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
        x = self.emb_drop(self.emb_norm(self.tokens(input_ids) + self.positions(positions)))
        mask = attention_mask.to(x.dtype)
        sizes = mask.unsqueeze(-1)
        layer_pooled = [_weighted_mean(x, sizes)]
        for block in self.blocks:
            x, mask, sizes = block(x, mask, sizes)
            layer_pooled.append(_weighted_mean(x, sizes))
        x = self.norm(x)
        pooled = x[:, 0] if self.cfg.pooling == "cls" else _weighted_mean(x, sizes)
        return self.head(pooled), pooled, torch.stack(layer_pooled, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.features(input_ids, attention_mask)[0]


def _weighted_mean(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, each counted as many times as the inputs it stands for
    (pads have size 0)."""
    return (x * sizes).sum(1) / sizes.sum(1).clamp(min=1e-6)


def save(model: Student, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(model.cfg), indent=2, sort_keys=True))


def load(folder: str | Path) -> Student:
    """Load a saved student (safetensors only: no pickle is ever read)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise StageError(
                f"{folder / name} not found: run the distill stage (dvc repro distill)")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    raw["merge_layers"] = tuple(raw.get("merge_layers", ()))
    cfg = StudentConfig(**raw)
    model = Student(cfg)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise StageError(f"{folder / WEIGHTS_FILE} is not a valid safetensors file ({err}); "
                         "rerun the distill stage (dvc repro -f distill)") from None
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------- initialised from the teacher

# What the teacher decides: the rest of StudentConfig is the caller's (`from_teacher(**settings)`).
TEACHER_DEFINED = ("vocab_size", "layers", "hidden", "heads", "intermediate", "norm_position",
                   "layer_norm_eps")
# Hugging Face's "gelu" is the exact (erf) GELU, which is what nn.GELU() computes.
SUPPORTED_ACTIVATIONS = ("gelu",)


def from_teacher(teacher_folder: str | Path, layers: Sequence[int], *, num_labels: int,
                 **settings) -> Student:
    """A post-LN student made of `layers` of a BERT teacher (DistilBERT-style initialisation).

    Copied from the teacher: the word embeddings (so the student must use the teacher's
    tokenizer), the first `max_length` position embeddings, the embeddings LayerNorm and, for
    each chosen layer in the order given, its query/key/value (fused into `qkv`), attention
    output, intermediate and output dense layers and both LayerNorms. Width, heads, MLP size,
    LayerNorm epsilon and vocabulary come from the teacher's config.

    Differences from Hugging Face's BertModel, on purpose: the student has no token types, so
    `token_type_embeddings[0]` (segment 0, what every single-text input uses) is folded into the
    position embeddings; there is no pooler (the student pools `cls` or `mean` itself); the
    classification head is new (normal, std 0.02) even when the teacher has one, since it sits
    on another representation; pads are masked with `MASK_VALUE` instead of the dtype minimum
    (the same softmax weights, 0, in FP32). With all layers and dropout off, every hidden state
    equals the teacher's (tests/test_student_init.py).

    Args:
        teacher_folder: a Hugging Face BERT folder (`config.json` + `model.safetensors` or a
            sharded safetensors index), a BertModel or any BERT with a head (keys prefixed
            `bert.`, e.g. BertForSequenceClassification).
        layers: 0-based teacher layers, distinct and increasing (`spread_layers` picks some).
        num_labels: classes of the new head.
        **settings: any other `StudentConfig` field (max_length, dropout, pooling, pad_id,
            merge_*); `pad_id` defaults to the teacher's `pad_token_id`. The fields in
            `TEACHER_DEFINED` are not accepted.

    Raises:
        StageError: the folder is not a BERT teacher this can copy, `layers` is not a list of
            distinct increasing layer indices of the teacher, `max_length` exceeds the
            teacher's position embeddings, or a setting is unknown or teacher-defined.
    """
    folder = Path(teacher_folder)
    hf = _bert_config(folder)
    layers = _checked_layers(layers, hf["num_hidden_layers"], folder)
    known = {f.name for f in fields(StudentConfig)} - set(TEACHER_DEFINED) - {"num_labels"}
    unknown = sorted(set(settings) - known)
    if unknown:
        defined = sorted(set(unknown) & set(TEACHER_DEFINED))
        why = (f"{defined} come from the teacher's config.json" if defined
               else f"not StudentConfig fields; accepted: {sorted(known)}")
        raise StageError(f"from_teacher: unexpected settings {unknown} ({why})")
    cfg = StudentConfig(
        vocab_size=hf["vocab_size"], num_labels=num_labels, layers=len(layers),
        hidden=hf["hidden_size"], heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"], norm_position="post",
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        **{"pad_id": hf.get("pad_token_id") or 0, **settings})
    if cfg.max_length > hf["max_position_embeddings"]:
        raise StageError(
            f"max_length={cfg.max_length} exceeds the {hf['max_position_embeddings']} positions "
            f"of the teacher in {folder}; lower max_length")
    model = Student(cfg)
    missing, unexpected = model.load_state_dict(
        _student_weights(folder, layers, cfg.max_length), strict=False)
    if set(missing) != {"head.weight", "head.bias"} or unexpected:
        raise AssertionError(f"teacher weights do not cover the student: missing {missing}, "
                             f"unexpected {unexpected}")
    return model


def spread_layers(teacher_layers: int, count: int) -> list[int]:
    """`count` of `teacher_layers` layers evenly spread from the first to the last (both kept:
    the first still fits the embeddings, the last produces what the teacher's head reads);
    one layer alone is the first."""
    if not 1 <= count <= teacher_layers:
        raise StageError(f"cannot pick {count} of the teacher's {teacher_layers} layers")
    if count == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (count - 1)) for i in range(count)]


def _bert_config(folder: Path) -> dict:
    """The teacher's config.json, refused unless it describes a BERT encoder this can copy."""
    path = folder / "config.json"
    if not path.is_file():
        raise StageError(f"{path} not found: from_teacher needs a Hugging Face model folder")
    hf = json.loads(path.read_text())
    problems = []
    if hf.get("model_type") != "bert":
        problems.append(f"model_type is {hf.get('model_type')!r}, only 'bert' is supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type is {hf['position_embedding_type']!r}, "
                        "only 'absolute' is supported")
    if hf.get("hidden_act", "gelu") not in SUPPORTED_ACTIVATIONS:
        problems.append(f"hidden_act is {hf['hidden_act']!r}, the student supports "
                        f"{SUPPORTED_ACTIVATIONS}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        problems.append("it is a decoder; only a bidirectional encoder can be copied")
    if problems:
        raise StageError(f"the teacher in {folder} cannot initialise a student: "
                         + "; ".join(problems))
    return hf


def _checked_layers(layers: Sequence[int], available: int, folder: Path) -> list[int]:
    layers = list(layers)
    if (not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
            or any(not 0 <= i < available for i in layers)
            or any(a >= b for a, b in zip(layers, layers[1:], strict=False))):
        raise StageError(
            f"teacher layers {layers}: give distinct, increasing 0-based indices of the "
            f"{available} layers of the teacher in {folder} (0..{available - 1})")
    return layers


def _teacher_tensors(folder: Path):
    """Name -> safetensors file for every weight of the teacher (single file or sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise StageError(f"{folder} has no model.safetensors (pickled checkpoints are never "
                         "read): save the teacher with save_pretrained(safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _weight_plan(layers: list[int]) -> dict[str, list[str]]:
    """Student weight name -> the teacher tensors it is made of (Hugging Face names, no prefix)."""
    emb = "embeddings."
    plan = {
        "tokens.weight": [emb + "word_embeddings.weight"],
        # Every input is segment 0: its token-type embedding is added to each position's.
        "positions.weight": [emb + "position_embeddings.weight",
                             emb + "token_type_embeddings.weight"],
        "emb_norm.weight": [emb + "LayerNorm.weight"],
        "emb_norm.bias": [emb + "LayerNorm.bias"],
    }
    for i, t in enumerate(layers):
        src, dst = f"encoder.layer.{t}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            # qkv(x).view(..., 3, heads, head_dim): rows are [query; key; value], each in BERT's
            # own head-major order, so the three matrices are simply stacked.
            plan[f"{dst}attn.qkv.{kind}"] = [f"{src}attention.self.{p}.{kind}"
                                             for p in ("query", "key", "value")]
            for ours, theirs in (("attn.out", "attention.output.dense"),
                                 ("norm1", "attention.output.LayerNorm"),
                                 ("mlp.0", "intermediate.dense"),
                                 ("mlp.2", "output.dense"),
                                 ("norm2", "output.LayerNorm")):
                plan[f"{dst}{ours}.{kind}"] = [f"{src}{theirs}.{kind}"]
    return plan


def _student_weights(folder: Path, layers: list[int], max_length: int) -> dict:
    """The student's state dict (all but the head) from the teacher's safetensors."""
    import contextlib

    from safetensors import safe_open

    plan = _weight_plan(layers)
    try:
        with contextlib.ExitStack() as files:
            where = _teacher_tensors(folder)
            # A bare BertModel has no prefix; BertFor* models nest it under "bert.".
            anchor = plan["tokens.weight"][0]
            prefixes = [k[: -len(anchor)] for k in where if k.endswith(anchor)]
            if len(prefixes) != 1:
                raise StageError(
                    f"{folder}: expected one '*{anchor}' tensor, found {len(prefixes)}")
            needed = {prefixes[0] + name for names in plan.values() for name in names}
            missing = sorted(needed - set(where))
            if missing:
                raise StageError(f"{folder} is not a BERT checkpoint: no {missing[:3]}"
                                 + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
            handles = {path: files.enter_context(safe_open(str(path), "pt"))
                       for path in {where[name] for name in needed}}

            def get(name: str) -> torch.Tensor:
                name = prefixes[0] + name
                return handles[where[name]].get_tensor(name).float()

            state = {ours: torch.cat([get(name) for name in names])
                     for ours, names in plan.items() if ours != "positions.weight"}
            position, token_type = plan["positions.weight"]
            state["positions.weight"] = get(position)[:max_length] + get(token_type)[:1]
    except StageError:
        raise
    except Exception as err:  # safetensors and json raise their own types for damaged files
        raise StageError(f"the teacher weights in {folder} cannot be read ({err}); point it at "
                         "an intact BERT folder") from None
    return state
