"""tokenizer: train a domain tokenizer on the train split and compare it with the teacher's.

Produces in `paths.tokenizer`: `tokenizer.json` (Hugging Face `tokenizers`, BPE / WordPiece /
Unigram, with [PAD]=0 [UNK] [CLS] [SEP] [MASK] and a `[CLS] text [SEP]` template), `metrics.json`
(tokens per example for the new and the teacher tokenizer on the validation split, their ratio,
unknown-token rates, vocab size, characters of text covered within `distill.max_length` tokens,
and the cost `curve`), `curve.json` (the curve as DVC plot data: one row per
`tokenizer.curve_vocab_sizes` entry plus a `teacher` row) and the resolved `params.json`.

The cost curve trains one more tokenizer of the configured type per curve size (the configured
`vocab_size`, when listed, is reused) and measures each on validation text: mean tokens per
example untruncated, and the mean number of source characters the model sees, i.e. what the
first `distill.max_length` tokens span once [CLS]/[SEP] take their places, truncated exactly as
the models truncate (`encoding.configured`). The teacher's tokenizer is measured at the same
length, so a vocabulary size can be picked by how much text it fits into the student's window.

The tokenizers see only the train split; metrics are measured on held-out validation text.
They train on what the model can read: each training text is cut at a word boundary to
TRAIN_CHARS_PER_TOKEN (512) characters per token of `distill.max_length` (32,768 characters at
the default 64). A token of English averages 4-5 characters, so that is about a hundred times
what the student reads of a text (its first `distill.max_length` tokens, and the distill windows
from its first few hundred words); the default data's longest text (25,484 characters) is never
cut, while one 19 MB text no longer costs minutes of training for each curve size. The number of
training texts cut is printed, and recorded in metrics.json as `train_texts_cut` when not 0.

Run: `python -m components.tokenizer` (or `dvc repro tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from components.config import SPECIAL_TOKENS, Params
from components.config import Tokenizer as TokenizerConfig
from components.data.artifacts import TOKENIZER_FILE, iter_split_texts, load_split_labels
from components.data.cleaning import cut_at_word
from components.data.files import atomic_dir, write_json
from components.models.hub import load_backend_tokenizer
from components.reporting.markdown_tables import markdown_table
from components.stage import stage_main
from components.text.batches import ENCODE_BATCH
from components.text.encoding import configured

PAD, UNK, CLS, SEP = SPECIAL_TOKENS[:4]
CURVE_FILE = "curve.json"  # DVC plot data: vocabulary size vs text covered, and the teacher
TRAIN_CHARS_PER_TOKEN = 512  # training texts are cut to this many characters per max_length token

# Texts as a list, or as a function that streams them in batches (a split read from Parquet
# batch by batch, again for every pass: memory never holds the whole split).
Texts = Sequence[str] | Callable[[], Iterable[list[str]]]


def text_batches(texts: Texts, size: int = ENCODE_BATCH) -> Iterator[list[str]]:
    """`texts` in batches of at most `size`."""
    for batch in (texts() if callable(texts) else [texts]):
        for start in range(0, len(batch), size):
            yield list(batch[start:start + size])


def build(cfg_type: str, vocab_size: int, min_frequency: int, lowercase: bool):
    """Return an untrained tokenizer and its trainer for the given type."""
    # Runs of whitespace become one space: a paragraph break says nothing a space does not, and
    # byte-level BPE would spend two tokens on each "\n\n" (and split the word after it).
    norm = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")]
    if lowercase:
        norm.append(normalizers.Lowercase())
    special = list(SPECIAL_TOKENS)
    if cfg_type == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
            show_progress=False,
        )
    elif cfg_type == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    elif cfg_type == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=special, unk_token=UNK, show_progress=False,
        )
    else:  # guarded by config validation
        raise ValueError(cfg_type)
    tok.normalizer = normalizers.Sequence(norm)
    return tok, trainer


def train(texts: Texts, cfg_type: str, vocab_size: int, min_frequency: int = 2,
          lowercase: bool = True) -> Tokenizer:
    tok, trainer = build(cfg_type, vocab_size, min_frequency, lowercase)
    # Batches of texts: `tokenizers` counts words as they arrive, so memory holds the word
    # counts, not the corpus.
    tok.train_from_iterator(text_batches(texts), trainer=trainer,
                            length=None if callable(texts) else len(texts))
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return tok


def token_lengths(tok: Tokenizer, texts: Texts, unk_id: int | None) -> tuple[np.ndarray, int]:
    """Tokens per text (untruncated unless `tok` truncates) and the number of unknown tokens."""
    lengths, unk = [], 0
    for batch in text_batches(texts):
        for enc in tok.encode_batch(batch):
            lengths.append(len(enc.ids))
            if unk_id is not None:
                unk += enc.ids.count(unk_id)
    return np.asarray(lengths, dtype=np.int64), unk


def token_stats(lengths: np.ndarray, unk: int) -> dict[str, float]:
    total = int(lengths.sum())
    return {
        "tokens_per_example": float(lengths.mean()),
        "tokens_per_example_p95": float(np.percentile(lengths, 95)),
        "unk_rate": unk / max(total, 1),
    }


def chars_covered(tok: Tokenizer, texts: Texts, max_length: int) -> np.ndarray:
    """Per text, how many of its characters the model sees at `max_length`: the end offset of
    the last text token kept when `tok` truncates as the models do ([CLS]/[SEP] count towards
    `max_length`), in characters of the source text (0 for a text without tokens)."""
    truncating = configured(tok, max_length)
    covered = []
    for batch in text_batches(texts):
        for enc in truncating.encode_batch(batch):
            ends = [end for (_, end), special in zip(enc.offsets, enc.special_tokens_mask,
                                                     strict=True) if not special]
            covered.append(max(ends, default=0))
    return np.array(covered)


def coverage(tok: Tokenizer, texts: Texts, max_length: int) -> dict[str, float]:
    """Mean tokens per example (untruncated, [CLS]/[SEP] included) and mean characters covered
    within `max_length` tokens (`chars_covered`). `tok` must not truncate by itself."""
    return {
        "tokens_per_example": float(token_lengths(tok, texts, None)[0].mean()),
        "chars_covered": float(chars_covered(tok, texts, max_length).mean()),
    }


def cost_curve(train_texts: Texts, eval_texts: Texts, cfg: TokenizerConfig, max_length: int,
               trained: dict[int, tuple[Tokenizer, dict[str, float]]] | None = None
               ) -> list[dict]:
    """One row per `cfg.curve_vocab_sizes` entry, ascending: a tokenizer like `cfg`'s trained on
    `train_texts` at that size (`vocab_size` is what training reached: it stops early when no
    pair is frequent enough), measured on `eval_texts` by `coverage`. `trained` maps sizes to
    tokenizers already trained with `cfg` and their `coverage`, reused instead of training and
    measuring again."""
    trained = trained or {}
    rows = []
    for size in sorted(cfg.curve_vocab_sizes):
        if size in trained:
            tok, measured = trained[size]
        else:
            tok = train(train_texts, cfg.type, size, cfg.min_frequency, cfg.lowercase)
            measured = coverage(tok, eval_texts, max_length)
        rows.append({"requested_vocab_size": size, "vocab_size": tok.get_vocab_size(),
                     **measured})
    return rows


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs else None


def versus_teacher(row: dict, teacher: dict) -> dict:
    """`row` with its tokens and characters covered as ratios of the teacher's."""
    return {**row,
            "tokens_ratio_vs_teacher": _ratio(row["tokens_per_example"],
                                              teacher["tokens_per_example"]),
            "chars_covered_ratio_vs_teacher": _ratio(row["chars_covered"],
                                                     teacher["chars_covered"])}


