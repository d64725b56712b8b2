"""Distil on more inputs (issue 15, lever 1): word windows of every training text, labelled once
by the teacher in the teacher_cache stage, and the student trained on examples + windows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components import teacher_cache
from components.config import apply_overrides, validate
from components.data.artifacts import load_split, load_teacher_outputs, load_windows
from components.distill import train as distill
from components.models.teacher import load_saved, predict_outputs
from components.stage import StageError
from components.text.batches import encode, text_windows
from components.text.encoding import pad_id


def test_windows_follow_words_stride_and_cap():
    text = " ".join(f"w{i}" for i in range(10))
    texts, source = text_windows([text, "too short", text], words=4, stride=3, max_per_text=5)
    # Starts at words 3 and 6 (the text's own start is its example); a window at 9 would hold
    # one word, less than half of 4.
    assert texts[:2] == ["w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert source.tolist() == [0, 0, 2, 2]
    capped, _ = text_windows([text], words=4, stride=3, max_per_text=1)
    assert capped == ["w3 w4 w5 w6"]
    spaced, _ = text_windows(["a  b\n\nc d e f"], words=2, stride=2, max_per_text=3)
    assert spaced == ["c d", "e f"]


def windowed(params, tmp_path, **windows):
    raw = apply_overrides(params.to_dict(), {
        "distill.windows.enabled": True, "distill.windows.words": 4,
        "distill.windows.stride": 3, "distill.windows.max_per_text": 2,
        **{f"distill.windows.{k}": v for k, v in windows.items()},
        "paths.teacher_outputs": str(tmp_path / "teacher_outputs"),
        "paths.student": str(tmp_path / "student"),
    })
    return validate(raw)


def test_label_stage_caches_windows_and_distill_trains_on_them(trained_pipeline, tmp_path):
    params, _ = trained_pipeline
    p = windowed(params, tmp_path)
    metrics = teacher_cache.run(p)
    windows = load_windows(p.paths)
    train = load_split(p.paths, "train")
    texts, source = text_windows(train["text"].tolist(), 4, 3, 2)
    assert len(windows) == metrics["windows"] == len(texts) > len(train) // 2
    assert windows["text"].tolist() == texts
    assert windows["source"].tolist() == source.tolist()
    assert (windows["label"].to_numpy() == train["label"].to_numpy()[source]).all()

    # The cached logits are the teacher's on exactly those texts; the splits are unchanged
    # from the pipeline's own label run.
    cache = load_teacher_outputs(p.paths)
    model, tok = load_saved(p.paths.teacher)
    backend = tok.backend_tokenizer
    ids = encode(backend, texts, p.teacher.max_length)
    logits, layers = predict_outputs(model, ids, 7, pad_id(backend))
    np.testing.assert_allclose(cache["windows_logits"], logits, atol=1e-5)
    # The pooled layers are stored as float16: equal to the teacher's to half precision.
    assert cache["windows_layers"].dtype == np.float16
    np.testing.assert_allclose(cache["windows_layers"], layers, rtol=2e-3, atol=2e-3)
    reference = load_teacher_outputs(params.paths)
    np.testing.assert_allclose(cache["train_logits"], reference["train_logits"], atol=1e-5)

    d = distill.run(p)
    assert d["train_examples"] == len(train) + len(windows)
    assert d["val_accuracy"] > 0.8


def test_windows_without_labelled_windows_is_a_clear_error(trained_pipeline, tmp_path):
    params, _ = trained_pipeline
    off = validate(apply_overrides(windowed(params, tmp_path).to_dict(), {
        "distill.windows.enabled": False}))
    teacher_cache.run(off)  # a cache labelled with windows off, then distill asks for them
    assert load_windows(off.paths) is None
    with pytest.raises(StageError, match=r"no labelled windows.*dvc repro teacher_cache"):
        distill.run(windowed(params, tmp_path))


def test_a_stale_window_table_is_refused(trained_pipeline, tmp_path):
    params, _ = trained_pipeline
    p = windowed(params, tmp_path, max_per_text=1)
    teacher_cache.run(p)
    path = tmp_path / "teacher_outputs" / "windows.parquet"
    frame = pd.read_parquet(path)
    frame.iloc[:-1].to_parquet(path, index=False)
    with pytest.raises(StageError, match=r"windows but .* cached teacher outputs"):
        distill.run(p)


# ----------------------------------------------------------- teacher-initialised students (lever 2)

def test_teacher_initialised_student_distils_and_exports(trained_pipeline, tmp_path):
    from components import export
    from components.models import student as student_io

    params, _ = trained_pipeline
    p = validate(apply_overrides(params.to_dict(), {
        "distill.init": "teacher", "distill.layers": 1,
        "paths.student": str(tmp_path / "student"), "paths.export": str(tmp_path / "export"),
        "export.teacher": False, "evaluate.cascade.enabled": False}))
    d = distill.run(p)
    assert d["init"] == "teacher" and d["val_accuracy"] > 0.8
    model = student_io.load(p.paths.student)
    teacher, _ = load_saved(p.paths.teacher)
    c = teacher.hf.config
    assert (model.cfg.norm_position, model.cfg.hidden, model.cfg.layers) == ("post",
                                                                            c.hidden_size, 1)
    assert model.cfg.vocab_size == c.vocab_size
    # The student reads text with the teacher's own tokenizer, shipped beside it.
    from pathlib import Path

    assert (Path(p.paths.student) / "tokenizer.json").read_bytes() == (
        Path(p.paths.teacher) / "tokenizer.json").read_bytes()
    e = export.run(p)
    assert e["fp32"]["max_abs_error"] < 1e-3


@pytest.mark.parametrize("overrides, message", [
    ({"distill.teacher_layers": [0]}, "only used with distill.init: teacher"),
    ({"distill.init": "teacher", "distill.layers": 2, "distill.teacher_layers": [0]},
     "1 layers listed but distill.layers is 2"),
    ({"distill.init": "teacher", "distill.layers": 2, "distill.teacher_layers": [1, 1]},
     "must be distinct"),
])
def test_teacher_layers_are_validated(tiny_params, overrides, message):
    from components.config import ParamsError

    with pytest.raises(ParamsError, match=message):
        validate(apply_overrides(tiny_params.to_dict(), overrides))


def test_teacher_layers_beyond_the_teacher_are_a_stage_error(trained_pipeline, tmp_path):
    params, _ = trained_pipeline
    p = validate(apply_overrides(params.to_dict(), {
        "distill.init": "teacher", "distill.layers": 1, "distill.teacher_layers": [5],
        "paths.student": str(tmp_path / "student")}))
    with pytest.raises(StageError, match="5"):
        distill.run(p)
