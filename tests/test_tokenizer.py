import pytest

from components import prepare, tokenizer
from components.config import SPECIAL_TOKENS, validate
from tests.conftest import make_examples, tiny_raw_params


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
