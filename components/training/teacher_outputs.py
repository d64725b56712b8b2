"""The teacher over many texts through Lightning's predict loop: the teacher_cache stage's engine.

`cache_outputs` runs a model's `features()` (logits and mean-pooled layers) over Parquet files
of texts and writes them batch by batch into `.npy` files (`artifacts.NpyWriter`): memory holds
one batch of texts and outputs, whatever the number of texts. The Trainer comes from
`training.lightning_trainer`, as training's does, so `devices`/`strategy`/`num_nodes` (ddp on
CPUs or GPUs, torchrun, SLURM) split the work across processes the same way.

How the work is split: every source is cut into batches of `batch_size` consecutive rows,
numbered from 0; process r of W runs the batches b with b % W == r, each exactly as a single
process would (same rows, same padding), writing its own shard files (one per source and
array, never a file another process writes: safe on a shared network filesystem). After the
loop, rank 0 interleaves the shards back into row order, sequentially, through file handles;
with one process the shard is the result and is renamed. So the cache does not depend on the
number of processes (tests/test_ddp.py compares 2 processes with 1).

Every process reads every text (cheap next to the model) but tokenises and runs only its own
batches. Ranks other than 0 exit after the loop; rank 0 returns and writes the stage output.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, IterableDataset

from components.config import Params
from components.data.artifacts import (
    LAYERS_DTYPE,
    NpyWriter,
    iter_parquet,
    outputs_files,
    parquet_rows,
)
from components.stage import StageError
from components.text.encoding import Encoder
from components.text.tensors import pad_batch
from components.training.fit import leave_process_group, lightning_trainer

# Lightning warns about any IterableDataset with a __len__ in case several loader workers
# duplicate it; this one runs in the main process and its length is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")


@dataclass
class Source:
    """Texts to run the teacher over: a Parquet file with a `text` column."""

    name: str  # the name the outputs are cached under ("train", ..., "windows")
    path: Path
    what: str  # how messages name it
    # None: read from the file's footer once the loop starts, i.e. after the process group
    # formed (the training windows are a file rank 0 writes just before).
    rows: int | None = None

    def count(self) -> int:
        if self.rows is None:
            self.rows = parquet_rows(self.path, self.what)
        return self.rows


def _batch_rows(rows: int, batch_size: int) -> list[int]:
    """The size of every batch of a source, in order."""
    return [min(batch_size, rows - start) for start in range(0, rows, batch_size)]


def _own_rows(rows: int, batch_size: int, rank: int, world: int) -> int:
    return sum(_batch_rows(rows, batch_size)[rank::world])


class _Batches(IterableDataset):
    """Rank `rank`'s batches of every source, tokenised and padded, in order. Each item says
    which source it comes from; the texts are streamed from the Parquet files."""

    def __init__(self, sources: list[Source], tokenizer, max_length: int, batch_size: int,
                 pad: int, rank: int, world: int):
        self.sources, self.batch_size, self.pad = sources, batch_size, pad
        self.encoder = Encoder(tokenizer, max_length)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return sum(len(_batch_rows(s.count(), self.batch_size)[self.rank::self.world])
                   for s in self.sources)

    def _text_batches(self, source: Source):
        """Exactly `batch_size` texts per batch (the last one shorter), whatever the Parquet
        file's row groups: the batches must be the same in every process."""
        buffer: list[str] = []
        for frame in iter_parquet(source.path, ["text"], source.what):
            buffer.extend(frame["text"].tolist())
            while len(buffer) >= self.batch_size:
                yield buffer[:self.batch_size]
                buffer = buffer[self.batch_size:]
        if buffer:
            yield buffer

    def __iter__(self):
        for index, source in enumerate(self.sources):
            seen = 0
            for b, texts in enumerate(self._text_batches(source)):
                seen += len(texts)
                if b % self.world == self.rank:
                    ids = self.encoder.ids(texts)
                    input_ids, mask = pad_batch(ids, self.pad)
                    yield {"input_ids": input_ids, "attention_mask": mask, "source": index}
            if seen != source.count():
                raise StageError(f"{source.path}: {seen} rows read, its footer says "
                                 f"{source.count()}; the file changed while the teacher ran")