def curve_table(curve: list[dict], teacher: dict, max_length: int) -> str:
    """The curve and the teacher's row as a Markdown table, then the smallest sizes that beat
    the teacher on each measure."""
    rows = [{"vocab_size": f"{r['requested_vocab_size']} ({r['vocab_size']} trained)",
             "tokens_per_example": r["tokens_per_example"],
             "tokens_vs_teacher": r["tokens_ratio_vs_teacher"],
             f"chars_in_{max_length}_tokens": r["chars_covered"],
             "chars_vs_teacher": r["chars_covered_ratio_vs_teacher"]} for r in curve]
    rows.append({"vocab_size": f"teacher ({teacher['vocab_size']})",
                 "tokens_per_example": teacher["tokens_per_example"],
                 f"chars_in_{max_length}_tokens": teacher["chars_covered"]})
    fewer = [r["requested_vocab_size"] for r in curve
             if r["tokens_per_example"] < teacher["tokens_per_example"]]
    more = [r["requested_vocab_size"] for r in curve
            if r["chars_covered"] > teacher["chars_covered"]]
    return (markdown_table(rows) + "\n"
            f"smallest size spending fewer tokens per example than the teacher: "
            f"{fewer[0] if fewer else 'none'}; covering more characters within {max_length} "
            f"tokens: {more[0] if more else 'none'}")


