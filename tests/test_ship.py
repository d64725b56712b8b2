"""The bundle from the tiny pipeline (conftest `trained_pipeline` runs every stage, ship last):
it predicts what evaluate measured, its cascade defers exactly what the policy says, a tampered
file is refused, a bad input file is reported like prepare reports one, the Triton config
parses with Triton's own schema, and the pages render as pages."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.cli import main as cli
from components.data.artifacts import STUDENT_INT8, STUDENT_STATIC_INT8, load_quality, load_split
from components.evaluation import cascade
from components.models import student as student_io
from components.models.runtimes import TextEncoder, onnx_runner, ort_session
from components.serving.bundle import BundleError, load_bundle, verify
from components.serving.predict import predict_file
from components.serving.triton_repo import write_triton
from components.stage import StageError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(trained_pipeline):
    params, results = trained_pipeline
    return params, results, Path(params.paths.bundle)


def evaluate_logits(params, texts: list[str], graph: str = STUDENT_INT8) -> np.ndarray:
    """A student graph's test logits (dynamic INT8 by default) the way evaluate computes them:
    runtimes' encoder and ONNX runner, batches of evaluate.throughput_batch_size in order."""
    from tokenizers import Tokenizer

    export = Path(params.paths.export)
    model = student_io.load(params.paths.student)
    enc = TextEncoder(Tokenizer.from_file(str(export / "tokenizer.json")),
                      params.distill.max_length, model.cfg.min_tokens())
    run = onnx_runner(ort_session(export / graph, params.evaluate.num_threads))
    bs = params.evaluate.throughput_batch_size
    return np.concatenate([run(*enc(texts[i : i + bs])) for i in range(0, len(texts), bs)])


def test_the_bundle_predicts_what_evaluate_measured(shipped):
    params, _, bundle_dir = shipped
    test = load_split(params.paths, "test")
    texts = test["text"].tolist()
    bundle = load_bundle(bundle_dir)
    assert bundle.model_name == params.ship.model == "student_onnx_int8"
    answers = bundle.predict(texts)
    expected = evaluate_logits(params, texts).argmax(-1)
    assert [a["label"] for a in answers] == [bundle.labels[k] for k in expected]
    accuracy = np.mean([a["label"] == name for a, name in zip(answers, test["label_name"],
                                                            strict=True)])
    assert accuracy == load_quality(params.paths)["systems"]["student_onnx_int8"]["accuracy"]
    # Same batches, same numbers (dynamic INT8 picks activation ranges per batch, so another
    # batching moves probabilities in the 5th decimal).
    probs = bundle.predict_proba(texts)
    assert probs.shape == (len(texts), len(bundle.labels)) and np.allclose(probs.sum(1), 1)
    assert [a["probability"] for a in answers] == pytest.approx(probs.max(1).tolist())


def test_cascade_defers_exactly_below_the_threshold(shipped):
    params, _, bundle_dir = shipped
    quality = load_quality(params.paths)
    chosen = quality["cascade"]["chosen"]
    assert chosen, "the tiny pipeline's cascade reached its target on validation"
    bundle = load_bundle(bundle_dir)
    policy = json.loads((bundle_dir / "cascade.json").read_text())
    assert policy["threshold"] == chosen["threshold"] and policy["chosen_on"] == "validation"
    test = load_split(params.paths, "test")
    texts = test["text"].tolist()
    answers = bundle.predict(texts, cascade=True)
    logits = evaluate_logits(params, texts)
    below = cascade.deferred(logits, policy["confidence"], policy["threshold"])
    assert [a["answered_by"] == "teacher" for a in answers] == below.tolist()
    assert np.mean(below) == pytest.approx(chosen["deferred_fraction"])
    for a, confidence in zip(answers, cascade.confidence(logits, policy["confidence"]),
                             strict=True):
        assert a["confidence"] == pytest.approx(confidence)
    accuracy = np.mean([a["label"] == n for a, n in zip(answers, test["label_name"],
                                                        strict=True)])
    # The teacher answers the deferred inputs in smaller batches than evaluate ran it on;
    # dynamic INT8 picks its activation ranges per batch, so a near tie could flip. None does
    # here: the cascade scores exactly what evaluate reported.
    assert accuracy == pytest.approx(chosen["accuracy"], abs=1e-12)