class _Predictor(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, data: dict):
        super().__init__()
        self.model, self.data = model, data

    def predict_step(self, batch, batch_idx):
        logits, layers = self.model.features(batch["input_ids"], batch["attention_mask"])
        return logits.float(), layers

    def predict_dataloader(self) -> DataLoader:
        # Built here, once the strategy knows this process's rank and the world size.
        return DataLoader(_Batches(**self.data, rank=self.trainer.global_rank,
                                   world=self.trainer.world_size), batch_size=None)


class _ShardWriter(pl.Callback):
    """Writes each process's outputs into its own shard files, batch by batch, in order."""

    def __init__(self, work: Path, sources: list[Source], batch_size: int, num_labels: int,
                 layers: tuple[int, int], layers_dtype=LAYERS_DTYPE):
        self.work, self.sources, self.batch_size = work, sources, batch_size
        self.num_labels, self.layers, self.layers_dtype = num_labels, layers, layers_dtype
        self.writers: dict[str, tuple[NpyWriter, NpyWriter]] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        for s in self.sources:
            n = _own_rows(s.count(), self.batch_size, rank, world)
            logits, layers = (self.work / shard_name(f, rank) for f in outputs_files(s.name))
            self.writers[s.name] = (NpyWriter(logits, (n, self.num_labels), np.float32),
                                    NpyWriter(layers, (n, *self.layers), self.layers_dtype))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx=0) -> None:
        logits, layers = outputs
        writers = self.writers[self.sources[int(batch["source"])].name]
        writers[0].write(logits.cpu().numpy())
        writers[1].write(layers.float().cpu().numpy())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for writers in self.writers.values():
            for w in writers:
                w.close()
        trainer.strategy.barrier("still-teacher-outputs-written")


def shard_name(file: str, rank: int) -> str:
    return file.replace(".npy", f".rank{rank}.npy")


def _interleave(work: Path, file: str, rows: int, batch_size: int, world: int) -> None:
    """The shards of `file` (batch b in shard b % world) into `work/file` in row order."""
    readers = []
    for rank in range(world):
        fh = open(work / shard_name(file, rank), "rb")  # noqa: SIM115 (closed below)
        np.lib.format.read_magic(fh)
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        readers.append(fh)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    writer = NpyWriter(work / file, (rows, *shape[1:]), dtype)
    try:
        for b, n in enumerate(_batch_rows(rows, batch_size)):
            block = readers[b % world].read(n * row_bytes)
            writer.write(np.frombuffer(block, dtype=dtype).reshape(n, *shape[1:]))
        writer.close()
    finally:
        for fh in readers:
            fh.close()
    for rank in range(world):
        (work / shard_name(file, rank)).unlink()


def cache_outputs(model: torch.nn.Module, tokenizer, sources: list[Source], params: Params,
                  work: Path, num_labels: int, layers: tuple[int, int], max_length: int,
                  batch_size: int, pad: int, progress: str, layers_dtype=LAYERS_DTYPE) -> None:
    """Run `model.features` over every source; on rank 0, return once `work` holds
    `<name>.logits.npy` / `<name>.layers.npy` for every source, in row order. Other ranks
    exit (SystemExit(0)) once their shards are written. `work` must exist and be empty of
    shards (rank 0 prepares it before calling). `layers_dtype`: float16 (the cache's format)
    or float32 (a full-precision reference, benchmarks/fp16_cache.py)."""
    writer = _ShardWriter(work, sources, batch_size, num_labels, layers, layers_dtype)
    trainer = lightning_trainer(params, logger=False, enable_checkpointing=False,
                                enable_model_summary=False,
                                callbacks=[writer, _Progress(progress)])
    data = {"sources": sources, "tokenizer": tokenizer, "max_length": max_length,
            "batch_size": batch_size, "pad": pad}
    model.eval()
    trainer.predict(_Predictor(model, data), return_predictions=False)
    world = trainer.world_size
    if not trainer.is_global_zero:
        raise SystemExit(0)
    leave_process_group()
    for s in sources:
        for file in outputs_files(s.name):
            if world == 1:
                os.replace(work / shard_name(file, 0), work / file)
            else:
                _interleave(work, file, s.count(), batch_size, world)


class _Progress(TQDMProgressBar):
    """Lightning's predict bar, named after what runs."""

    def __init__(self, description: str):
        super().__init__(refresh_rate=10)
        self.description = description

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.set_description(self.description)
        return bar
