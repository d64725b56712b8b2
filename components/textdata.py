"""Tokenised text classification data shared by the teacher and the student.

Both sides encode through a Hugging Face `tokenizers.Tokenizer` (the teacher's is its fast
tokenizer's backend), truncate to `max_length` keeping [CLS]/[SEP], and pad per batch, so
there is one encoding path for training, export parity and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from components.graphio import configured, pad_arrays, pad_id

__all__ = ["Collator", "EncodedDataset", "TextDataModule", "batches", "configured", "encode",
           "pad_batch", "pad_id", "text_windows"]


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of a whole split in one call (configures a copy: not for per-batch loops)."""
    return [e.ids for e in configured(tokenizer, max_length).encode_batch(list(texts))]


def text_windows(texts: Sequence[str], words: int, stride: int,
                 max_per_text: int) -> tuple[list[str], np.ndarray]:
    """Windows of `words` whitespace-separated words, `stride` words apart, from every text
    (`config.Windows`): the first starts at word `stride` (the text's own start is its training
    example), a window needs at least half of `words` words, at most `max_per_text` per text.
    Words, not tokens, so the teacher and a student with another tokenizer see the same span.
    Returns the window texts and, for each, the index of the text it came from."""
    out, source = [], []
    for i, text in enumerate(texts):
        tokens = text.split()
        starts = range(stride, len(tokens) - words // 2, stride)
        for start in starts[:max_per_text]:
            out.append(" ".join(tokens[start:start + words]))
            source.append(i)
    return out, np.asarray(source, dtype=np.int64)


def pad_batch(ids: Sequence[Sequence[int]], pad: int,
              min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`graphio.pad_arrays` as torch tensors: int64 ids and attention mask."""
    input_ids, mask = pad_arrays(ids, pad, min_length)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


class EncodedDataset(Dataset):
    """Encoded examples, labels and optional per-example targets (e.g. `teacher_logits`,
    `teacher_pooled`, `teacher_layers` from the teacher cache), batched under their keys."""

    def __init__(self, ids: list[list[int]], labels: np.ndarray,
                 targets: dict[str, np.ndarray] | None = None):
        self.targets = targets or {}
        for key, values in self.targets.items():
            if len(values) != len(ids):
                raise ValueError(
                    f"{len(values)} cached {key} for {len(ids)} examples: the teacher outputs "
                    "are stale, rerun the teacher stage (dvc repro teacher)"
                )
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], int(self.labels[i]), {k: v[i] for k, v in self.targets.items()}


class Collator:
    def __init__(self, pad: int, min_length: int = 1):
        self.pad, self.min_length = pad, min_length

    def __call__(self, items) -> dict[str, torch.Tensor]:
        ids, labels, targets = zip(*items, strict=True)
        input_ids, mask = pad_batch(ids, self.pad, self.min_length)
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "labels": torch.as_tensor(labels, dtype=torch.long)}
        for key in targets[0]:
            batch[key] = torch.as_tensor(np.stack([t[key] for t in targets]),
                                         dtype=torch.float32)
        return batch


class TextDataModule(pl.LightningDataModule):
    """Train/validation loaders over pre-encoded examples, shuffled by a seeded generator."""

    def __init__(self, train: EncodedDataset, val: EncodedDataset, batch_size: int, pad: int,
                 seed: int, eval_batch_size: int | None = None, min_length: int = 1):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.collate = Collator(pad, min_length)
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.eval_batch_size, collate_fn=self.collate)


def batches(ids: list[list[int]], batch_size: int, pad: int, min_length: int = 1):
    """Yield padded (input_ids, attention_mask) batches in order, for inference."""
    for start in range(0, len(ids), batch_size):
        yield pad_batch(ids[start : start + batch_size], pad, min_length)
