import itertools
import json

import pandas as pd
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from components import prepare, tokenizer
from components.config import SPECIAL_TOKENS, ParamsError, apply_overrides, validate
from components.config import Tokenizer as TokenizerConfig
from components.data.artifacts import load_split
from tests.conftest import ROOT, make_examples, tiny_raw_params


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_each_type_trains_with_fixed_special_ids(kind):
    texts = make_examples(per_class=20)["text"].tolist()
    tok = tokenizer.train(texts, kind, vocab_size=150, min_frequency=1)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    enc = tok.encode(texts[0])
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert tok.token_to_id("[UNK]") not in enc.ids


def test_stage_reports_tokens_against_the_teacher(tmp_path, dataset_csv, tiny_teacher):
    params = validate(tiny_raw_params(tmp_path, dataset_csv, tiny_teacher))
    prepare.run(params)
    metrics = tokenizer.run(params)
    assert metrics["vocab_size"] <= 120
    assert metrics["tokens_per_example"] > 2 and metrics["teacher_tokens_per_example"] > 2
    assert metrics["tokens_ratio_vs_teacher"] == pytest.approx(
        metrics["tokens_per_example"] / metrics["teacher_tokens_per_example"])
    assert 0 <= metrics["unk_rate"] < 0.05
    assert (tmp_path / "artifacts/tokenizer/tokenizer.json").is_file()
    assert [r["requested_vocab_size"] for r in metrics["curve"]] == sorted(
        params.tokenizer.curve_vocab_sizes)
    assert {"tokens_per_example", "chars_covered", "tokens_ratio_vs_teacher",
            "chars_covered_ratio_vs_teacher", "vocab_size"} <= set(metrics["curve"][0])


def hand_made_tokenizer() -> Tokenizer:
    """Whole words from a fixed vocabulary, wrapped in [CLS] ... [SEP] like the stage's."""
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "café", "au", "lait"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    return tok


def test_chars_covered_counts_source_characters_within_the_window():
    """[CLS] and [SEP] take two of the max_length places; offsets are characters, not bytes
    ("é" is two bytes); an unknown word still covers its characters; text beyond the window,
    and whitespace after the last kept token, is not covered."""
    tok = hand_made_tokenizer()
    texts = ["café au lait", "  café\n\nau lait", "café au noir", ""]
    assert tokenizer.chars_covered(tok, texts, max_length=3).tolist() == [4, 6, 4, 0]
    assert tokenizer.chars_covered(tok, texts, max_length=4).tolist() == [7, 10, 7, 0]
    assert tokenizer.chars_covered(tok, texts, max_length=64).tolist() == [12, 15, 12, 0]
    assert tokenizer.coverage(tok, texts, max_length=4) == {
        "tokens_per_example": (5 + 5 + 5 + 2) / 4, "chars_covered": (7 + 10 + 7 + 0) / 4}
    assert tok.truncation is None  # measured on a truncating copy, never by changing `tok`


def test_bpe_curve_never_spends_more_tokens_on_its_training_text():
    """Byte-level BPE learns the same merges in the same order whatever the target size, so a
    larger vocabulary only merges further: on any text it gives no more tokens and its first
    max_length tokens span no fewer characters. Training stops early when no pair occurs
    min_frequency times, so the trained size may fall short of the requested one."""
    texts = make_examples(per_class=20)["text"].tolist()
    cfg = TokenizerConfig(type="bpe", vocab_size=300, min_frequency=1,
                          curve_vocab_sizes=[600, 280, 350, 450])
    curve = tokenizer.cost_curve(texts, texts, cfg, max_length=8)
    assert [r["requested_vocab_size"] for r in curve] == [280, 350, 450, 600]
    assert all(r["vocab_size"] <= r["requested_vocab_size"] for r in curve)
    for smaller, larger in itertools.pairwise(curve):
        assert larger["vocab_size"] >= smaller["vocab_size"]
        assert larger["tokens_per_example"] <= smaller["tokens_per_example"]
        assert larger["chars_covered"] >= smaller["chars_covered"]
    assert curve[0]["tokens_per_example"] > curve[-1]["tokens_per_example"]


def stage_params(tmp_path, dataset_csv, tiny_teacher, **overrides):
    return validate(tiny_raw_params(tmp_path, dataset_csv, tiny_teacher, **{
        "tokenizer.type": "bpe", "tokenizer.vocab_size": 300, **overrides}))