def test_manifest_lists_every_file_and_the_run(shipped):
    params, _, bundle_dir = shipped
    manifest = verify(bundle_dir)
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
               if p.is_file()} - {"bundle.json"}
    assert set(manifest["files"]) == on_disk
    assert {"student/model.onnx", "student/model.int8.onnx", "student/tokenizer.json",
            "student/preprocessing.json", "labels.json", "README.md", "card.html",
            "cascade.json", "teacher/model.int8.onnx", "teacher/tokenizer.json"} <= on_disk
    assert manifest["params"]["distill"]["layers"] == params.distill.layers
    assert manifest["git"]["commit"] is None or len(manifest["git"]["commit"]) == 40
    assert manifest["data"]["sha256"]  # the source manifest's digest: the data's version
    pre = json.loads((bundle_dir / "student/preprocessing.json").read_text())
    assert pre["max_length"] == params.distill.max_length and pre["pad_id"] >= 0


def test_a_tampered_or_incomplete_bundle_is_refused(shipped, tmp_path, capsys):
    _, _, bundle_dir = shipped
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    graph = copy / "student/model.int8.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"student/model.int8.onnx: content differs"):
        load_bundle(copy)
    assert cli(["predict", "--bundle", str(copy), "some text"]) == 2
    assert "do not match bundle.json" in capsys.readouterr().err
    (copy / "labels.json").unlink()
    with pytest.raises(BundleError, match=r"labels.json: missing"):
        verify(copy)
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match="not a still bundle"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")


