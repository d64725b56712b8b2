"""prepare streams its source (two passes over a temporary spill file, a few numbers per row in
memory): the report and the splits are what the in-memory stage gave, whatever the batch size,
even when duplicates and conflicting copies of a text fall into different batches; the spill
never outlives the stage."""

from __future__ import annotations

import gzip
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal

from components import prepare
from components.config import validate
from components.data import artifacts, cleaning, readers, rows
from components.data.cleaning import cut_at_word
from components.data.splits import stratified_split
from components.stage import StageError
from tests.conftest import make_examples, tiny_raw_params


def params_for(tmp_path: Path, source: Path, **extra):
    return validate(tiny_raw_params(tmp_path / "work", source, "unused", **extra))


def messy() -> pd.DataFrame:
    """Clean rows with, spread over the file: exact and near duplicates far from their first
    copy, texts under two labels, empty texts, missing labels, spellings of one class, a class
    too small to split, and texts far longer than the rest (two above prepare.max_chars when
    it is 12000, one of them duplicated)."""
    base = make_examples(per_class=10, seed=3).drop_duplicates("text").reset_index(drop=True)
    records = base.to_dict("records")
    other = {"sport": "tech", "tech": "food", "food": "sport"}
    records += [dict(r) for r in records[:12:3]]  # exact duplicates, 20+ rows later
    records.insert(5, {"text": "  " + records[17]["text"].upper() + "\t",  # near duplicate,
                       "label": records[17]["label"]})                    # before its original
    records.insert(2, {"text": "same words here", "label": "tech"})
    records.append({"text": "Same  words here", "label": "food"})         # conflict across batches
    records.append({"text": records[4]["text"], "label": other[records[4]["label"]]})
    records.insert(9, {"text": "   ", "label": "tech"})
    records.insert(15, {"text": "no label", "label": "nan"})
    records.insert(11, {"text": "spelled one way", "label": "Tech "})
    records.insert(25, {"text": "spelled another", "label": "SPORT"})
    records.insert(3, {"text": "a rare one", "label": "sprot"})
    records.append({"text": "another rare one", "label": "sprot"})
    long = " ".join(["ever longer text"] * 900)  # 15,299 characters
    records.insert(8, {"text": long, "label": "tech"})
    records.insert(20, {"text": "x" * 13_000, "label": "food"})  # no space: a hard cut
    records.insert(30, {"text": long + " ", "label": "tech"})  # a duplicate once stripped
    records.insert(31, {"text": "word " * 2200, "label": "sport"})  # far longer, not cut
    return pd.DataFrame(records)


def write_source(tmp_path: Path, df: pd.DataFrame, fmt: str) -> Path:
    src = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(src, index=False)
    elif fmt == "tsv":
        df.to_csv(src, sep="\t", index=False)
    elif fmt == "jsonl":
        df.to_json(src, orient="records", lines=True)
    else:
        df.to_parquet(src, index=False, row_group_size=5)  # row groups straddle batches too
    return src


