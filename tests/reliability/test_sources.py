"""Data sources that used to give silently wrong data or hang (issue 12): rows lost after an
unterminated CSV quote, folder sources that leave their root or read hidden files, one class
under several spellings, valid U+FFFD text dropped, misleading messages, and a remote source
whose server never answers. Every row read is kept or counted by reason
(`rows_read == rows_kept + sum(dropped)`); every entry of a folder source that is not read is
counted by reason; a remote failure is one StageError naming the URL, within the timeout.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import threading
import time
import unicodedata
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import prepare
from components.cli import main as still
from components.config import ParamsError, Prepare, validate
from components.data import artifacts
from components.stage import StageError
from tests.conftest import ROOT, make_examples, tiny_raw_params
from tests.reliability.conftest import leftovers, snapshot

GOOD = make_examples(per_class=8, seed=3).drop_duplicates("text").reset_index(drop=True)


def params_for(tmp_path: Path, source: Path | str, **extra):
    return validate(tiny_raw_params(tmp_path / "work", source, tmp_path / "unused-teacher",
                                    **extra))


def run(tmp_path: Path, source: Path | str, **extra) -> tuple[dict, object]:
    params = params_for(tmp_path, source, **extra)
    report = prepare.run(params)
    assert report["rows_read"] == report["rows_kept"] + sum(report["dropped"].values()), report
    return report, params


def all_rows(params) -> pd.DataFrame:
    return pd.concat(artifacts.load_split(params.paths, s) for s in artifacts.SPLITS)


def dropped(report: dict) -> dict[str, int]:
    return {reason: n for reason, n in report["dropped"].items() if n}


# 1. Unterminated CSV quote ---------------------------------------------------------------------

def good_lines() -> list[str]:
    return GOOD.to_csv(index=False).splitlines()  # header + 24 data lines


def test_unterminated_quote_costs_one_line_not_the_rest_of_the_file(tmp_path):
    """25 data lines, an open quote on line 14 (the 13th data line): it used to swallow every
    line after it (12 rows gone, 1 counted)."""
    lines = good_lines()
    lines.insert(13, '"an unterminated quote swallows the rest,sport')
    src = tmp_path / "d.csv"
    src.write_text("\n".join(lines) + "\n")
    report, params = run(tmp_path, src)
    assert report["rows_read"] == 25 and report["rows_kept"] == 24
    assert dropped(report) == {"malformed": 1}
    (example,) = report["dropped_examples"]["malformed"]
    assert example.startswith(f"{src}:14 (unexpected end of data; the 12 line(s) it took were "
                              "read again)"), example
    assert sorted(all_rows(params)["text"]) == sorted(GOOD["text"])

    # Strict mode names the line instead.
    with pytest.raises(StageError, match=rf"malformed: 1 \(e\.g\. {src}:14 "):
        prepare.run(params_for(tmp_path / "strict", src, **{"prepare.on_bad_rows": "error"}))


def test_a_good_row_is_never_eaten_by_the_bad_one_before_it(tmp_path):
    """An open quote on line 6 runs on until the quote that opens line 8; the parser used to
    drop lines 6-8 as one malformed record, so good lines 7 and 8 vanished uncounted."""
    lines = good_lines()
    lines.insert(5, '"stray quote,tech')
    lines.insert(7, '"the chef bakes bread, then soup",food')
    src = tmp_path / "d.csv"
    src.write_text("\n".join(lines) + "\n")
    report, params = run(tmp_path, src)
    assert report["rows_read"] == 26 and report["rows_kept"] == 25
    assert dropped(report) == {"malformed": 1}
    assert report["dropped_examples"]["malformed"][0].startswith(f"{src}:6 (")
    texts = set(all_rows(params)["text"])
    assert "the chef bakes bread, then soup" in texts and GOOD["text"][5] in texts


def test_quoted_newlines_stay_one_row_and_a_bad_multiline_record_is_one_count(tmp_path):
    lines = good_lines()
    lines.insert(3, '"a recipe for bread\nspread over two lines",food')  # lines 4-5
    lines.append('"three fields\nover two lines",tech,extra')
    src = tmp_path / "d.csv"
    src.write_text("\n".join(lines) + "\n")
    report, params = run(tmp_path, src)
    assert report["rows_kept"] == 25 and dropped(report) == {"malformed": 1}
    assert report["dropped_examples"]["malformed"] == [
        f"{src}:28-29 (3 fields, header has 2)"]
    assert "a recipe for bread\nspread over two lines" in set(all_rows(params)["text"])


# 2. Folder-per-class sources -------------------------------------------------------------------

def write_class_folders(root: Path, df: pd.DataFrame) -> None:
    for i, row in enumerate(df.itertuples()):
        (root / row.label).mkdir(parents=True, exist_ok=True)
        (root / row.label / f"{i}.txt").write_text(row.text)


def test_folder_source_never_leaves_its_root_nor_reads_hidden_files(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "system.txt").write_text("root:x:0:0 system file content")
    (outside / "sport").mkdir()
    (outside / "sport" / "x.txt").write_text("a text from outside the source")
    root = tmp_path / "src"
    write_class_folders(root, GOOD)
    (root / "tech" / "link-out.txt").symlink_to(outside / "system.txt")
    (root / "stolen").symlink_to(outside / "sport")                  # class folder out of root
    (root / "tech" / ".env").write_text("AWS_SECRET_ACCESS_KEY=abc123")
    (root / "sport" / "env.txt").symlink_to(root / "tech" / ".env")  # a way round the dot
    (root / "food" / ".cache").mkdir()
    (root / "food" / ".cache" / "x.txt").write_text("cached text")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (root / "_private").mkdir()
    (root / "_private" / "x.txt").write_text("not a class")
    (root / "__pycache__").mkdir()
    (root / "README.txt").write_text("about this dataset")
    (root / "tech" / "gone.txt").symlink_to(tmp_path / "no-such-file")
    os.mkfifo(root / "sport" / "pipe.txt")                        # reading it would block
    (root / "food" / "loop").symlink_to(root / "food")
    (root / "sport" / "inside.txt").symlink_to(root / "sport" / "0.txt")  # stays inside
    report, params = run(tmp_path, root)

    texts = " ".join(all_rows(params)["text"])
    for secret in ("system file", "from outside", "AWS_SECRET", "cached text", "[core]",
                   "not a class", "about this dataset"):
        assert secret not in texts
    assert artifacts.load_label_names(params.paths) == ["food", "sport", "tech"]
    assert report["skipped"] == {"broken_link": 1, "hidden": 4, "link_loop": 1,
                                 "not_a_file": 1, "not_in_a_class_folder": 1,
                                 "outside_source": 2, "private_folder": 2}
    examples = report["skipped_examples"]
    assert sorted(examples["outside_source"]) == [f"{root}/stolen", f"{root}/tech/link-out.txt"]
    assert len(examples["hidden"]) == 3  # the first three, in walk order
    assert set(examples["hidden"]) <= {f"{root}/.git", f"{root}/food/.cache",
                                       f"{root}/sport/env.txt", f"{root}/tech/.env"}
    assert examples["private_folder"] == [f"{root}/__pycache__", f"{root}/_private"]
    # The symlink to a file inside the root is an ordinary example (a duplicate here).
    assert report["rows_read"] == len(GOOD) + 1 and report["dropped"]["duplicate"] == 1


def test_symlinked_folders_inside_the_root_are_read(tmp_path):
    """A folder symlink inside a class folder used to crash with IsADirectoryError."""
    root = tmp_path / "src"
    write_class_folders(root, GOOD[GOOD.label != "tech"])
    tech = GOOD[GOOD.label == "tech"]["text"].tolist()
    for sub, texts in (("tech", tech[:4]), ("more-tech", tech[4:])):
        (root / "_store" / sub).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / "_store" / sub / f"{i}.txt").write_text(text)
    (root / "tech").symlink_to(root / "_store" / "tech")               # a class folder
    (root / "_store" / "tech" / "more").symlink_to(root / "_store" / "more-tech")  # nested
    report, params = run(tmp_path, root)
    assert report["rows_kept"] == len(GOOD) and report["num_classes"] == 3
    assert sorted(all_rows(params).query("label_name == 'tech'")["text"]) == sorted(tech)
    assert report["skipped"] == {"private_folder": 1}


def test_a_folder_of_only_skipped_entries_names_them(tmp_path):
    root = tmp_path / "src"
    (root / ".hidden-class").mkdir(parents=True)
    (root / ".hidden-class" / "a.txt").write_text("text")
    (root / "_drafts").mkdir()
    (root / "_drafts" / "b.txt").write_text("text")
    with pytest.raises(StageError, match=r"no files in class sub-folders .*skipped hidden: 1 "
                                         r"\(e\.g\. .*/\.hidden-class\); private_folder: 1"):
        prepare.run(params_for(tmp_path, root))


# 3. Label normalisation ------------------------------------------------------------------------

def spelled(df: pd.DataFrame, spellings: dict[str, list[str]]) -> pd.DataFrame:
    """`df` with each label replaced by its spellings in turn."""
    out = df.copy()
    out["label"] = [spellings[label][i % len(spellings[label])]
                    for i, label in enumerate(df["label"])]
    return out


def test_spellings_of_one_class_merge_and_every_merge_is_reported(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    df = spelled(GOOD, {"sport": ["spam", "SPAM", "Spam "], "tech": ["1", "1.0", "01"],
                        "food": ["café", nfd]})
    src = tmp_path / "d.csv"
    df.to_csv(src, index=False)
    report, params = run(tmp_path, src)
    assert artifacts.load_label_names(params.paths) == ["1", "café", "spam"]
    assert report["label_merges"] == {"1": ["01", "1.0"], "café": [nfd],
                                      "spam": ["SPAM", "Spam "]}
    assert report["rows_kept"] == len(GOOD) and "conflicting_labels" not in dropped(report)

    # Switched off, case and number spellings stay apart (NFC and stripping always apply).
    report, params = run(tmp_path / "off", src, **{"prepare.labels_casefold": False,
                                                   "prepare.labels_numeric": False})
    assert report["label_merges"] == {"Spam": ["Spam "], "café": [nfd]}
    classes = set(artifacts.load_label_names(params.paths)) | set(report["dropped_classes"])
    assert classes == {"01", "1", "1.0", "SPAM", "Spam", "café", "spam"}


def test_numbers_from_typed_sources_merge_with_their_text(tmp_path):
    records = [{"text": t, "label": v} for t, v in
               zip(GOOD["text"], [1, 1.0, "1", 2, 2.0, "2.00"] * 4, strict=True)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report, params = run(tmp_path, src)
    assert artifacts.load_label_names(params.paths) == ["1", "2"]
    assert report["label_merges"] == {"1": ["1.0"], "2": ["2.0", "2.00"]}

    parquet = tmp_path / "d.parquet"
    pd.DataFrame({"text": GOOD["text"], "label": pd.array([1, 2, None] * 8, dtype="Int64")}
                 ).to_parquet(parquet)
    report, params = run(tmp_path / "pq", parquet)
    assert artifacts.load_label_names(params.paths) == ["1", "2"]  # not "1.0"/"2.0"
    assert report["dropped"]["missing_label"] == 8 and report["label_merges"] == {}


def test_a_class_named_none_is_a_class_only_empty_nan_null_are_missing(tmp_path):
    df = spelled(GOOD, {"sport": ["None"], "tech": ["N/A"], "food": ["food"]})
    blanks = pd.DataFrame({"text": ["one two", "three four", "five six", "seven"],
                           "label": ["", " ", "NaN", "null"]})
    src = tmp_path / "d.csv"
    pd.concat([df, blanks]).to_csv(src, index=False)
    report, params = run(tmp_path, src)
    assert artifacts.load_label_names(params.paths) == ["food", "n/a", "none"]
    assert dropped(report) == {"missing_label": 4}
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in
                               zip(df["text"], df["label"], strict=True)) + "\n"
                     + '{"text": "null label", "label": null}\n')
    report, params = run(tmp_path / "jsonl", jsonl, **{"prepare.labels_casefold": False})
    assert artifacts.load_label_names(params.paths) == ["N/A", "None", "food"]
    assert dropped(report) == {"missing_label": 1}


def test_label_defaults_in_params_yaml_match_the_model():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]
    for name, info in Prepare.model_fields.items():
        if not info.is_required():
            assert section.get(name) == info.default, name


# 4. U+FFFD in valid UTF-8 ----------------------------------------------------------------------

def test_replacement_character_in_valid_utf8_is_text_undecodable_bytes_are_not(tmp_path):
    text = "the chef said \ufffd twice \ufffd"
    csv_src = tmp_path / "d.csv"
    csv_src.write_bytes(GOOD.to_csv(index=False).encode()
                        + f"{text},food\n".encode() + b"caf\xe9 bread,food\n")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD.to_dict("records"))
                      + json.dumps({"text": text, "label": "food"}).encode() + b"\n"
                      + b'{"text": "bad \xff bytes", "label": "food"}\n')
    folder = tmp_path / "folder"
    write_class_folders(folder, GOOD)
    (folder / "food" / "fffd.txt").write_text(text)
    (folder / "food" / "latin1.txt").write_bytes(b"caf\xe9 bread")
    for src in (csv_src, jsonl, folder):
        report, params = run(tmp_path / f"out-{src.name}", src)
        assert dropped(report) == {"not_utf8": 1}, (src, report["dropped"])
        assert text in set(all_rows(params)["text"])


# 5. Messages that name the real cause ----------------------------------------------------------

def test_duplicate_header_names_the_column(tmp_path):
    src = tmp_path / "d.csv"
    df = GOOD.assign(notes="x")[["text", "label", "notes"]]
    lines = df.to_csv(index=False).splitlines()
    lines[0] = "text,label,text"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError) as err:
        prepare.run(params_for(tmp_path, src))
    assert str(err.value) == (f"{src}: 2 columns are named 'text' (columns 1, 3 of ['text', "
                              "'label', 'text']), so prepare.text_column is ambiguous; rename "
                              "all but one of them in the header")


def test_text_column_equal_to_label_column_is_refused_naming_both(tmp_path, capsys):
    with pytest.raises(ParamsError) as err:
        params_for(tmp_path, tmp_path / "d.csv", **{"prepare.label_column": "text"})
    assert ("  - prepare: prepare.text_column and prepare.label_column are both 'text'"
            in str(err.value))
    assert still(["validate", "--params", str(ROOT / "params.yaml"),
                  "--set", "prepare.text_column=label"]) == 2
    assert "prepare.text_column and prepare.label_column are both 'label'" in \
        capsys.readouterr().err


def test_jsonl_repeated_key_and_deep_nesting_are_counted_rows(tmp_path):
    lines = [json.dumps(r) for r in GOOD.to_dict("records")]
    lines.insert(2, '{"text": "first", "label": "tech", "text": "second"}')
    lines.insert(4, "[" * 100_000 + "]" * 100_000)
    lines.insert(6, '{"text": "deep", "label": "tech", "meta": ' + "[" * 100_000
                 + "]" * 100_000 + "}")
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    report, _ = run(tmp_path, src)
    assert dropped(report) == {"malformed": 3}
    assert report["dropped_examples"]["malformed"] == [
        f"{src}:3 (key 'text' appears twice)", f"{src}:5 (nested too deeply)",
        f"{src}:7 (nested too deeply)"]


# 6. Remote sources: timeouts, 404, closed port, retries ----------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def remote_failure(tmp_path: Path, url: str) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(StageError) as err:
        prepare.run(params_for(tmp_path, url, **{"prepare.timeout_s": 1}))
    assert not (tmp_path / "work").exists()
    return str(err.value), time.perf_counter() - start


@pytest.mark.parametrize("name", ["data.csv", "data"])
def test_silent_server_fails_within_the_timeout_naming_the_url(tmp_path, silent_server, name):
    """It used to hang for 300 s, then fail with a bare FSTimeoutError."""
    url = f"{silent_server}/{name}"
    msg, seconds = remote_failure(tmp_path, url)
    assert msg.startswith(f"prepare.source={url!r}: no answer within prepare.timeout_s=1 s ("), \
        msg
    assert "raise prepare.timeout_s" in msg
    assert seconds < 15


def test_http_404_and_closed_port_name_the_url(tmp_path, file_server):
    root, base = file_server
    GOOD.to_csv(root / "ok.csv", index=False)
    msg, _ = remote_failure(tmp_path, f"{base}/missing.csv")
    assert msg == (f"prepare.source='{base}/missing.csv' does not exist; check the URL (the "
                   "server answered: not found)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/d.csv"
    msg, _ = remote_failure(tmp_path, closed)
    assert msg.startswith(f"prepare.source={closed!r}: cannot fetch it (ClientConnectorError: ")
    report, _ = run(tmp_path / "ok", f"{base}/ok.csv", **{"prepare.timeout_s": 1})
    assert report["rows_kept"] == len(GOOD)


def test_prepare_cli_on_a_silent_server_is_one_line(tmp_path, silent_server):
    from tests.reliability.conftest import run_stage_cli

    folder = tmp_path / "project"
    raw = tiny_raw_params(folder, f"{silent_server}/d.csv", tmp_path / "t",
                          **{"prepare.timeout_s": 1})
    proc = run_stage_cli("prepare", raw, folder)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"prepare: error: prepare.source='{silent_server}/d.csv': "
                                  "no answer within prepare.timeout_s=1 s")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prepare_task_gets_the_retries_stage_retries_declares():
    from flows.tasks import BACKOFF, STAGE_RETRIES, run_stage, stage_task

    assert STAGE_RETRIES["prepare"] == 2
    prepare_task = stage_task("prepare")
    assert prepare_task.retries == 2
    assert prepare_task.retry_delay_seconds == BACKOFF(2)
    assert stage_task("distill") is run_stage and run_stage.retries == 0


def test_timeout_must_be_positive(tmp_path):
    for bad in (0, -1):
        with pytest.raises(ParamsError, match=r"prepare.timeout_s: Input should be greater "
                                              r"than 0"):
            params_for(tmp_path, tmp_path / "d.csv", **{"prepare.timeout_s": bad})


def test_failing_sources_leave_the_previous_output(tmp_path, silent_server):
    src = tmp_path / "good.csv"
    GOOD.to_csv(src, index=False)
    params = params_for(tmp_path, src)
    prepare.run(params)
    out = Path(params.paths.data)
    before = snapshot(out)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text,label,text\na,b,c\n")
    for source, extra in [(f"{silent_server}/d.csv", {"prepare.timeout_s": 1}),
                          (str(bad_csv), {})]:
        with pytest.raises(StageError):
            prepare.run(params_for(tmp_path, source, **extra))
        assert snapshot(out) == before and leftovers(out) == []
