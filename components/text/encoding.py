"""How text reaches an exported graph, without torch: the graph's input and output names, the
text encoder (truncation at `max_length`, tokenising only the part of a text the model reads),
right padding to the batch's longest sequence and the ONNX Runtime session options with pinned
threads.

Training, teacher caching, export, evaluation (`text.batches`, `runtimes`, which add torch on top)
and the shipped bundle (`bundle`, which must not need torch) encode through the one `Encoder`
here, so a bundle feeds its graph exactly what evaluate measured.

**The pre-cut.** A model reads `max_length` tokens; a news article is several hundred. Before
tokenising, `Encoder` cuts each text to its own prefix that ends at a word boundary once it
holds `max_length` words (`read_prefix`), since each word gives at least one token. The ids are
those of the whole text truncated at `max_length`, because
- the cut is at a space that follows a non-space character, so every pre-tokenizer that splits
  at whitespace (BERT's, byte-level BPE's regex, Metaspace with split, Whitespace) ends a
  pre-token there, and every token before the cut is the token the whole text has there;
- a cut text that gives fewer than `max_length` ids (a normaliser dropped characters: a "word"
  of control characters, say) is tokenised again whole (`Encoder.ids`);
- a tokenizer whose normaliser or pre-tokenizer is not known to be local in that sense (a
  Precompiled SentencePiece normaliser, byte-level BPE without its regex, Metaspace without
  split) is never cut (`cuts_safely`).
Texts without spaces (CJK, a base64 blob, a URL) have no word boundary and are tokenised whole.
`tests/test_text_precut.py` checks the identity on every split of the data and on a messy
corpus, for BPE, WordPiece, Unigram and the teacher's tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits",)


def configured(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """A copy of `tokenizer` that truncates at `max_length` and does not pad (batches are padded
    by `pad_arrays`). Copying re-parses the whole vocabulary (tens of ms), so callers that encode
    repeatedly build one `Encoder` and keep it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())  # never mutate the caller's tokenizer settings
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


# Normalisers that map each character on its own (or collapse whitespace), so a prefix of the
# text normalises to a prefix of the normalised text, and pre-tokenizers that end a pre-token at
# every space: with only these, the tokens before a cut at a space are the whole text's.
_LOCAL_NORMALIZERS = {"BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Lowercase",
                      "StripAccents", "Strip", "Prepend"}
_SPACE_SPLITTING = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation",
                    "Digits", "UnicodeScripts"}


def _local_normalizer(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_local_normalizer(n) for n in spec.get("normalizers", []))
    if kind == "Replace":  # the domain tokenizer's whitespace collapse, and nothing wider
        return spec.get("pattern") == {"Regex": r"\s+"} and spec.get("content") == " "
    return kind in _LOCAL_NORMALIZERS