def teacher_tokenizer(params: Params) -> Tokenizer:
    """The teacher's fast tokenizer as a raw `tokenizers.Tokenizer`, for a like-for-like count."""
    return load_backend_tokenizer(params.teacher.model)


def run(params: Params) -> dict:
    cfg, max_length = params.tokenizer, params.distill.max_length
    paths = params.paths
    # Both splits are streamed from Parquet once per pass: memory holds a batch of texts.
    # Checked before any work, as every stage checks them: the splits against the label map.
    for split in ("train", "validation"):
        load_split_labels(paths, split)

    cap = TRAIN_CHARS_PER_TOKEN * max_length
    cut = {"texts": 0}

    def train_texts():
        """The training split, batch by batch, each text cut to what the model can read."""
        n = 0
        for batch in iter_split_texts(paths, "train"):
            n += sum(len(text) > cap for text in batch)
            yield [cut_at_word(text, cap) for text in batch]
        cut["texts"] = n

    def eval_texts():
        return iter_split_texts(paths, "validation")

    tok = train(train_texts, cfg.type, cfg.vocab_size, cfg.min_frequency, cfg.lowercase)
    teacher = teacher_tokenizer(params)
    teacher.no_truncation()
    teacher.no_padding()

    lengths, unk = token_lengths(tok, eval_texts, tok.token_to_id(UNK))
    ours = token_stats(lengths, unk)
    theirs = token_stats(*token_lengths(teacher, eval_texts, teacher.token_to_id(UNK)))
    teacher_row = {
        "vocab_size": teacher.get_vocab_size(),
        "tokens_per_example": theirs["tokens_per_example"],
        "chars_covered": float(chars_covered(teacher, eval_texts, max_length).mean()),
    }
    own_chars = float(chars_covered(tok, eval_texts, max_length).mean())
    own = {"tokens_per_example": ours["tokens_per_example"], "chars_covered": own_chars}
    curve = [versus_teacher(row, teacher_row) for row in
             cost_curve(train_texts, eval_texts, cfg, max_length, {cfg.vocab_size: (tok, own)})]
    metrics = {
        "type": cfg.type,
        "vocab_size": tok.get_vocab_size(),
        "teacher_vocab_size": teacher.get_vocab_size(),
        "tokens_per_example": ours["tokens_per_example"],
        "tokens_per_example_p95": ours["tokens_per_example_p95"],
        "unk_rate": ours["unk_rate"],
        "teacher_tokens_per_example": theirs["tokens_per_example"],
        "teacher_unk_rate": theirs["unk_rate"],
        "tokens_ratio_vs_teacher": ours["tokens_per_example"] / theirs["tokens_per_example"],
        "fraction_truncated_at_student_max_length": float(np.mean(lengths > max_length)),
        "chars_covered": own_chars,
        "teacher_chars_covered": teacher_row["chars_covered"],
        "chars_covered_ratio_vs_teacher": _ratio(own_chars, teacher_row["chars_covered"]),
        "curve": curve,
    }
    if cut["texts"]:  # (absent when 0: the default data's metrics stay as they were)
        metrics["train_texts_cut"] = cut["texts"]
    plot = [{"tokenizer": cfg.type, **{k: row[k] for k in (
        "requested_vocab_size", "vocab_size", "tokens_per_example", "chars_covered")}}
        for row in curve]
    plot.append({"tokenizer": "teacher", **teacher_row})
    with atomic_dir(params.paths.tokenizer, params, "tokenizer") as out:
        tok.save(str(out / TOKENIZER_FILE))
        write_json(out / "metrics.json", metrics)
        write_json(out / CURVE_FILE, plot)
    print(
        f"tokenizer: {cfg.type} vocab {metrics['vocab_size']}: "
        f"{metrics['tokens_per_example']:.1f} tokens/example vs teacher "
        f"{metrics['teacher_tokens_per_example']:.1f} "
        f"({metrics['tokens_ratio_vs_teacher']:.2f}x), unk rate {metrics['unk_rate']:.4f}, "
        f"{own_chars:.0f} characters within {max_length} tokens vs teacher "
        f"{teacher_row['chars_covered']:.0f}"
    )
    if cut["texts"]:
        print(f"tokenizer: trained on {cut['texts']} training text(s) cut to {cap:,} characters "
              f"({TRAIN_CHARS_PER_TOKEN} per token of distill.max_length {max_length})")
    if curve:
        print(f"tokenizer: cost curve on validation ({cfg.type}, distill.max_length "
              f"{max_length}):\n{curve_table(curve, teacher_row, max_length)}")
    return metrics


def main() -> None:
    stage_main("tokenizer", run)


if __name__ == "__main__":
    main()
