"""Distillation losses."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label term
    when T changes (Hinton et al., 2015).
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


class DistillationLoss:
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(labels)."""

    def __init__(self, temperature: float, alpha: float):
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        ce = F.cross_entropy(logits, batch["labels"])
        kd = kd_kl(logits, batch["teacher_logits"], self.temperature)
        loss = self.alpha * kd + (1 - self.alpha) * ce
        return loss, {"ce": ce, "kd": kd}


class FeatureDistillationLoss(nn.Module):
    """Logit KD plus hidden-state matching against the teacher's cached pooled features.

    Student and teacher use different tokenizers, so their token positions do not line up;
    features are therefore matched after pooling: the size-weighted mean of each layer's real
    tokens. `pooled_weight` matches the student's final pooled layer to the teacher's last
    layer; `layer_map` {student block (0-based): teacher hidden_states index (0 = embeddings,
    i = after teacher layer i)} adds one term per pair, weighted by `hidden_weight`. Each
    student vector goes through its own learned linear projection to the teacher width; the
    projections are trained with the student and discarded afterwards (not exported).
    """

    needs_features = True

    def __init__(self, kd: DistillationLoss, student_hidden: int, teacher_hidden: int,
                 pooled_weight: float, hidden_weight: float, layer_map: dict[int, int]):
        super().__init__()
        self.kd = kd
        self.pooled_weight, self.hidden_weight = pooled_weight, hidden_weight
        self.layer_map = dict(sorted(layer_map.items()))
        self.pooled_proj = nn.Linear(student_hidden, teacher_hidden)
        self.layer_proj = nn.ModuleDict(
            {str(s): nn.Linear(student_hidden, teacher_hidden) for s in self.layer_map})

    def forward(self, outputs, batch: dict[str, torch.Tensor]):
        logits, _, student_layers = outputs
        loss, parts = self.kd(logits, batch)
        teacher_layers = batch["teacher_layers"]
        if self.pooled_weight:
            pooled = F.mse_loss(self.pooled_proj(student_layers[:, -1]), teacher_layers[:, -1])
            loss = loss + self.pooled_weight * pooled
            parts["feature_pooled"] = pooled
        if self.hidden_weight and self.layer_map:
            terms = [F.mse_loss(self.layer_proj[str(s)](student_layers[:, s + 1]),
                                teacher_layers[:, t]) for s, t in self.layer_map.items()]
            hidden = torch.stack(terms).mean()
            loss = loss + self.hidden_weight * hidden
            parts["feature_hidden"] = hidden
        return loss, parts
