"""The artifacts contract: the file names inside every stage output and the readers (and small
writers) for them. A stage finds another stage's output here, never by importing that stage;
readers take `Paths` (the `paths:` section of params), not all of the params.

- prepared data (`paths.data`): `<split>.parquet` (columns text, label, label_name),
  `label_map.json` (`{"labels": [class names]}`), `report.json`;
- domain tokenizer (`paths.tokenizer`): `tokenizer.json`;
- teacher (`paths.teacher`): a Hugging Face model folder; its cached outputs (the label stage,
  `paths.teacher_outputs`): `outputs.npz` with `<split>_logits` and `<split>_layers` for every
  split and, with `distill.windows`, `windows_logits`/`windows_layers` for the training windows
  listed in `windows.parquet` (text, source row in train, label);
- student (`paths.student`): `config.json` + `model.safetensors` and a copy of the tokenizer;
  the models themselves are read by `components.models` (`teacher.load_saved`,
  `student.load`), which the stages that run them import;
- export (`paths.export`): the deployable ONNX graphs of both sides, the student (`model.onnx`,
  `model.int8.onnx`, its `tokenizer.json`, `preprocessing.json`) and the fine-tuned teacher
  (`teacher.onnx`, `teacher.int8.onnx`, `teacher.tokenizer.json`,
  `teacher.preprocessing.json`), so that evaluate measures the teacher a user would deploy
  instead of distilling (ONNX Runtime, FP32 and INT8), not only PyTorch eager; the
  preprocessing files say how text becomes each graph's inputs (`components.bundle`);
- evaluation (`paths.evaluate`): `quality.json` (accuracy with intervals, size, FLOPs, cascade
  policy: what predictions decide); its measured side in `paths.results` (`metrics.json`,
  plots, report), git-tracked and outside dvc.lock;
- source manifest (`paths.source_version`): what identifies the data's version.
Every stage output also holds `params.json` (its stage's params) and most a `metrics.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.common import StageError, read_json, reading, write_json
from components.config import Paths

if TYPE_CHECKING:  # annotations only; the stages that need these import them
    from tokenizers import Tokenizer

# Prepared data
SPLITS = ("train", "validation", "test")
LABEL_MAP_FILE = "label_map.json"
REPORT_FILE = "report.json"
# Domain tokenizer
TOKENIZER_FILE = "tokenizer.json"
# Teacher outputs cached for distillation (the label stage)
OUTPUTS_FILE = "outputs.npz"
WINDOWS_FILE = "windows.parquet"  # training windows the teacher labelled: text, source, label
# Export
STUDENT_FP32 = "model.onnx"
STUDENT_INT8 = "model.int8.onnx"
STUDENT_TOKENIZER = "tokenizer.json"
TEACHER_FP32 = "teacher.onnx"
TEACHER_INT8 = "teacher.int8.onnx"
TEACHER_TOKENIZER = "teacher.tokenizer.json"
STUDENT_PREPROCESSING = "preprocessing.json"  # components.bundle.preprocessing()
TEACHER_PREPROCESSING = "teacher.preprocessing.json"
# ONNX Runtime static INT8 (QDQ) graphs, calibrated on validation (`export.static_int8`)
STUDENT_STATIC_INT8 = "model.static_int8.onnx"
TEACHER_STATIC_INT8 = "teacher.static_int8.onnx"
# Evaluation (machine-independent part; the timed results go to `paths.results`)
QUALITY_FILE = "quality.json"
RESULTS_FILE = "metrics.json"  # in `paths.results`: timings, ratios, best teacher, cascade cost


# ------------------------------------------------------------------------ prepared data

def write_prepared(out: Path, splits: dict[str, pd.DataFrame], label_names: list[str],
                   report: dict) -> None:
    """Write prepare's files into `out` (the stage's temporary output folder)."""
    for split, frame in splits.items():
        frame.to_parquet(out / f"{split}.parquet", index=False)
    write_json(out / LABEL_MAP_FILE, {"labels": label_names})
    write_json(out / REPORT_FILE, report)


_DAMAGED = ("it is damaged (a full disk, an interrupted copy) or was edited: restore it with "
            "`dvc checkout`, or rerun the prepare stage (dvc repro -f prepare)")


def load_split(paths: Paths, split: str) -> pd.DataFrame:
    """A prepared split, checked against `label_map.json`: a label id outside the map (or a
    name that disagrees with it) means the split and the map come from different runs, and
    every accuracy computed on it would be wrong."""
    path = Path(paths.data) / f"{split}.parquet"
    if not path.is_file():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    with reading(path, f"the prepared {split} split", _DAMAGED):
        df = pd.read_parquet(path)
        missing = {"text", "label"} - set(df.columns)
        if missing:
            raise ValueError(f"no column(s) {sorted(missing)}")
    names = load_label_names(paths)
    ids = df["label"].to_numpy()
    unknown = sorted({int(i) for i in ids if not 0 <= i < len(names)})
    if unknown:
        raise StageError(
            f"{path}: label id(s) {unknown} are not in "
            f"{Path(paths.data) / LABEL_MAP_FILE} ({len(names)} labels: {names}); "
            "the split and the label map come from different "
            "prepare runs: rerun prepare (dvc repro prepare) and the stages after it")
    if "label_name" in df:
        mismatch = df["label_name"].to_numpy() != np.asarray(names, dtype=object)[ids]
        if mismatch.any():
            row = int(np.flatnonzero(mismatch)[0])
            raise StageError(
                f"{path}: row {row} has label {int(ids[row])} named "
                f"{df['label_name'].iloc[row]!r} but label_map.json calls it "
                f"{names[ids[row]]!r}; rerun prepare (dvc repro prepare)")
    return df


def load_label_names(paths: Paths) -> list[str]:
    path = Path(paths.data) / LABEL_MAP_FILE
    labels = read_json(path)
    labels = labels.get("labels") if isinstance(labels, dict) else None
    if not (isinstance(labels, list) and labels and all(isinstance(n, str) for n in labels)):
        raise StageError(f"{path}: cannot read the label map (expected {{\"labels\": [class "
                         f"names]}}); {_DAMAGED}")
    return labels


# ------------------------------------------------------------------------ tokenizer

def load_tokenizer(paths: Paths) -> Tokenizer:
    """The domain tokenizer the tokenizer stage trained."""
    from tokenizers import Tokenizer

    path = Path(paths.tokenizer) / TOKENIZER_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the tokenizer stage first (dvc repro tokenizer)")
    with reading(path, "the tokenizer", "it is damaged or was edited: restore it with `dvc "
                                        "checkout`, or rerun the tokenizer stage (dvc repro -f "
                                        "tokenizer)"):
        return Tokenizer.from_file(str(path))


# ------------------------------------------------------------------------ teacher

def write_teacher_outputs(out: Path, outputs: dict[str, tuple[np.ndarray, np.ndarray]],
                          windows: pd.DataFrame | None = None) -> None:
    """`outputs[name] = (logits, pooled layers)` into `out/outputs.npz` (name: a split, or
    "windows" with `windows` the window table in the same order)."""
    np.savez(out / OUTPUTS_FILE,
             **{f"{s}_logits": outputs[s][0] for s in outputs},
             **{f"{s}_layers": outputs[s][1] for s in outputs})
    if windows is not None:
        windows.to_parquet(out / WINDOWS_FILE, index=False)


_RERUN_LABEL = "rerun the label stage (dvc repro -f label)"


def load_teacher_outputs(paths: Paths) -> dict[str, np.ndarray]:
    path = Path(paths.teacher_outputs) / OUTPUTS_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the label stage first (dvc repro label)")
    with reading(path, "the cached teacher outputs", _RERUN_LABEL), \
            np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_windows(paths: Paths) -> pd.DataFrame | None:
    """The training windows the label stage labelled (None when windows are off)."""
    path = Path(paths.teacher_outputs) / WINDOWS_FILE
    if not path.is_file():
        return None
    with reading(path, "the labelled training windows", _RERUN_LABEL):
        return pd.read_parquet(path)


# ------------------------------------------------------------------------ evaluation

def load_quality(paths: Paths) -> dict:
    """evaluate's timing-free results: per-system quality and the cascade policy."""
    path = Path(paths.evaluate) / QUALITY_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the evaluate stage first (dvc repro evaluate)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("systems"), dict):
        raise StageError(f"{path}: no per-system results; rerun dvc repro -f evaluate")
    return data


def load_results(paths: Paths) -> dict | None:
    """evaluate's measured results (`paths.results/metrics.json`), or None when absent (a
    fresh clone that has not run evaluate here, or results not committed)."""
    path = Path(paths.results) / RESULTS_FILE
    return read_json(path) if path.is_file() else None


def load_prepare_report(paths: Paths) -> dict:
    return read_json(Path(paths.data) / REPORT_FILE)


def load_source_manifest(paths: Paths) -> dict | None:
    path = Path(paths.source_version)
    return read_json(path) if path.is_file() else None
