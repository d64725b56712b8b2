"""tokenizer: train a domain tokenizer on the train split and compare it with the teacher's.

Produces in `paths.tokenizer`: `tokenizer.json` (Hugging Face `tokenizers`, BPE / WordPiece /
Unigram, with [PAD]=0 [UNK] [CLS] [SEP] [MASK] and a `[CLS] text [SEP]` template), `metrics.json`
(tokens per example for the new and the teacher tokenizer on the validation split, their ratio,
unknown-token rates, vocab size) and the resolved `params.json`.

The tokenizer sees only the train split; metrics are measured on held-out validation text.

Run: `python -m components.tokenizer` (or `dvc repro tokenizer`).
"""

from __future__ import annotations

import numpy as np
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from components.artifacts import TOKENIZER_FILE, load_split
from components.common import atomic_dir, stage_main, write_json
from components.config import SPECIAL_TOKENS, Params
from components.hub import load_backend_tokenizer

PAD, UNK, CLS, SEP = SPECIAL_TOKENS[:4]


def build(cfg_type: str, vocab_size: int, min_frequency: int, lowercase: bool):
    """Return an untrained tokenizer and its trainer for the given type."""
    norm = [normalizers.NFKC()]
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


def train(texts: list[str], cfg_type: str, vocab_size: int, min_frequency: int = 2,
          lowercase: bool = True) -> Tokenizer:
    tok, trainer = build(cfg_type, vocab_size, min_frequency, lowercase)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return tok


def token_stats(encodings, unk_id: int | None) -> dict[str, float]:
    lengths = np.array([len(e.ids) for e in encodings])
    total = int(lengths.sum())
    unk = sum(e.ids.count(unk_id) for e in encodings) if unk_id is not None else 0
    return {
        "tokens_per_example": float(lengths.mean()),
        "tokens_per_example_p95": float(np.percentile(lengths, 95)),
        "unk_rate": unk / max(total, 1),
    }


def teacher_tokenizer(params: Params) -> Tokenizer:
    """The teacher's fast tokenizer as a raw `tokenizers.Tokenizer`, for a like-for-like count."""
    return load_backend_tokenizer(params.teacher.model)


def run(params: Params) -> dict:
    cfg = params.tokenizer
    train_texts = load_split(params.paths, "train")["text"].tolist()
    eval_texts = load_split(params.paths, "validation")["text"].tolist()

    tok = train(train_texts, cfg.type, cfg.vocab_size, cfg.min_frequency, cfg.lowercase)
    teacher = teacher_tokenizer(params)
    teacher.no_truncation()
    teacher.no_padding()

    ours = token_stats(tok.encode_batch(eval_texts), tok.token_to_id(UNK))
    theirs = token_stats(teacher.encode_batch(eval_texts), teacher.token_to_id(UNK))
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
        "fraction_truncated_at_student_max_length": float(
            np.mean([len(e.ids) > params.distill.max_length
                     for e in tok.encode_batch(eval_texts)])
        ),
    }
    with atomic_dir(params.paths.tokenizer, params, "tokenizer") as out:
        tok.save(str(out / TOKENIZER_FILE))
        write_json(out / "metrics.json", metrics)
    print(
        f"tokenizer: {cfg.type} vocab {metrics['vocab_size']}: "
        f"{metrics['tokens_per_example']:.1f} tokens/example vs teacher "
        f"{metrics['teacher_tokens_per_example']:.1f} "
        f"({metrics['tokens_ratio_vs_teacher']:.2f}x), unk rate {metrics['unk_rate']:.4f}"
    )
    return metrics


def main() -> None:
    stage_main("tokenizer", run)


if __name__ == "__main__":
    main()
