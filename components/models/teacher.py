"""The teacher as every stage sees it: a Hugging Face sequence classifier behind the same
`model(input_ids, attention_mask) -> logits` signature as the student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.models.hub import loading
from components.stage import StageError


class HFClassifier(nn.Module):
    """Adapter: a Hugging Face sequence classifier as `model(input_ids, mask) -> logits`,
    so the shared fit loop and the exporters see the same signature as the student."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Logits and the mean-pooled (as sentence-transformers pools) hidden states of the
        embeddings and of every layer: [B, layers + 1, hidden]."""
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                      output_hidden_states=True)
        m = attention_mask.unsqueeze(-1).to(out.hidden_states[0].dtype)
        layers = [(h * m).sum(1) / m.sum(1).clamp(min=1) for h in out.hidden_states]
        return out.logits, torch.stack(layers, dim=1)


@torch.no_grad()
def predict_outputs(model: HFClassifier, ids: list[list[int]], batch_size: int, pad: int,
                    progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, labels] and pooled layers [n, layers + 1, hidden] of encoded examples, in
    order; `progress` names a progress bar (None: silent)."""
    from tqdm.auto import tqdm

    from components.text.tensors import batches

    model.eval()
    logits, layers = [], []
    total = -(-len(ids) // batch_size)
    for input_ids, mask in tqdm(batches(ids, batch_size, pad), total=total, desc=progress,
                                unit="batch", disable=progress is None, mininterval=2):
        lg, hl = model.features(input_ids, mask)
        logits.append(lg.float().numpy())
        layers.append(hl.float().numpy())
    return np.concatenate(logits), np.concatenate(layers)


def with_head(path: str, label_names: list[str]) -> HFClassifier:
    """The model at `path` with a classification head for `label_names` (kept when it already
    matches, newly initialised otherwise)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    hf = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )
    return HFClassifier(hf)


def load_saved(folder: str | Path,
               attn_implementation: str | None = None) -> tuple[HFClassifier, object]:
    """A teacher saved by the teacher stage, and its tokenizer. `attn_implementation` goes to
    transformers as it is (export asks for "eager": the ONNX exporter traces plain matmul +
    softmax, which ORT can quantise)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise StageError(f"{folder} has no teacher: run the teacher stage (dvc repro teacher)")
    with loading(f"the teacher in {folder} (model.safetensors / config.json)",
                 "rerun the teacher stage (dvc repro -f teacher)"):
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        hf = AutoModelForSequenceClassification.from_pretrained(folder, **extra)
        tok = AutoTokenizer.from_pretrained(folder)
    return HFClassifier(hf).eval(), tok
