"""Tokenised text shared by the teacher and the student, without torch: many texts encoded to one
flat id array (`TokenIds`, `encode_batches`, `encode`), the distill windows (`text_windows`) and
row chunks of stacked arrays (`Stacked`, `chunks`).

Both sides encode through a Hugging Face `tokenizers.Tokenizer` (the teacher's is its fast
tokenizer's backend) wrapped in `components.text.encoding.Encoder`, which tokenises only the
part of a text the model reads and truncates to `max_length` keeping [CLS]/[SEP]; batches are
padded per batch (`components.text.tensors`), so there is one encoding path for training,
teacher caching, export parity and evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from components.text.encoding import Encoder

# Texts per `encode_batch` call: the Encodings of one call (ids, offsets, strings) live at once.
ENCODE_BATCH = 2048


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
    truncated at `max_length` through the one `encoding.Encoder` (pre-cut included): memory
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