def test_predict_file_reports_bad_rows_like_prepare(shipped, tmp_path):
    _, _, bundle_dir = shipped
    bundle = load_bundle(bundle_dir)
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,sports team wins the cup final\n2,"   "\n3,a,b\n'
                   "4,markets fall as rates rise\n")
    out = tmp_path / "preds.jsonl"
    summary = predict_file(bundle, str(src), out, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["origin"] for x in lines] == [f"{src}:2", f"{src}:5"]
    assert all(x["label"] in bundle.labels and 0 < x["probability"] <= 1 for x in lines)
    assert summary["predicted"] == 2
    assert summary["left_out"] == {"empty_text": 1, "malformed": 1}
    assert summary["left_out_examples"]["empty_text"] == [f"{src}:3"]
    assert summary["left_out_examples"]["malformed"][0].startswith(f"{src}:4 (3 fields")
    # error mode: stops, names the rows, and leaves no (partial) output behind
    out2 = tmp_path / "strict.jsonl"
    with pytest.raises(StageError, match=r"empty_text: 1 \(e\.g\. .*in\.csv:3\)"):
        predict_file(bundle, str(src), out2, on_bad_rows="error", progress=False)
    assert not out2.exists() and not list(tmp_path.glob(".strict.jsonl.tmp-*"))
    # JSONL with a broken line and a record without the text field, through the CLI
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "election results announced"}\n{not json\n{"body": "x"}\n')
    assert cli(["predict", "--bundle", str(bundle_dir), "--input", str(src), "--output",
                str(tmp_path / "j.jsonl"), "--cascade"]) == 0
    (line,) = (json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines())
    assert line["origin"] == f"{src}:1" and line["answered_by"] in ("student", "teacher")
    # a missing column is a clear error naming the option to set
    with pytest.raises(StageError, match="missing column.*--text-column"):
        predict_file(bundle, str(tmp_path / "in.csv"), tmp_path / "x.jsonl",
                     text_column="body", progress=False)


def test_predict_file_streams_batch_by_batch_in_input_order(shipped, tmp_path):
    """Several batches with bad rows between and after them: the same answers, origins and
    counts as predicting the usable texts at once; `--on-bad-rows error` on a bad row after
    batches were already predicted still leaves no output, no temporary file."""
    _, _, bundle_dir = shipped
    bundle = load_bundle(bundle_dir)
    texts = [f"{w} team score {i}" if i % 2 else f"chip network server {i} {w}"
             for i, w in enumerate(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"])]
    lines = ["text,id"] + [f"{t},{i}" for i, t in enumerate(texts)]
    lines.insert(4, '"",x')               # line 5: empty text
    lines.insert(9, "extra,field,here")   # line 10: malformed
    lines += ["", '"  ",last']            # a blank line (no row), then an empty text
    src = tmp_path / "many.csv"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.jsonl"
    summary = predict_file(bundle, str(src), out, batch_size=3, progress=False)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    good = [n for n, line in enumerate(lines, start=1) if line.split(",")[0] in texts]
    assert [g["origin"] for g in got] == [f"{src}:{n}" for n in good]
    expected = bundle.predict(texts, batch_size=3)  # the same batches: the same padding
    assert [{k: v for k, v in g.items() if k != "origin"} for g in got] == expected
    assert summary["predicted"] == len(texts) == 11
    assert summary["left_out"] == {"empty_text": 2, "malformed": 1}
    assert summary["left_out_examples"]["empty_text"] == [f"{src}:5", f"{src}:{len(lines)}"]
    strict = tmp_path / "strict.jsonl"
    with pytest.raises(StageError, match=rf"bad rows with --on-bad-rows error: empty_text: 1 "
                                         rf"\(e\.g\. {src}:5\)\. Fix the file"):
        predict_file(bundle, str(src), strict, on_bad_rows="error", batch_size=2,
                     progress=False)
    assert not strict.exists() and not list(tmp_path.glob(".strict.jsonl.tmp-*"))
    # the bad row is the last one: every batch was predicted, nothing is kept
    last_bad = tmp_path / "last_bad.csv"
    last_bad.write_text("\n".join(["text"] + texts + ['"  "']) + "\n")
    with pytest.raises(StageError, match=rf"empty_text: 1 \(e\.g\. {last_bad}:13\)"):
        predict_file(bundle, str(last_bad), strict, on_bad_rows="error", batch_size=2,
                     progress=False)
    assert not strict.exists() and not list(tmp_path.glob(".strict.jsonl.tmp-*"))


def test_predict_cli_prints_one_json_line_per_text(shipped, capsys):
    _, _, bundle_dir = shipped
    assert cli(["predict", "--bundle", str(bundle_dir), "goal scored late", "shares fell"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(out) == 2 and set(out[0]) == {"label", "probability"}
    assert cli(["predict", "--bundle", str(bundle_dir)]) == 2  # nothing to classify
    assert "give texts to classify" in capsys.readouterr().err


def _triton_schema():
    """Triton's ModelConfig message, from the model_config_pb2 tritonclient ships (loaded by
    path: importing tritonclient.grpc would need grpcio)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository_parses_with_tritons_schema(shipped, tmp_path, capsys):
    import onnx
    from google.protobuf import text_format

    _, _, bundle_dir = shipped
    bundle = load_bundle(bundle_dir)
    assert cli(["triton", "--bundle", str(bundle_dir), "--out", str(tmp_path / "repo")]) == 0
    folder = tmp_path / "repo" / "still_student"
    schema = _triton_schema()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), schema.ModelConfig())
    assert config.name == "still_student" and config.backend == "onnxruntime"
    assert config.max_batch_size == bundle.batch_size
    assert config.dynamic_batching.preferred_batch_size[-1] == bundle.batch_size
    graph = onnx.load(str(folder / "1" / "model.onnx"))
    assert [i.name for i in config.input] == [i.name for i in graph.graph.input]
    for given in config.input:
        assert given.data_type == schema.TYPE_INT64 and list(given.dims) == [-1]
    (output,) = config.output
    assert output.name == graph.graph.output[0].name == "logits"
    assert list(output.dims) == [len(bundle.labels)]
    assert (folder / output.label_filename).read_text().split() == bundle.labels
    # rewriting replaces the model folder; a foreign folder of that name is never deleted
    write_triton(bundle, tmp_path / "repo")
    (tmp_path / "repo" / "mine").mkdir()
    with pytest.raises(BundleError, match="not a Triton model folder"):
        write_triton(bundle, tmp_path / "repo", name="mine")


def test_model_card_is_generated_from_the_metrics(shipped):
    params, _, bundle_dir = shipped
    quality = load_quality(params.paths)
    card = (bundle_dir / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    acc = quality["systems"][params.ship.model]["accuracy"]
    assert metrics[0] == {"type": "accuracy", "value": round(acc, 4), "name": "test accuracy"}
    assert meta["pipeline_tag"] == "text-classification"
    for system, q in quality["systems"].items():
        assert f"| {system}" in card and f"{q['accuracy']:.4f}" in card
    threshold = quality["cascade"]["chosen"]["threshold"]
    assert f"below **{threshold:.2f}**" in card and "## Intended use and limits" in card
    assert "x |" in card  # speed ratios against the best teacher runtime
    page = (bundle_dir / "card.html").read_text()
    assert "<table>" in page and "<th>system</th>" in page and "| system |" not in page
    assert "model-index" not in page  # the front matter is metadata, not page text
    assert "data:image/png;base64," in page  # the Pareto plot, inlined


def test_reports_render_as_pages(shipped):
    params, _, _ = shipped
    page = (Path(params.paths.results) / "report.html").read_text()
    assert "<table>" in page and "<h1>" in page and "| system |" not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install "
                                             "chromium to look at the pages headless)")
def test_pages_in_a_headless_browser(shipped, tmp_path):
    """What a person sees: each page rendered by Chromium to a PNG of real content."""
    params, _, bundle_dir = shipped
    for page in (bundle_dir / "card.html", Path(params.paths.results) / "report.html"):
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'u'}",
                        "--window-size=1280,1600", f"--screenshot={shot}",
                        page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_ship_logs_the_bundle_as_the_wandb_model(shipped):
    params, _, _ = shipped
    runs = sorted(Path(params.paths.wandb).glob("wandb/offline-run-*"))
    records = [next(r.glob("run-*.wandb")).read_bytes() for r in runs]
    ship = [r for r in records if b"still bundle" in r]
    assert ship, "no W&B run logged the bundle"
    for name in (b"student/model.int8.onnx", b"bundle.json", b"cascade.json", b"README.md"):
        assert name in ship[-1], name


def test_params_refuse_a_bundle_that_cannot_be_built(tiny_params):
    from components.config import ParamsError, apply_overrides, validate

    raw = tiny_params.to_dict()
    with pytest.raises(ParamsError, match="ship.model: student_onnx_int8 needs export.int8"):
        validate(apply_overrides(raw, {"export.int8": False, "ship.cascade": False,
                                       "evaluate.cascade.enabled": False}))


def test_cascade_policy_needs_a_chosen_onnx_cascade():
    from components.ship import cascade_policy

    casc = {"student": "student_onnx_int8", "teacher": "teacher_onnx_int8", "chosen": None,
            "target_accuracy": 0.97}
    assert cascade_policy({"cascade": None})[1].startswith("evaluate ran without a cascade")
    assert "no confidence threshold reached the target accuracy 0.9700" in cascade_policy(
        {"cascade": casc})[1]
    eager = {**casc, "teacher": "teacher", "chosen": {"threshold": 0.5}}
    assert "cascade teacher 'teacher' is not an ONNX graph" in cascade_policy(
        {"cascade": eager})[1]


def test_ship_without_results_or_cascade_still_ships(shipped, tmp_path):
    """A fresh clone after `dvc pull` has quality.json but maybe no measured results; a run with
    the cascade off ships the student alone. Both give a verified bundle and a card that says
    what is missing."""
    from components import ship
    from components.config import apply_overrides, validate

    params, _, _ = shipped
    params = validate(apply_overrides(params.to_dict(), {
        "paths.results": str(tmp_path / "no-results"), "paths.bundle": str(tmp_path / "b"),
        "ship.cascade": False, "tracking.mode": "disabled"}))
    manifest = ship.run(params)
    assert manifest["cascade"] is False
    card = (tmp_path / "b" / "README.md").read_text()
    assert "Speed: not included (no measured results" in card
    assert "Not shipped: ship.cascade is false" in card
    assert not (tmp_path / "b" / "teacher").exists()
    texts = pd.Series(["markets rally"]).tolist()
    assert load_bundle(tmp_path / "b").predict(texts)[0]["label"]


def test_the_static_int8_student_ships_and_predicts(shipped, tmp_path, capsys):
    """The default bundle carries the static INT8 student; `ship.model:
    student_onnx_static_int8` makes it the one `still predict` runs, predicting what evaluate
    measured."""
    from components import ship
    from components.config import apply_overrides, validate

    params, _, bundle_dir = shipped
    assert "student/model.static_int8.onnx" in verify(bundle_dir)["files"]
    params = validate(apply_overrides(params.to_dict(), {
        "paths.bundle": str(tmp_path / "b"), "ship.model": "student_onnx_static_int8",
        "tracking.mode": "disabled"}))
    manifest = ship.run(params)
    assert manifest["model"] == "student_onnx_static_int8"
    assert manifest["models"]["student_onnx_static_int8"] == "student/model.static_int8.onnx"
    bundle = load_bundle(tmp_path / "b")
    test = load_split(params.paths, "test")
    texts = test["text"].tolist()
    expected = evaluate_logits(params, texts, STUDENT_STATIC_INT8).argmax(-1)
    answers = bundle.predict(texts)
    assert [a["label"] for a in answers] == [bundle.labels[k] for k in expected]
    accuracy = np.mean([a["label"] == n for a, n in zip(answers, test["label_name"],
                                                        strict=True)])
    assert accuracy == load_quality(params.paths)["systems"]["student_onnx_static_int8"][
        "accuracy"]
    card = (tmp_path / "b" / "README.md").read_text()
    assert "**student_onnx_static_int8** (`student/model.static_int8.onnx`)" in card
    assert "ONNX Runtime static INT8" in card
    capsys.readouterr()  # the stage's own lines
    assert cli(["predict", "--bundle", str(tmp_path / "b"), "goal scored late"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["label"] in bundle.labels