def reference(params) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The stage as it was before streaming: every row in memory, deduplication by pandas
    groupby on the normalised text."""
    cfg = params.prepare
    reader = rows.Reader("prepare.source", cfg.format, cfg.text_column, cfg.label_column)
    _, fmt, raw = readers.read_source(cfg.source, reader)
    tally = rows.Rows(dropped=Counter(raw.dropped),
                      examples={k: list(v) for k, v in raw.examples.items()})
    usable, spellings = [], {}
    for text, label, origin in zip(raw.texts, raw.labels, raw.origins, strict=True):
        problem, text, name = cleaning.clean_row(text, label, cfg)
        if problem:
            tally.drop(problem, origin)
            continue
        spellings.setdefault(name, set()).add(cleaning._label_spelling(label))
        usable.append((cut_at_word(text, cfg.max_chars), name, origin, len(text)))
    df = pd.DataFrame(usable, columns=["text", "label_name", "origin", "as_read"])
    if cfg.deduplicate:
        key = df["text"].map(cleaning._normalise_for_dedup)
        conflicting = df.groupby(key)["label_name"].transform("nunique") > 1
        for origin in df.loc[conflicting, "origin"]:
            tally.drop("conflicting_labels", origin)
        df, key = df[~conflicting], key[~conflicting]
        dup = key.duplicated(keep="first")
        tally.dropped["duplicate"] += int(dup.sum())
        df = df[~dup]
    counts = df["label_name"].value_counts()
    too_small = {name: int(n) for name, n in sorted(counts[counts < 3].items())}
    if too_small:
        tally.drop("rare_class", f"classes {too_small}", sum(too_small.values()))
        df = df[~df["label_name"].isin(too_small)]
    names = sorted(df["label_name"].unique())
    df = df.assign(label=df["label_name"].map({n: i for i, n in enumerate(names)})
                   .astype("int64")).reset_index(drop=True)
    split_idx = stratified_split(df["label"].to_numpy(), cfg, params.seed)
    splits = {s: df.iloc[idx][["text", "label", "label_name"]].reset_index(drop=True)
              for s, idx in split_idx.items()}
    lengths = df["text"].str.len()
    median = df["as_read"].median()
    threshold = max(20 * median, 10_000.0)
    far = df[df["as_read"] > threshold].sort_values("as_read", ascending=False, kind="stable")
    cut = df[df["as_read"] > cfg.max_chars]

    def rows_of(part: pd.DataFrame) -> list[dict]:
        return [{"origin": o, "chars": int(n)} for o, n in zip(part["origin"], part["as_read"],
                                                               strict=True)]

    report = {
        "source": cfg.source, "format": fmt,
        "rows_read": len(raw.texts) + sum(raw.dropped.values()), "rows_kept": len(df),
        "dropped": dict(sorted(tally.dropped.items())),
        "dropped_examples": dict(sorted(tally.examples.items())),
        "dropped_classes": too_small, "skipped": {}, "skipped_examples": {},
        "label_merges": {name: sorted(s for s in spelled if s != name)
                         for name, spelled in sorted(spellings.items()) if spelled != {name}},
        "num_classes": len(names),
        "text_chars": {"min": int(lengths.min()), "median": float(lengths.median()),
                       "max": int(lengths.max())},
        "length_outliers": {
            "rule": f"longer than 20 x the median ({median:g} characters) and than 10000 "
                    "characters, as read",
            "threshold_chars": threshold, "count": len(far), "longest": rows_of(far[:5])},
        "truncated": {"max_chars": cfg.max_chars, "count": len(cut),
                      "examples": rows_of(cut[:3])},
        "splits": {s: {"examples": len(part), "per_class": {
            n: int(c) for n, c in part["label_name"].value_counts().sort_index().items()}}
            for s, part in splits.items()},
    }
    return report, splits


def spills(params) -> list[str]:
    data = Path(params.paths.data)
    return sorted(p.name for p in data.parent.glob(f".{data.name}.spill-*"))


@pytest.mark.parametrize("deduplicate", [True, False])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_streaming_in_small_batches_gives_the_in_memory_result(tmp_path, monkeypatch, fmt,
                                                               deduplicate):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 7)
    params = params_for(tmp_path, write_source(tmp_path, messy(), fmt),
                        **{"prepare.deduplicate": deduplicate, "prepare.max_chars": 12_000})
    report = prepare.run(params)
    expected, splits = reference(params)
    assert report == expected
    assert report["truncated"]["count"] == 2 + (not deduplicate)
    assert report["length_outliers"]["count"] == 3 + (not deduplicate)
    assert artifacts.load_prepare_report(params.paths) == expected
    if deduplicate:  # the data holds every case the batches could split up
        assert {"duplicate", "conflicting_labels", "empty_text", "missing_label",
                "rare_class"} <= set(report["dropped"])
        assert report["label_merges"] == {"sport": ["SPORT"], "tech": ["Tech "]}
    else:
        assert "duplicate" not in report["dropped"]
        assert "conflicting_labels" not in report["dropped"]
    for split, part in splits.items():
        assert_frame_equal(artifacts.load_split(params.paths, split), part)
    # written in batches: one row group per 7 rows of a split
    train = Path(params.paths.data) / "train.parquet"
    assert pq.ParquetFile(train).num_row_groups == -(-len(splits["train"]) // 7) > 1
    assert spills(params) == []


def test_a_reason_counted_by_reader_and_cleaning_keeps_the_reader_examples_first(tmp_path,
                                                                                  monkeypatch):
    """not_utf8 comes from the reader (undecodable bytes) and from cleaning (an escaped lone
    surrogate): the examples are the reader's first, as when the reader ran to the end first."""
    monkeypatch.setattr(prepare, "BATCH_ROWS", 7)
    lines = [json.dumps(r).encode() for r in messy().to_dict("records")]
    for at in (2, 4, 6):
        lines.insert(at, json.dumps({"text": f"escaped \udc80 {at}", "label": "tech"}).encode())
    for at in (20, 30):
        lines.insert(at, b'{"text": "raw \xff bytes", "label": "tech"}')
    src = tmp_path / "d.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    params = params_for(tmp_path, src)
    report = prepare.run(params)
    assert report == reference(params)[0]
    assert report["dropped"]["not_utf8"] == 5
    assert report["dropped_examples"]["not_utf8"] == [f"{src}:21", f"{src}:31", f"{src}:3"]


