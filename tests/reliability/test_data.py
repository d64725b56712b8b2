"""Bad input data: every case ends in a counted, reported skip (`prepare.on_bad_rows: skip`,
the default) or a clear error (`error`, or when nothing usable is left), and a failing run never
touches the previous output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from components import evaluate, prepare, teacher_cache
from components.config import validate
from components.data import artifacts
from components.stage import StageError
from tests.conftest import make_examples, tiny_raw_params
from tests.reliability.conftest import leftovers, run_stage_cli, snapshot

GOOD = make_examples(per_class=8, seed=3).drop_duplicates("text").reset_index(drop=True)


def raw_for(tmp_path: Path, source: Path, **extra) -> dict:
    return tiny_raw_params(tmp_path / "work", source, tmp_path / "unused-teacher", **extra)


def params_for(tmp_path: Path, source: Path, **extra):
    return validate(raw_for(tmp_path, source, **extra))


@pytest.fixture
def previous(tmp_path):
    """A good earlier prepare output; failing runs must leave it byte-identical."""
    src = tmp_path / "good.csv"
    GOOD.to_csv(src, index=False)
    params = params_for(tmp_path, src)
    prepare.run(params)
    out = Path(params.paths.data)
    return out, snapshot(out)


def dropped(report: dict) -> dict[str, int]:
    return {reason: n for reason, n in report["dropped"].items() if n}


def assert_untouched(previous) -> None:
    out, before = previous
    assert snapshot(out) == before
    assert leftovers(out) == []


def csv_lines(df: pd.DataFrame) -> list[str]:
    return df.to_csv(index=False).splitlines()


def test_malformed_csv_records_are_counted_with_their_line(tmp_path, previous):
    lines = csv_lines(GOOD)
    lines.insert(4, "one,two,three")                 # line 5: too many fields
    lines.append('"an unterminated quote,sport')    # swallows to the end of the file
    src = tmp_path / "d.csv"
    src.write_text("\n".join(lines) + "\n")
    report = prepare.run(params_for(tmp_path / "skip", src))
    assert report["dropped"]["malformed"] == 2
    assert report["rows_kept"] == len(GOOD)
    assert any(e.startswith(f"{src}:5 (3 fields") for e in report["dropped_examples"]["malformed"])

    with pytest.raises(StageError, match=rf"on_bad_rows=error: malformed: 2 \(e\.g\. {src}:5"):
        prepare.run(params_for(tmp_path, src, **{"prepare.on_bad_rows": "error"}))
    assert_untouched(previous)


def test_malformed_jsonl_lines_fail_the_cli_in_strict_mode(tmp_path, previous):
    lines = [json.dumps(r) for r in GOOD.to_dict("records")]
    lines.insert(2, "{not json")
    lines.insert(3, "[1, 2]")
    lines.insert(4, json.dumps({"text": "no label field"}))
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    report = prepare.run(params_for(tmp_path / "skip", src))
    assert dropped(report) == {"malformed": 2, "missing_field": 1}

    proc = run_stage_cli("prepare", raw_for(tmp_path, src, **{"prepare.on_bad_rows": "error"}),
                         tmp_path / "work")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("prepare: error:") and "Traceback" not in err
    assert f"malformed: 2 (e.g. {src}:3" in err and f"missing_field: 1 (e.g. {src}:5)" in err
    assert "prepare.on_bad_rows: skip" in err  # the message says how to go on anyway
    assert_untouched(previous)


def test_non_utf8_bytes_are_dropped_never_stored_as_mojibake(tmp_path, previous):
    csv_src = tmp_path / "d.csv"
    body = "\n".join(csv_lines(GOOD)).encode() + b"\ncaf\xe9 cr\xe8me br\xfbl\xe9e,food\n"
    csv_src.write_bytes(body)
    jsonl_src = tmp_path / "d.jsonl"
    records = [json.dumps(r).encode() for r in GOOD.to_dict("records")]
    records += [b'{"text": "bad \xff\xfe bytes", "label": "tech"}',
                b'{"text": "lone surrogate \\udc80 escape", "label": "tech"}']
    jsonl_src.write_bytes(b"\n".join(records) + b"\n")
    for src in (csv_src, jsonl_src):
        params = params_for(tmp_path / src.suffix, src)
        report = prepare.run(params)
        expected = 1 if src is csv_src else 2
        assert report["dropped"]["not_utf8"] == expected, report["dropped"]
        assert report["rows_kept"] == len(GOOD)
        texts = pd.concat(artifacts.load_split(params.paths, s) for s in artifacts.SPLITS)["text"]
        assert not texts.str.contains("\ufffd").any()
    with pytest.raises(StageError, match=r"not_utf8: 1 \(e\.g\. .*d\.csv:"):
        prepare.run(params_for(tmp_path, csv_src, **{"prepare.on_bad_rows": "error"}))
    assert_untouched(previous)


def test_empty_or_whitespace_texts_are_counted_and_all_empty_is_an_error(tmp_path, previous):
    blanks = pd.DataFrame({"text": ["", "   ", "\t \n ", " "], "label": ["tech", "food"] * 2})
    src = tmp_path / "d.csv"
    pd.concat([GOOD, blanks]).to_csv(src, index=False)
    report = prepare.run(params_for(tmp_path / "skip", src))
    assert report["dropped"]["empty_text"] == 4 and report["rows_kept"] == len(GOOD)

    only_blank = tmp_path / "blank.csv"
    blanks.to_csv(only_blank, index=False)
    with pytest.raises(StageError, match=r"needs at least 2 classes after cleaning, found \[\] "
                                         r"\(dropped empty_text: 4"):
        prepare.run(params_for(tmp_path, only_blank))
    assert_untouched(previous)


def test_missing_column_exits_2_naming_the_columns(tmp_path, previous):
    src = tmp_path / "d.csv"
    GOOD.rename(columns={"label": "topic"}).to_csv(src, index=False)
    proc = run_stage_cli("prepare", raw_for(tmp_path, src), tmp_path / "work")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"prepare: error: {src}: missing column(s) ['label']; it has "
                                  "['text', 'topic']")
    assert "prepare.label_column" in proc.stderr

    jsonl = tmp_path / "d.jsonl"
    GOOD.rename(columns={"text": "body"}).to_json(jsonl, orient="records", lines=True)
    with pytest.raises(StageError, match=r"missing column\(s\) \['text'\]"):
        prepare.run(params_for(tmp_path, jsonl))
    assert_untouched(previous)


def test_nan_null_and_invalid_labels_never_become_classes(tmp_path, previous):
    csv_src = tmp_path / "d.csv"
    odd = pd.DataFrame({"text": ["alpha one two", "beta three four", "gamma five six",
                                 "delta seven"], "label": ["", "NaN", "null", "  "]})
    pd.concat([GOOD, odd]).to_csv(csv_src, index=False)
    report = prepare.run(params_for(tmp_path / "csv", csv_src))
    assert report["dropped"]["missing_label"] == 4
    assert report["num_classes"] == 3

    jsonl = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in GOOD.to_dict("records")]
    lines += ['{"text": "null label", "label": null}', '{"text": "nan label", "label": NaN}',
              '{"text": "list label", "label": ["tech", "food"]}']
    jsonl.write_text("\n".join(lines) + "\n")
    params = params_for(tmp_path / "jsonl", jsonl)
    report = prepare.run(params)
    assert dropped(report) == {"invalid_label": 1, "missing_label": 2}
    assert artifacts.load_label_names(params.paths) == ["food", "sport", "tech"]
    with pytest.raises(StageError, match=r"invalid_label: 1.*missing_label: 2"):
        prepare.run(params_for(tmp_path, jsonl, **{"prepare.on_bad_rows": "error"}))
    assert_untouched(previous)


def test_single_class_is_an_error_in_any_mode(tmp_path, previous):
    src = tmp_path / "d.csv"
    GOOD.assign(label="tech").to_csv(src, index=False)
    for mode in ("skip", "error"):
        with pytest.raises(StageError, match=r"needs at least 2 classes .* found \['tech'\]"):
            prepare.run(params_for(tmp_path, src, **{"prepare.on_bad_rows": mode}))
    assert_untouched(previous)


def test_class_smaller_than_the_splits_is_dropped_and_reported_or_fails(tmp_path, previous):
    typo = pd.DataFrame({"text": ["the striker scored late", "a keeper saved twice"],
                         "label": ["sprot", "sprot"]})
    src = tmp_path / "d.csv"
    pd.concat([GOOD, typo]).to_csv(src, index=False)
    params = params_for(tmp_path / "skip", src)
    report = prepare.run(params)
    assert report["dropped"]["rare_class"] == 2
    assert report["dropped_classes"] == {"sprot": 2}
    assert artifacts.load_label_names(params.paths) == ["food", "sport", "tech"]

    with pytest.raises(StageError, match=r"fewer than 3 examples cannot be split .*'sprot': 2"):
        prepare.run(params_for(tmp_path, src, **{"prepare.on_bad_rows": "error"}))
    assert_untouched(previous)


def test_extremely_long_text_is_kept_whole_and_truncated_only_when_encoded(tmp_path):
    from components.text.batches import encode
    from components.tokenizer import train

    long_text = " ".join(["match goal team"] * 40_000)  # ~600 kB: over csv's 128 KiB field cap
    src = tmp_path / "d.csv"
    pd.concat([GOOD, pd.DataFrame({"text": [long_text], "label": ["sport"]})]).to_csv(
        src, index=False)
    params = params_for(tmp_path, src)
    report = prepare.run(params)
    assert report["rows_kept"] == len(GOOD) + 1 and dropped(report) == {}
    assert report["text_chars"]["max"] == len(long_text)
    texts = pd.concat(artifacts.load_split(params.paths, s) for s in artifacts.SPLITS)["text"]
    assert (texts == long_text).sum() == 1
    tok = train(GOOD["text"].tolist(), "wordpiece", vocab_size=60, min_frequency=1)
    assert len(encode(tok, [long_text], params.distill.max_length)[0]) == \
        params.distill.max_length


def test_split_label_outside_the_label_map_is_refused_by_later_stages(tmp_path, tiny_teacher):
    src = tmp_path / "d.csv"
    GOOD.to_csv(src, index=False)
    params = validate(tiny_raw_params(tmp_path / "work", src, tiny_teacher))
    prepare.run(params)
    data = Path(params.paths.data)
    test = pd.read_parquet(data / "test.parquet")
    test.loc[0, "label"] = 7  # e.g. a test split from a run with more classes
    test.to_parquet(data / "test.parquet", index=False)
    for stage in (evaluate, teacher_cache):  # the stages that read the test split
        with pytest.raises(StageError) as err:
            stage.run(params)
        msg = str(err.value)
        assert f"{data / 'test.parquet'}: label id(s) [7] are not in" in msg, stage
        assert "label_map.json (3 labels: ['food', 'sport', 'tech'])" in msg
        assert "rerun prepare (dvc repro prepare)" in msg

    # Same ids but a label map in another order: names disagree, also refused.
    names = artifacts.load_label_names(params.paths)
    test.loc[0, "label"] = (names.index(test.loc[0, "label_name"]) + 1) % 3
    test.to_parquet(data / "test.parquet", index=False)
    with pytest.raises(StageError, match=r"row 0 has label \d named .* label_map.json calls"):
        evaluate.run(params)
