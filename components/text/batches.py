"""Tokenised text classification data shared by the teacher and the student.

Both sides encode through a Hugging Face `tokenizers.Tokenizer` (the teacher's is its fast
tokenizer's backend) wrapped in `graphio.Encoder`, which tokenises only the part of a text the
model reads and truncates to `max_length` keeping [CLS]/[SEP]; batches are padded per batch, so
there is one encoding path for training, teacher caching, export parity and evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from components.text.encoding import Encoder, configured, pad_arrays, pad_id

__all__ = ["Collator", "EncodedDataset", "Stacked", "TextDataModule", "TokenIds", "batches",
           "configured", "encode", "encode_batches", "pad_batch", "pad_id", "text_windows"]

ENCODE_BATCH = 4096  # texts per encode_batch call: the Encoding objects of one call live at once


class TokenIds(Sequence):
    """The token ids of many texts as one flat int32 array and int64 offsets: 4 bytes per
    token, where a list of Python int lists costs about 40. `ids[i]` is text i's ids (an int32
    view), `ids[a:b]` a TokenIds of those texts."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError("offsets must start at 0 and end at len(flat)")
        self.flat = np.ascontiguousarray(flat, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)

    @classmethod
    def concat_arrays(cls, arrays: Sequence[np.ndarray]) -> TokenIds:
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return cls(flat.astype(np.int32, copy=False), offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenIds]) -> TokenIds:
        flat = np.concatenate([p.flat for p in parts]) if parts else np.zeros(0, np.int32)
        offsets, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += len(p.flat)
        return cls(flat, np.concatenate(offsets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise IndexError("TokenIds slices must be contiguous")
            stop = max(start, stop)
            lo, hi = self.offsets[start], self.offsets[stop]
            return TokenIds(self.flat[lo:hi], self.offsets[start:stop + 1] - lo)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def digest(self, h: hashlib._Hash) -> None:
        """Feed the ids into a hash (what `training.params_hash` checks a checkpoint against)."""
        h.update(self.offsets.tobytes())
        h.update(self.flat.tobytes())


def encode_batches(tokenizer: Tokenizer, texts: Iterable[Sequence[str]],
                   max_length: int) -> TokenIds:
    """Token ids of texts that arrive in batches (e.g. a Parquet split read batch by batch),
    truncated at `max_length` through the one `graphio.Encoder` (pre-cut included): memory
    holds the ids, never all the texts or their Encodings."""
    encoder = Encoder(tokenizer, max_length)  # one configured copy for the whole stream
    arrays: list[np.ndarray] = []
    for batch in texts:
        batch = list(batch)
        for start in range(0, len(batch), ENCODE_BATCH):
            arrays.extend(np.asarray(x, dtype=np.int32)
                          for x in encoder.ids(batch[start:start + ENCODE_BATCH]))
    return TokenIds.concat_arrays(arrays)


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> TokenIds:
    """Token ids of a whole split (configures a copy: not for per-batch loops)."""
    return encode_batches(tokenizer, [texts], max_length)


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


class Stacked:
    """Row-aligned arrays (e.g. memory-mapped teacher outputs of the train split and of the
    training windows) read as one, without concatenating them in memory."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.shape = (int(self.ends[-1]) if len(self.ends) else 0, *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        part = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[part][i - (self.ends[part - 1] if part else 0)]


def chunks(values, rows: int = 65536) -> Iterator[np.ndarray]:
    """`values` (an array, a memory map or a `Stacked`) in contiguous row chunks."""
    for part in getattr(values, "parts", [values]):
        for start in range(0, len(part), rows):
            yield np.ascontiguousarray(part[start:start + rows])


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
                    "are stale, rerun the label stage (dvc repro label)"
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