def _splits_at_spaces(spec: dict | None) -> bool:
    """Whether the pre-tokenizer ends a pre-token at every space (one part of a sequence
    that does is enough; the others must not join across spaces, which none listed does)."""
    if spec is None:
        return False
    kind = spec.get("type")
    if kind == "Sequence":
        parts = spec.get("pretokenizers", [])
        return any(_splits_at_spaces(p) for p in parts) and all(
            _splits_at_spaces(p) or p.get("type") in _SPACE_SPLITTING | {"ByteLevel"}
            for p in parts)
    if kind == "ByteLevel":
        return bool(spec.get("use_regex", True))
    if kind == "Metaspace":
        return bool(spec.get("split", True))
    return kind in {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def cuts_safely(tokenizer_json: str | dict) -> bool:
    """Whether texts may be pre-cut for this tokenizer (see the module docstring): its
    normaliser is local, its pre-tokenizer splits at spaces and it truncates on the right."""
    spec = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    truncation = spec.get("truncation") or {}
    return (truncation.get("direction", "Right") == "Right"
            and _local_normalizer(spec.get("normalizer"))
            and _splits_at_spaces(spec.get("pre_tokenizer")))


# Python's \s is Unicode whitespace; a boundary is a plain space after any other character.
_BOUNDARY = re.compile(r"\S ")


@functools.cache
def _first_words(words: int) -> re.Pattern:
    return re.compile(r"\s*(?:\S+\s+){" + str(words - 1) + r"}\S+")


def read_prefix(text: str, words: int) -> str:
    """`text` up to the first word boundary after its first `words` words: the part a model
    reading about `words` tokens can see, cut where no token straddles the cut. The text itself
    (the same object) when it has fewer words or no boundary after them."""
    found = _first_words(words).match(text)
    if found is None:
        return text
    boundary = _BOUNDARY.search(text, found.end() - 1)
    return text if boundary is None else text[: boundary.start() + 1]


class Encoder:
    """Texts to token ids as a model reads them: truncated at `max_length` (special tokens
    included), each text pre-cut to what the model reads (see the module docstring), and
    right-padded batches.

    Args:
        tokenizer: a `tokenizers.Tokenizer` (a copy is configured; the caller's is untouched).
        max_length: truncation length, special tokens included.
        min_length: shortest padded length (a token-merging student needs this many positions).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, min_length: int = 1):
        self.tokenizer = configured(tokenizer, max_length)
        self.max_length, self.min_length = max_length, min_length
        self.pad = pad_id(tokenizer)
        self.cuts = cuts_safely(self.tokenizer.to_str())

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text: exactly those of the whole text truncated at `max_length`."""
        texts = list(texts)
        if not self.cuts:
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts)]
        cut = [read_prefix(t, self.max_length) for t in texts]
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(cut)]
        again = [i for i, (text, part, x) in enumerate(zip(texts, cut, ids, strict=True))
                 if part is not text and len(x) < self.max_length]
        if again:
            for i, e in zip(again, self.tokenizer.encode_batch_fast([texts[i] for i in again]),
                            strict=True):
                ids[i] = e.ids
        return ids

    def arrays(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded int64 `input_ids` and `attention_mask` of a batch of texts."""
        return pad_arrays(self.ids(texts), self.pad, self.min_length)


def pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>", "<PAD>"):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return idx
    return 0


def pad_arrays(ids: Sequence[Sequence[int]], pad: int,
               min_length: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence in the batch (at least `min_length`, which a
    token-merging student needs); returns int64 ids and attention mask."""
    length = max(min_length, max(len(x) for x in ids))
    input_ids = np.full((len(ids), length), pad, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return input_ids, mask


def session_options(threads: int = 0):
    """ONNX Runtime options; with `threads`, intra-op pinned to it and inter-op to 1 (sequential
    execution), so runs are comparable to PyTorch pinned the same way.

    Spinning is off: by default ORT's pool threads keep spinning after each run, waiting for
    the next one, and on a few cores they take the CPU from whatever runs between two calls,
    i.e. tokenising the next batch. Measured on 2 cores (the default student, batches of 32):
    tokenising right after a run cost about 1.9x its cost alone with spinning on and 1.5x with
    it off (the rest is the caches: a plain memory sweep costs the same), the model alone ran
    up to 20% slower without spinning, and text in, logits out ran about 6% faster without it.
    The deployed path is what counts, so every session here, the bundle's included, has it off.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initialisers are not the user's problem
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


TOKENIZER_THREADS_ENV = "RAYON_NUM_THREADS"


def pin_tokenizer_threads(threads: int) -> None:
    """Size the `tokenizers` thread pool (Rust's rayon, which reads RAYON_NUM_THREADS once,
    when the pool starts at the first parallel encode in the process). Call it before any
    text is encoded; a pool that has started keeps its size, and a size the user set in the
    environment is kept."""
    if threads > 0:
        os.environ.setdefault(TOKENIZER_THREADS_ENV, str(threads))
