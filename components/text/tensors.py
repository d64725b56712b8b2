"""Encoded text as PyTorch sees it: `pad_batch` (one padded batch of ids and mask as tensors), the
datasets and collator of training (`EncodedDataset`, `Collator`) and the Lightning data module
shared by the teacher and the student (`TextDataModule`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from components.text.encoding import pad_arrays


def pad_batch(ids: Sequence[Sequence[int]], pad: int,
              min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`encoding.pad_arrays` as torch tensors: int64 ids and attention mask."""
    input_ids, mask = pad_arrays(ids, pad, min_length)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


class EncodedDataset(Dataset):
    """Encoded examples, labels and optional per-example targets (e.g. `teacher_logits`,
    `teacher_layers` from the teacher cache), batched under their keys. The ids are a `TokenIds`
    (or lists), the targets arrays, memory maps or `Stacked` maps: each item is read when a
    batch asks for it, so nothing here is copied per example up front."""

    def __init__(self, ids: Sequence[Sequence[int]], labels: np.ndarray,
                 targets: dict[str, np.ndarray] | None = None):
        self.targets = targets or {}
        for key, values in self.targets.items():
            if len(values) != len(ids):
                raise ValueError(
                    f"{len(values)} cached {key} for {len(ids)} examples: the teacher outputs "
                    "are stale, rerun the teacher_cache stage (dvc repro teacher_cache)"
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

def batches(ids: Sequence[Sequence[int]], batch_size: int, pad: int, min_length: int = 1):
    """Yield padded (input_ids, attention_mask) batches in order, for inference."""
    for start in range(0, len(ids), batch_size):
        yield pad_batch(ids[start : start + batch_size], pad, min_length)
