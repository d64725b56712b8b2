"""Models and files: a missing teacher, a teacher whose head does not fit the data, corrupt
weights or ONNX files and TensorRT without a GPU all stop the stage with a StageError that names
the file (or param) and the fix; the stage's previous outputs stay as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from components import evaluate, export, prepare, teacher
from components.config import validate
from components.data.artifacts import TOKENIZER_FILE
from components.exporting.trt import engines
from components.models.student import Student, StudentConfig, save
from components.stage import StageError
from components.tokenizer import train
from tests.conftest import make_examples, tiny_raw_params
from tests.reliability.conftest import leftovers, snapshot


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, dataset_csv, tiny_teacher):
    """Prepared data and a tiny saved student (weights + its tokenizer), built once."""
    work = tmp_path_factory.mktemp("models")
    params = validate(tiny_raw_params(work, dataset_csv, tiny_teacher, **{
        "export.int8": False, "evaluate.cascade.enabled": False,
        "ship.model": "student_onnx"}))
    prepare.run(params)
    tok = train(make_examples(per_class=20)["text"].tolist(), "wordpiece", vocab_size=80,
                min_frequency=1)
    torch.manual_seed(0)
    student = Student(StudentConfig(vocab_size=tok.get_vocab_size(), num_labels=3,
                                    max_length=params.distill.max_length, layers=1, hidden=16,
                                    heads=2, intermediate=32))
    folder = work / "student-good"
    folder.mkdir()
    save(student.eval(), folder)
    tok.save(str(folder / TOKENIZER_FILE))
    return params, folder


def with_paths(params, **paths):
    raw = params.to_dict()
    raw["paths"].update({k: str(v) for k, v in paths.items()})
    return validate(raw)


def with_teacher(params, model, finetune="auto"):
    raw = params.to_dict()
    raw["teacher"].update(model=str(model), finetune=finetune)
    return validate(raw)


def test_missing_teacher_folder_names_it_and_the_fix(prepared, tmp_path):
    params, _ = prepared
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(StageError) as err:
        teacher.run(with_teacher(params, missing))
    assert str(err.value) == (
        f"teacher.model={str(missing)!r}: folder {missing} does not exist; point teacher.model "
        "at a Hugging Face model folder, a hub id or pkg:MODULE/sub/path")


def test_teacher_head_for_other_labels_with_finetune_never(prepared, tiny_teacher, tmp_path):
    from transformers import BertForSequenceClassification

    params, _ = prepared
    two = tmp_path / "two-label-teacher"
    hf = BertForSequenceClassification.from_pretrained(
        tiny_teacher, num_labels=2, id2label={0: "sport", 1: "tech"},
        label2id={"sport": 0, "tech": 1})
    hf.save_pretrained(two)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_teacher / name).is_file():
            shutil.copy(tiny_teacher / name, two / name)
    out = Path(params.paths.teacher)
    with pytest.raises(StageError) as err:
        teacher.run(with_teacher(params, two, finetune="never"))
    msg = str(err.value)
    assert "teacher.finetune=never" in msg
    assert "has a head for 2 labels ['sport', 'tech']" in msg
    assert "the data has 3 labels ['food', 'sport', 'tech']" in msg
    assert "Set teacher.finetune: auto" in msg
    with pytest.raises(StageError, match="has no classification head"):
        teacher.run(with_teacher(params, tiny_teacher, finetune="never"))  # bare encoder
    assert not out.exists() and leftovers(out) == []


def test_corrupt_student_weights_name_the_file(prepared, tmp_path):
    params, good = prepared
    student = tmp_path / "student"
    shutil.copytree(good, student)
    (student / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous good export")
    before = snapshot(out)
    with pytest.raises(StageError) as err:
        export.run(with_paths(params, student=student, export=out))
    msg = str(err.value)
    assert msg.startswith(f"{student / 'model.safetensors'} is not a valid safetensors file")
    assert "rerun the distill stage (dvc repro -f distill)" in msg
    assert snapshot(out) == before and leftovers(out) == []


def _eval_inputs(params, good, tiny_teacher, tmp_path):
    """A teacher folder, a student folder and an export folder evaluate can read."""
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher_dir)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    return with_paths(params, teacher=teacher_dir, student=good, export=export_dir,
                      evaluate=tmp_path / "evaluate", results=tmp_path / "results")


def test_corrupt_onnx_file_names_the_file(prepared, tiny_teacher, tmp_path):
    params, good = prepared
    params = _eval_inputs(params, good, tiny_teacher, tmp_path)
    onnx = Path(params.paths.export) / "model.onnx"
    onnx.write_bytes(b"this is not protobuf")
    with pytest.raises(StageError) as err:
        evaluate.run(params)
    msg = str(err.value)
    assert msg.startswith(f"{onnx} cannot be loaded by ONNX Runtime")
    assert "rerun the export stage (dvc repro -f export)" in msg
    assert not Path(params.paths.evaluate).exists() and not Path(params.paths.results).exists()


def test_corrupt_teacher_checkpoint_names_the_folder(prepared, tiny_teacher, tmp_path):
    params, good = prepared
    params = _eval_inputs(params, good, tiny_teacher, tmp_path)
    weights = Path(params.paths.teacher) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # cut short, as by a full disk
    with pytest.raises(StageError) as err:
        evaluate.run(params)
    msg = str(err.value)
    assert msg.startswith(f"the teacher in {params.paths.teacher} (model.safetensors")
    assert "rerun the teacher stage (dvc repro -f teacher)" in msg


@pytest.mark.skipif(engines.availability()[0], reason="a GPU with TensorRT is present")
def test_tensorrt_required_without_a_gpu_fails_naming_the_fix(prepared, tmp_path):
    params, good = prepared
    raw = with_paths(params, student=good, export=tmp_path / "export").to_dict()
    raw["export"]["tensorrt"]["enabled"] = True
    out = tmp_path / "export"
    out.mkdir()
    (out / "metrics.json").write_text('{"previous": true}\n')
    before = snapshot(out)
    with pytest.raises(StageError) as err:
        export.run(validate(raw))
    msg = str(err.value)
    reason = engines.availability()[1]
    assert reason in msg
    assert "export.tensorrt.enabled: auto" in msg and "still[trt]" in msg
    assert snapshot(out) == before and leftovers(out) == []  # nothing half-written replaced it
