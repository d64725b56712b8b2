"""The student: a small pre-LayerNorm transformer encoder classifier, written out in plain
PyTorch ops so that attention internals (keys, sizes, masks) are reachable for token merging
and every op exports to ONNX with dynamic batch and sequence axes.

Token merging (optional, `merge_method` tome|pitome): in each merging layer, after attention
and before the MLP (where ToMe merges), `r` tokens are merged into their most similar partners
using the attention keys (`components.models.merging`). Every slot carries a size (how many
input tokens it stands for): attention adds log(size) to its logits (proportional attention)
and mean pooling weights by size. A merging model needs at least `min_tokens()` positions;
callers pad short batches up to it (`textdata.pad_batch(..., min_length=...)`), and padded
positions never change real tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from components.config import merge_min_tokens

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Additive mask value: large enough to zero a softmax weight, finite so a fully padded row
# stays NaN-free in FP16/INT8 runtimes.
MASK_VALUE = -1e4


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
        self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
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
        attn, keys = self.attn(self.norm1(x), bias)
        x = x + self.drop(attn)
        if self.r:
            from components.models.merging import merge_tokens

            x, sizes, mask = merge_tokens(
                x, keys, sizes, mask, self.r, method=self.cfg.merge_method,
                protect_first=self.cfg.protect_first, margin=self.margin,
                alpha=self.cfg.pitome_alpha)
        return x + self.mlp(self.norm2(x)), mask, sizes


class Student(nn.Module):
    """`forward(input_ids, attention_mask) -> logits`; `features()` also returns the pooled
    representation and every layer's hidden states for feature distillation."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_length, cfg.hidden)
        self.emb_norm = nn.LayerNorm(cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
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

    from components.common import StageError

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