def test_stage_writes_the_curve_beside_the_teacher(tmp_path, dataset_csv, tiny_teacher):
    params = stage_params(tmp_path, dataset_csv, tiny_teacher,
                          **{"tokenizer.curve_vocab_sizes": [400, 300, 600],
                             "distill.max_length": 12})
    prepare.run(params)
    metrics = tokenizer.run(params)
    curve, max_length = metrics["curve"], 12
    assert [r["requested_vocab_size"] for r in curve] == [300, 400, 600]

    train_texts = load_split(params.paths, "train")["text"].tolist()
    texts = load_split(params.paths, "validation")["text"].tolist()
    teacher = tokenizer.teacher_tokenizer(params)
    teacher.no_truncation()
    theirs = tokenizer.coverage(teacher, texts, max_length)
    assert metrics["teacher_chars_covered"] == pytest.approx(theirs["chars_covered"])
    assert metrics["teacher_tokens_per_example"] == pytest.approx(theirs["tokens_per_example"])
    # the stage's own tokenizer is the curve's 300 point; 400 is trained again, identically
    assert curve[0]["vocab_size"] == metrics["vocab_size"]
    assert curve[0]["tokens_per_example"] == pytest.approx(metrics["tokens_per_example"])
    assert curve[0]["chars_covered"] == pytest.approx(metrics["chars_covered"])
    again = tokenizer.train(train_texts, "bpe", 400, min_frequency=1)
    assert {k: curve[1][k] for k in ("vocab_size", "tokens_per_example", "chars_covered")} == (
        {"vocab_size": again.get_vocab_size(), **tokenizer.coverage(again, texts, max_length)})
    mean_length = sum(map(len, texts)) / len(texts)
    for row in curve:
        assert 0 < row["chars_covered"] <= mean_length
        assert row["tokens_ratio_vs_teacher"] == pytest.approx(
            row["tokens_per_example"] / theirs["tokens_per_example"])
        assert row["chars_covered_ratio_vs_teacher"] == pytest.approx(
            row["chars_covered"] / theirs["chars_covered"])

    plot = json.loads((tmp_path / "artifacts/tokenizer/curve.json").read_text())
    assert plot[:-1] == [{"tokenizer": "bpe", **{k: r[k] for k in (
        "requested_vocab_size", "vocab_size", "tokens_per_example", "chars_covered")}}
        for r in curve]
    assert plot[-1] == {"tokenizer": "teacher", "vocab_size": teacher.get_vocab_size(),
                        **theirs}


def test_empty_curve_trains_one_tokenizer(tmp_path, dataset_csv, tiny_teacher, monkeypatch):
    params = stage_params(tmp_path, dataset_csv, tiny_teacher,
                          **{"tokenizer.curve_vocab_sizes": []})
    prepare.run(params)
    trainings = []
    real_train = tokenizer.train
    monkeypatch.setattr(tokenizer, "train",
                        lambda *a, **k: trainings.append(a[2]) or real_train(*a, **k))
    metrics = tokenizer.run(params)
    assert trainings == [300] and metrics["curve"] == []
    plot = json.loads((tmp_path / "artifacts/tokenizer/curve.json").read_text())
    assert [row["tokenizer"] for row in plot] == ["teacher"]


@pytest.mark.parametrize(("overrides", "why"), [
    ({"tokenizer.curve_vocab_sizes": [8000, 4000, 8000]}, r"\[8000\] more than once"),
    ({"tokenizer.type": "bpe", "tokenizer.curve_vocab_sizes": [200, 4000]},
     r"\[200\] leaves byte-level BPE no merges"),
    ({"tokenizer.type": "wordpiece", "tokenizer.curve_vocab_sizes": [5, 4000]},
     r"\[5\] are not larger than the 5 special tokens"),
    ({"tokenizer.curve_vocab_sizes": [True]}, "not a boolean"),
    ({"tokenizer.curve_vocab_sizes": 8000}, "valid list"),
])
def test_bad_curve_sizes_name_the_key(overrides, why):
    raw = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    with pytest.raises(ParamsError, match=r"tokenizer\.curve_vocab_sizes.*" + why):
        validate(raw)


def test_training_texts_are_cut_to_what_the_model_reads(tmp_path, tiny_teacher):
    """Ten training texts run on into a word repeated thousands of times beyond
    TRAIN_CHARS_PER_TOKEN x distill.max_length characters: the tokenizer trained at
    max_length 32 (cut at 16,384 characters) never learns that word, one at 1024 (no cut)
    does; the cut texts are counted."""
    frame = make_examples(per_class=40, seed=5)
    words = " ".join(frame["text"].tolist() * 3)  # about 25,000 characters of ordinary words
    long = [f"{i} {words} " + " ".join(["zzyzxqq"] * 4000) for i in range(10)]
    frame = pd.concat([frame, pd.DataFrame({"text": long, "label": "sport"})])
    data = tmp_path / "long.csv"
    frame.to_csv(data, index=False)
    vocab, cut = {}, {}
    for max_length in (32, 1024):
        params = validate(tiny_raw_params(tmp_path / str(max_length), data, tiny_teacher, **{
            "distill.max_length": max_length, "tokenizer.vocab_size": 400,
            "tokenizer.curve_vocab_sizes": []}))
        prepare.run(params)
        metrics = tokenizer.run(params)
        vocab[max_length] = Tokenizer.from_file(
            str(tmp_path / str(max_length) / "artifacts/tokenizer/tokenizer.json")).get_vocab()
        cut[max_length] = metrics.get("train_texts_cut", 0)
    in_train = sum(text.endswith("zzyzxqq") for text in load_split(params.paths, "train")["text"])
    assert in_train >= 5 and len(words) > tokenizer.TRAIN_CHARS_PER_TOKEN * 32
    assert cut == {32: in_train, 1024: 0}
    assert "zzyzxqq" in vocab[1024] and "zzyzxqq" not in vocab[32]
