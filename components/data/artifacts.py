"""The artifacts contract: the file names inside every stage output and the readers (and small
writers) for them. A stage finds another stage's output here, never by importing that stage;
readers take `Paths` (the `paths:` section of params), not all of the params.

- prepared data (`paths.data`): `<split>.parquet` (columns text, label, label_name),
  `label_map.json` (`{"labels": [class names]}`), `report.json`;
- domain tokenizer (`paths.tokenizer`): `tokenizer.json`;
- teacher (`paths.teacher`): a Hugging Face model folder; its cached outputs (the teacher_cache
  stage, `paths.teacher_outputs`): for every split and, with `distill.windows`, for the training
  windows listed in `windows.parquet` (text, source row in train, label), one `.npy` file per
  array, `<name>.logits.npy` (float32 [n, labels]) and `<name>.layers.npy` (float16
  [n, layers + 1, hidden], the mean-pooled hidden states), written batch by batch and read as
  memory maps, plus `outputs.json` (the row count of each name: the index the reader checks);
- student (`paths.student`): `config.json` + `model.safetensors` and a copy of the tokenizer;
  the models themselves are read by `components.models` (`teacher.load_saved`,
  `student.load`), which the stages that run them import;
- export (`paths.export`): the deployable ONNX graphs of both sides, the student (`model.onnx`,
  `model.int8.onnx`, its `tokenizer.json`, `preprocessing.json`) and the fine-tuned teacher
  (`teacher.onnx`, `teacher.int8.onnx`, `teacher.tokenizer.json`,
  `teacher.preprocessing.json`), so that evaluate measures the teacher a user would deploy
  instead of distilling (ONNX Runtime, FP32 and INT8), not only PyTorch eager; the
  preprocessing files say how text becomes each graph's inputs (`components.serving.bundle`);
- evaluation (`paths.evaluate`): `quality.json` (accuracy with intervals, size, FLOPs, cascade
  policy: what predictions decide); its measured side in `paths.results` (`metrics.json`,
  plots, report), git-tracked and outside dvc.lock;
- source manifest (`paths.source_version`): what identifies the data's version.
Every stage output also holds `params.json` (its stage's params) and most a `metrics.json`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.config import Paths
from components.data.files import read_json, reading, write_json
from components.stage import StageError

if TYPE_CHECKING:  # annotations only; the stages that need these import them
    from tokenizers import Tokenizer

# Prepared data
SPLITS = ("train", "validation", "test")
LABEL_MAP_FILE = "label_map.json"
REPORT_FILE = "report.json"
# Domain tokenizer
TOKENIZER_FILE = "tokenizer.json"
# Teacher outputs cached for distillation (the teacher_cache stage)
OUTPUTS_INDEX = "outputs.json"  # {"outputs": {name: rows}, "layers_dtype", ...}
OUTPUTS_FORMAT = "still-teacher-outputs/2"
LAYERS_DTYPE = np.float16  # pooled states: half the bytes; KD measured unchanged (issue 16)
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
# ONNX Runtime static INT8 (QDQ) graphs, calibrated on train texts (`export.static_int8`)
STUDENT_STATIC_INT8 = "model.static_int8.onnx"
TEACHER_STATIC_INT8 = "teacher.static_int8.onnx"
# Evaluated ONNX system -> (graph, tokenizer, preprocessing) in the export folder: what a bundle
# ships for that system and what evaluate times as the deployed path.
EXPORTED_GRAPHS = {
    "student_onnx": (STUDENT_FP32, STUDENT_TOKENIZER, STUDENT_PREPROCESSING),
    "student_onnx_int8": (STUDENT_INT8, STUDENT_TOKENIZER, STUDENT_PREPROCESSING),
    "student_onnx_static_int8": (STUDENT_STATIC_INT8, STUDENT_TOKENIZER, STUDENT_PREPROCESSING),
    "teacher_onnx": (TEACHER_FP32, TEACHER_TOKENIZER, TEACHER_PREPROCESSING),
    "teacher_onnx_int8": (TEACHER_INT8, TEACHER_TOKENIZER, TEACHER_PREPROCESSING),
    "teacher_onnx_static_int8": (TEACHER_STATIC_INT8, TEACHER_TOKENIZER, TEACHER_PREPROCESSING),
}
# Evaluation (machine-independent part; the timed results go to `paths.results`)
QUALITY_FILE = "quality.json"
SEARCH_RESULTS = "search"  # in `paths.results`: `still search`'s trials (kept by evaluate)
RESULTS_FILE = "metrics.json"  # in `paths.results`: timings, ratios, best teacher, cascade cost


# ------------------------------------------------------------------------ prepared data

def write_prepared(out: Path, splits: dict[str, pd.DataFrame], label_names: list[str],
                   report: dict) -> None:
    """Write prepare's files into `out` (the stage's temporary output folder)."""
    for split, frame in splits.items():
        frame.to_parquet(out / f"{split}.parquet", index=False)
    write_json(out / LABEL_MAP_FILE, {"labels": label_names})
    write_json(out / REPORT_FILE, report)


def split_frame(texts: list[str], ids: list[int], label_names: list[str]) -> pd.DataFrame:
    """Rows of a split as the DataFrame pandas builds from lists, so that its Parquet schema
    (pandas metadata included) is what `DataFrame.to_parquet` writes: a split that fits in one
    batch is byte-identical to a whole frame written at once."""
    as_pandas = pd.Series(["text"]).dtype  # how this pandas holds a list of str: str or object
    return pd.DataFrame({
        "text": pd.Series(texts, dtype=as_pandas),
        "label": np.asarray(ids, dtype=np.int64),
        "label_name": pd.Series([label_names[i] for i in ids], dtype=as_pandas),
    })


class SplitWriter:
    """`<split>.parquet` (text, label, label_name) written batch by batch, one row group per
    `write`, into `out` (prepare's temporary output folder): memory holds one batch."""

    def __init__(self, out: Path, split: str, label_names: list[str]):
        self.path, self.split, self.label_names = out / f"{split}.parquet", split, label_names
        self.rows = 0
        self._writer = None

    def write(self, texts: list[str], ids: list[int]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(split_frame(texts, ids, self.label_names),
                                     preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="snappy")
        self._writer.write_table(table)
        self.rows += len(texts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


_DAMAGED = ("it is damaged (a full disk, an interrupted copy) or was edited: restore it with "
            "`dvc checkout`, or rerun the prepare stage (dvc repro -f prepare)")


def split_path(paths: Paths, split: str) -> Path:
    path = Path(paths.data) / f"{split}.parquet"
    if not path.is_file():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return path


def _check_labels(path: Path, paths: Paths, names: list[str], ids: np.ndarray,
                  label_names: np.ndarray | None, first_row: int = 0) -> None:
    """A label id outside the map (or a name that disagrees with it) means the split and the
    map come from different runs, and every accuracy computed on it would be wrong."""
    unknown = sorted({int(i) for i in ids if not 0 <= i < len(names)})
    if unknown:
        raise StageError(
            f"{path}: label id(s) {unknown} are not in "
            f"{Path(paths.data) / LABEL_MAP_FILE} ({len(names)} labels: {names}); "
            "the split and the label map come from different "
            "prepare runs: rerun prepare (dvc repro prepare) and the stages after it")
    if label_names is not None:
        mismatch = label_names != np.asarray(names, dtype=object)[ids]
        if mismatch.any():
            row = int(np.flatnonzero(mismatch)[0])
            raise StageError(
                f"{path}: row {first_row + row} has label {int(ids[row])} named "
                f"{label_names[row]!r} but label_map.json calls it "
                f"{names[ids[row]]!r}; rerun prepare (dvc repro prepare)")


def load_split(paths: Paths, split: str) -> pd.DataFrame:
    """A prepared split, checked against `label_map.json` (`_check_labels`), all in memory:
    for the held-out splits that evaluation scores. Stages that read the train split at any
    size stream it instead (`iter_split_texts`, `load_split_labels`)."""
    path = split_path(paths, split)
    with reading(path, f"the prepared {split} split", _DAMAGED):
        df = pd.read_parquet(path)
        missing = {"text", "label"} - set(df.columns)
        if missing:
            raise ValueError(f"no column(s) {sorted(missing)}")
    _check_labels(path, paths, load_label_names(paths), df["label"].to_numpy(),
                  df["label_name"].to_numpy() if "label_name" in df else None)
    return df


# Rows per batch when a table is streamed in or out (a source read, a prepared split written or
# read): what memory holds besides one row. A prepared split gets one Parquet row group per
# BATCH_ROWS rows, so the value is part of what prepare writes.
BATCH_ROWS = 10_000


def parquet_rows(path: Path, what: str, fix: str = _DAMAGED) -> int:
    """Rows of a Parquet file, from its footer (nothing else is read)."""
    import pyarrow.parquet as pq

    with reading(path, what, fix):
        return pq.ParquetFile(path).metadata.num_rows


def iter_parquet(path: Path, columns: list[str], what: str, fix: str = _DAMAGED,
                 batch_rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """A Parquet file as DataFrames of at most `batch_rows` rows, in order: memory holds one
    batch, whatever the file's size. A damaged file or a missing column is a StageError."""
    import pyarrow.parquet as pq

    with reading(path, what, fix):
        reader = pq.ParquetFile(path)
        missing = set(columns) - set(reader.schema_arrow.names)
        if missing:
            raise ValueError(f"no column(s) {sorted(missing)}")
        batches = reader.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        with reading(path, what, fix):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch.to_pandas()


def read_labels(path: Path, what: str, fix: str = _DAMAGED) -> np.ndarray:
    """The int64 `label` column of a Parquet file (e.g. the training windows), read batch by
    batch (8 bytes per row held). Unchecked: a prepared split goes through
    `load_split_labels`, which checks it against the label map."""
    parts = [f["label"].to_numpy() for f in iter_parquet(path, ["label"], what, fix)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def iter_split_texts(paths: Paths, split: str,
                     batch_rows: int = BATCH_ROWS) -> Iterator[list[str]]:
    """The texts of a prepared split in batches, in order (labels: `load_split_labels`)."""
    path = split_path(paths, split)
    for frame in iter_parquet(path, ["text"], f"the prepared {split} split",
                              batch_rows=batch_rows):
        yield frame["text"].tolist()


def load_split_labels(paths: Paths, split: str) -> np.ndarray:
    """The label ids of a prepared split, checked against `label_map.json` as `load_split`
    checks them, read batch by batch (8 bytes per row held)."""
    path = split_path(paths, split)
    names = load_label_names(paths)
    import pyarrow.parquet as pq

    with reading(path, f"the prepared {split} split", _DAMAGED):
        has_names = "label_name" in pq.ParquetFile(path).schema_arrow.names
    columns = ["label", "label_name"] if has_names else ["label"]
    parts, row = [], 0
    for frame in iter_parquet(path, columns, f"the prepared {split} split"):
        ids = frame["label"].to_numpy()
        _check_labels(path, paths, names, ids,
                      frame["label_name"].to_numpy() if has_names else None, row)
        parts.append(ids.astype(np.int64))
        row += len(ids)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


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

def outputs_files(name: str) -> tuple[str, str]:
    """The files of one name's cached teacher outputs: logits, pooled layers."""
    return f"{name}.logits.npy", f"{name}.layers.npy"


class NpyWriter:
    """A `.npy` file of known shape written row block by row block, in order, through a plain
    file handle: constant memory and no memory map, whatever the file's size. The file is
    complete (readable by `np.load`) once every row has been written and it is closed;
    `close()` refuses a short file."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        np.lib.format.write_array_header_2_0(self._fh, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": self.shape})

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path.name}: block {block.shape} does not fit "
                             f"{self.shape} after {self.rows} rows")
        self._fh.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        self._fh.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} of {self.shape[0]} rows written")


def write_outputs_index(out: Path, rows: dict[str, int], num_labels: int,
                        layers: tuple[int, int], layers_dtype=LAYERS_DTYPE) -> None:
    """`outputs.json`: what `load_teacher_outputs` expects to find beside it."""
    write_json(out / OUTPUTS_INDEX, {
        "format": OUTPUTS_FORMAT, "outputs": rows, "num_labels": num_labels,
        "layers_shape": list(layers), "logits_dtype": "float32",
        "layers_dtype": np.dtype(layers_dtype).name})


_RERUN_LABEL = "rerun the teacher_cache stage (dvc repro -f teacher_cache)"


def load_teacher_outputs(paths: Paths) -> dict[str, np.ndarray]:
    """The cached teacher outputs as read-only memory maps, `<name>_logits` and
    `<name>_layers` for every name in `outputs.json`: nothing is read into memory until an
    example is asked for. Each file is checked against the index (rows, shape, dtype). The
    teacher_cache stage writes float16 layers; an index saying float32 (a full-precision copy, as
    benchmarks/scale.py's KD check makes) is read as such."""
    folder = Path(paths.teacher_outputs)
    index_path = folder / OUTPUTS_INDEX
    if not index_path.is_file():
        old = " (it holds the outputs.npz of an older version)" if (
            folder / "outputs.npz").is_file() else ""
        raise StageError(f"{index_path} not found{old}: run the teacher_cache stage "
                         "(dvc repro teacher_cache)")
    index = read_json(index_path)
    if not (isinstance(index, dict) and index.get("format") == OUTPUTS_FORMAT
            and isinstance(index.get("outputs"), dict)):
        raise StageError(f"{index_path}: not a {OUTPUTS_FORMAT} index; {_RERUN_LABEL}")
    k, layers = index["num_labels"], tuple(index["layers_shape"])
    layers_dtype = index.get("layers_dtype")
    if layers_dtype not in ("float16", "float32"):
        raise StageError(f"{index_path}: layers_dtype {layers_dtype!r} is not float16 or "
                         f"float32; {_RERUN_LABEL}")
    arrays = {}
    for name, rows in index["outputs"].items():
        specs = {"logits": ((rows, k), np.dtype(np.float32)),
                 "layers": ((rows, *layers), np.dtype(layers_dtype))}
        for (kind, (shape, dtype)), file in zip(specs.items(), outputs_files(name),
                                                strict=True):
            path = folder / file
            if not path.is_file():
                raise StageError(f"{path} not found; {_RERUN_LABEL}")
            with reading(path, f"the cached teacher {kind} of {name}", _RERUN_LABEL):
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                if array.shape != shape or array.dtype != dtype:
                    raise ValueError(f"holds {array.dtype} {array.shape}, outputs.json says "
                                     f"{dtype} {shape}")
            arrays[f"{name}_{kind}"] = array
    return arrays


def windows_path(paths: Paths) -> Path | None:
    """The training windows the teacher_cache stage labelled (None when windows are off)."""
    path = Path(paths.teacher_outputs) / WINDOWS_FILE
    return path if path.is_file() else None


def load_windows(paths: Paths) -> pd.DataFrame | None:
    """The labelled training windows in memory (text, source, label); None when windows are
    off. Training streams them instead (`iter_parquet` on `windows_path`)."""
    path = windows_path(paths)
    if path is None:
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


# --------------------------------------------------------------------------- static INT8


def split_head(paths: Paths, split: str, n: int) -> list[str]:
    """The first `n` texts of a prepared split, read only as far as needed."""
    texts: list[str] = []
    for batch in iter_split_texts(paths, split, batch_rows=max(1, min(n, BATCH_ROWS))):
        texts += batch[: n - len(texts)]
        if len(texts) >= n:
            break
    return texts