def test_a_split_within_one_batch_is_the_bytes_to_parquet_wrote(tmp_path):
    params = params_for(tmp_path, write_source(tmp_path, messy(), "csv"))
    prepare.run(params)
    _, splits = reference(params)
    for split, part in splits.items():
        before = tmp_path / f"before-{split}.parquet"
        part.to_parquet(before, index=False)  # what the in-memory stage wrote
        assert (Path(params.paths.data) / f"{split}.parquet").read_bytes() == before.read_bytes()


def test_the_spill_lies_beside_the_output_and_is_gone_after_success(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 7)
    params = params_for(tmp_path, write_source(tmp_path, messy(), "jsonl"))
    seen = []
    write_splits = prepare._write_splits

    def spying(out, spill, *args):
        seen.append((spill.is_file(), spill.parent.parent == Path(params.paths.data).parent,
                     pq.ParquetFile(spill).metadata.num_row_groups))
        return write_splits(out, spill, *args)

    monkeypatch.setattr(prepare, "_write_splits", spying)
    prepare.run(params)
    assert seen[0][:2] == (True, True) and seen[0][2] > 1
    assert spills(params) == []


def test_a_source_failing_mid_stream_leaves_no_spill_and_the_previous_output(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 7)
    good = write_source(tmp_path, messy(), "csv")
    params = params_for(tmp_path, good)
    prepare.run(params)
    before = artifacts.load_split(params.paths, "train")

    packed = gzip.compress(good.read_bytes())
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(packed[: len(packed) * 3 // 4])  # rows first, then the damage
    with pytest.raises(StageError, match="cannot read it as gzip-compressed csv"):
        prepare.run(params_for(tmp_path, truncated))
    assert spills(params) == []
    assert artifacts.load_split(params.paths, "train").equals(before)
    assert [p.name for p in Path(params.paths.data).parent.iterdir()] == ["prepared"]


def test_a_failure_while_writing_leaves_no_spill_and_no_new_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 7)
    src = write_source(tmp_path, messy(), "parquet")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.SplitWriter, "write", full_disk)
    params = params_for(tmp_path, src, **{"paths.data": str(tmp_path / "new/deeper/prepared")})
    with pytest.raises(OSError, match="No space left"):
        prepare.run(params)
    assert not (tmp_path / "new").exists()  # neither the spill nor the folders made for it

    monkeypatch.undo()
    single = tmp_path / "one.csv"
    make_examples(per_class=5).assign(label="tech").to_csv(single, index=False)
    with pytest.raises(StageError, match="at least 2 classes"):
        prepare.run(params_for(tmp_path, single,
                               **{"paths.data": str(tmp_path / "new/deeper/prepared")}))
    assert not (tmp_path / "new").exists()


def test_hf_datasets_are_read_in_batches_with_their_class_names(monkeypatch):
    class Dataset:
        column_names = ["text", "label", "extra"]
        features = {"text": object(), "label": types.SimpleNamespace(names=["neg", "pos"])}
        texts = [f"text {i}" for i in range(5)]
        labels = [0, 1, 1, 0, 1]

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, key: slice):
            return {"text": self.texts[key], "label": self.labels[key], "extra": []}

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: Dataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    got = readers.load_rows("hf:some/set", "hf", rows.Reader("prepare.source", batch_rows=2))
    assert got.texts == Dataset.texts
    assert got.labels == ["neg", "pos", "pos", "neg", "pos"]
    assert got.origins == [f"hf:some/set[train]:{i}" for i in range(5)]
