"""label: run the fine-tuned teacher once over everything the students learn from.

Produces in `paths.teacher_outputs`: for every split, the teacher's logits
(`<split>.logits.npy`, float32) and the mean-pooled hidden states of its embeddings and every
layer (`<split>.layers.npy`, float16 [n, layers + 1, hidden], for feature distillation); with
`distill.windows` enabled also the same for every training window (`windows.*.npy`) and the
windows themselves (`windows.parquet`: text, source row in the train split, label); the index
`outputs.json`; `metrics.json` (the teacher's accuracy per split, window counts) and
`params.json`. The files are written batch by batch and read back as memory maps
(`artifacts.load_teacher_outputs`): memory does not grow with the data.

The teacher runs through Lightning's predict loop (`components.training.teacher_outputs`), with the
Trainer built from `params.trainer` like training's: `trainer.devices`/`strategy`/`num_nodes` split
the caching across processes, and the cache is the same whatever their number.

The windows are what TinyBERT-style augmentation adds: the default articles are about four
times longer than the 128 tokens a model reads, so each training text is sliced into word
windows (`batches.text_windows`) that the teacher labels here, once, for any number of
students. A separate stage from `teacher`, so that changing the windows never fine-tunes the
teacher again.

Run: `python -m components.teacher_cache` (or `dvc repro teacher_cache`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from components.config import Params
from components.data.artifacts import (
    LAYERS_DTYPE,
    OUTPUTS_INDEX,
    SPLITS,
    WINDOWS_FILE,
    iter_split_texts,
    load_label_names,
    load_split_labels,
    outputs_files,
    read_labels,
    split_path,
    write_outputs_index,
)
from components.data.files import atomic_dir, write_json
from components.models.teacher import load_saved
from components.stage import StageError, stage_main
from components.text.batches import text_windows
from components.text.encoding import pad_id
from components.training.teacher_outputs import Source, cache_outputs

WINDOWS_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.int64()),
                            ("label", pa.int64())])


def write_windows(params: Params, train_labels: np.ndarray, path: Path) -> None:
    """The training windows (`batches.text_windows`) into `path`, batch by batch: text, the
    row of the train split it comes from, that row's label."""
    win, row = params.distill.windows, 0
    with pq.ParquetWriter(path, WINDOWS_SCHEMA) as writer:
        for texts in iter_split_texts(params.paths, "train"):
            windows, source = text_windows(texts, win.words, win.stride, win.max_per_text)
            source = source + row
            writer.write_table(pa.table({"text": pa.array(windows, pa.string()),
                                         "source": source,
                                         "label": train_labels[source]},
                                        schema=WINDOWS_SCHEMA))
            row += len(texts)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of (memory-mapped) logits, read a chunk at a time."""
    hits = 0
    for start in range(0, len(labels), 65536):
        hits += int((np.asarray(logits[start:start + 65536]).argmax(-1)
                     == labels[start:start + 65536]).sum())
    return hits / max(1, len(labels))


def run(params: Params, layers_dtype=LAYERS_DTYPE) -> dict:
    """The stage; `layers_dtype` float32 writes a full-precision cache instead of the float16
    one (benchmarks/fp16_cache.py compares students distilled from both)."""
    cfg, win = params.teacher, params.distill.windows
    torch.set_num_threads(params.trainer.num_threads)
    names = load_label_names(params.paths)
    # Checked before any model work: every split's labels against the label map.
    labels = {s: load_split_labels(params.paths, s) for s in SPLITS}
    model, hf_tok = load_saved(params.paths.teacher)
    if model.hf.config.num_labels != len(names):
        raise StageError(
            f"the teacher in {params.paths.teacher} has {model.hf.config.num_labels} labels but "
            f"the data has {len(names)} ({names}): rerun the teacher stage (dvc repro teacher)")
    backend = hf_tok.backend_tokenizer
    final = Path(params.paths.teacher_outputs)
    # Shards and windows are written here first; every process (ddp, torchrun, SLURM) finds
    # it at the same place. Rank 0 empties it; the others start writing only after the
    # process group formed, i.e. after rank 0 got this far.
    work = final.with_name(f".{final.name}.work")
    windows_file = work / WINDOWS_FILE
    if rank_zero_only.rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if win.enabled:
            write_windows(params, labels["train"], windows_file)
    sources = [Source(s, split_path(params.paths, s), f"the prepared {s} split", len(labels[s]))
               for s in SPLITS]
    if win.enabled:
        sources.append(Source("windows", windows_file, "the training windows"))
    hf = model.hf.config
    try:
        cache_outputs(model, backend, sources, params, work, len(names),
                      (hf.num_hidden_layers + 1, hf.hidden_size), cfg.max_length,
                      cfg.eval_batch_size, pad_id(backend), "label: teacher", layers_dtype)
    except BaseException:
        if rank_zero_only.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise
    # Rank 0 alone from here.
    metrics = {}
    for s in SPLITS:
        logits = np.load(work / outputs_files(s)[0], mmap_mode="r")
        metrics[f"{s}_accuracy"] = accuracy(logits, labels[s])
    if win.enabled:
        window_labels = read_labels(windows_file, "the training windows")
        logits = np.load(work / outputs_files("windows")[0], mmap_mode="r")
        if len(window_labels):
            metrics["windows_label_agreement"] = accuracy(logits, window_labels)
        metrics["windows"] = len(window_labels)
        metrics["windows_per_text"] = len(window_labels) / max(1, len(labels["train"]))
    with atomic_dir(final, params, "teacher_cache") as out:
        for s in sources:
            for file in outputs_files(s.name):
                (work / file).replace(out / file)
        if win.enabled:
            windows_file.replace(out / WINDOWS_FILE)
        write_outputs_index(out, {s.name: s.count() for s in sources}, len(names),
                            (hf.num_hidden_layers + 1, hf.hidden_size), layers_dtype)
        write_json(out / "metrics.json", metrics)
    shutil.rmtree(work, ignore_errors=True)
    extra = (f", {metrics['windows']} training windows (teacher agrees with the text's label "
             f"on {metrics.get('windows_label_agreement', 0):.4f})" if win.enabled else "")
    print(f"label: teacher outputs cached for {', '.join(SPLITS)}{extra} ({OUTPUTS_INDEX})")
    return metrics


def main() -> None:
    stage_main("teacher_cache", run)


if __name__ == "__main__":
    main()
