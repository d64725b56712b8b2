"""The one Lightning fit loop, used by teacher fine-tuning and by distillation.

`ClassifierModule` trains any `model(input_ids, attention_mask) -> logits` with a pluggable
loss; `fit()` builds the Trainer (checkpointing, early stopping, progress bar, W&B logger,
seeded and deterministic) and returns the best weights' validation metrics.

Resume: every epoch (re)writes `last.ckpt` (full state: weights, optimizer, scheduler, early
stopping, best checkpoint) into the checkpoint folder, next to `params.sha256`, the hash of the
resolved params it was trained with. A run that was killed is rerun the same way (`dvc repro`):
when the hash matches, training continues from `last.ckpt`; when params changed, the old
checkpoints are discarded. Each epoch reseeds its shuffling and dropout from (seed, epoch), so a
resumed run follows the same path as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import nn

from components.config import Params
from components.reporting import tracking
from components.stage import StageError
from components.text.batches import chunks


class _NoPromotionalTips(logging.Filter):
    """Lightning logs "💡 Tip: ... try installing litmodels/litlogger" on every fit; the stage
    logs keep what describes the run and drop the advertising."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


for _name in ("lightning_utilities.core.rank_zero", "lightning_fabric.utilities.rank_zero",
              "pytorch_lightning.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoPromotionalTips())

LAST_CHECKPOINT = "last.ckpt"
PARAMS_HASH_FILE = "params.sha256"

# loss(outputs, batch) -> (loss, named parts). `outputs` is the model's logits, or, when the
# loss has `needs_features = True`, the model's `features()` tuple (logits first).
LossFn = Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]


def lightning_logger(params: Params, stage: str):
    """Lightning's W&B logger with the run settings every stage shares (`tracking`)."""
    from pytorch_lightning.loggers import WandbLogger

    kwargs = tracking.init_kwargs(params, stage)
    kwargs["save_dir"] = kwargs.pop("dir")  # WandbLogger's name for wandb.init's `dir`
    return WandbLogger(name=stage, **kwargs)


def cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
    loss = nn.functional.cross_entropy(logits, batch["labels"])
    return loss, {"ce": loss}


class ClassifierModule(pl.LightningModule):
    """Trains `model`; a loss that is an nn.Module (e.g. with learned feature projections) is
    registered too, so its parameters are optimised and checkpointed with the model."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float,
                 warmup_ratio: float):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        if getattr(self.loss_fn, "needs_features", False):
            outputs = self.model.features(batch["input_ids"], batch["attention_mask"])
            logits = outputs[0]
        else:
            outputs = logits = self(batch["input_ids"], batch["attention_mask"])
        loss, parts = self.loss_fn(outputs, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        n = len(logits)
        # Validation loss is plain CE on the true labels, whatever the training loss, so early
        # stopping compares like with like across KD settings.
        # sync_dist: averaged over processes under ddp (a no-op on one device).
        self.log("val/loss", nn.functional.cross_entropy(logits, batch["labels"]),
                 prog_bar=True, batch_size=n, sync_dist=True)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=n, sync_dist=True)
        if "teacher_logits" in batch:
            agree = (logits.argmax(-1) == batch["teacher_logits"].argmax(-1)).float().mean()
            self.log("val/teacher_agreement", agree, batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # model + any learned loss projections
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.warmup_ratio)

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def configure_torch(params: Params) -> None:
    torch.set_num_threads(params.trainer.num_threads)
    pl.seed_everything(params.seed, workers=True, verbose=False)


class EpochSeed(pl.Callback):
    """Seed each epoch's randomness (shuffle order, dropout) from (seed, epoch) alone.

    Lightning checkpoints do not hold RNG states, so without this a run resumed at epoch k
    would shuffle like epoch 0 and drift from the run that was never interrupted.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer, trainer.current_epoch)  # a resumed run's first epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning may create the next epoch's iterator (drawing its permutation) before
        # on_train_epoch_start, so seed it here too.
        self._reseed(trainer, trainer.current_epoch + 1)

    def _reseed(self, trainer: pl.Trainer, epoch: int) -> None:
        epoch_seed = self.seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            samplers = {id(s): s for s in (getattr(loader, "sampler", None), getattr(
                getattr(loader, "batch_sampler", None), "sampler", None)) if s is not None}
            for sampler in samplers.values():
                # A fresh generator of the sampler's own: the loader's generator is also drawn
                # from when an iterator is created, which Lightning does at different times
                # in a fresh and a resumed run. RandomSampler reads it at its first draw.
                if getattr(sampler, "generator", None) is not None:
                    sampler.generator = torch.Generator().manual_seed(epoch_seed)


def params_hash(params: Params, stage: str, epochs: int, module: nn.Module | None = None,
                data: pl.LightningDataModule | None = None) -> str:
    """Hash of what a checkpoint was trained from: the resolved params, and (when given) the
    initial weights and the encoded train/validation examples, so a checkpoint is never
    resumed after the data or the starting model changed under the same params."""
    h = hashlib.sha256(json.dumps({"stage": stage, "epochs": epochs,
                                   "params": params.to_dict()}, sort_keys=True).encode())
    if module is not None:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for split in ("train", "val"):
        dataset = getattr(data, split, None)
        if hasattr(dataset, "ids") and hasattr(dataset, "labels"):
            if hasattr(dataset.ids, "digest"):  # batches.TokenIds
                dataset.ids.digest(h)
            else:
                h.update(json.dumps([list(map(int, x)) for x in dataset.ids]).encode())
            h.update(np.ascontiguousarray(dataset.labels).tobytes())
            for key, values in sorted(getattr(dataset, "targets", {}).items()):
                h.update(key.encode())
                for chunk in chunks(values):  # memory maps are read a chunk at a time
                    h.update(chunk.tobytes())
    return h.hexdigest()


def resume_checkpoint(checkpoint_dir: Path, digest: str) -> Path | None:
    """`last.ckpt` of an interrupted run with the same params, else None after clearing the
    folder (stale checkpoints from other params must never be resumed).

    Under a multi-process strategy every process calls this; only rank 0 clears the folder.
    The other ranks make the same decision without touching it: launched by Lightning they
    start after rank 0 has cleared it, and under torchrun/SLURM (all ranks at once) a second
    rmtree/mkdir would race with rank 0's.
    """
    last = checkpoint_dir / LAST_CHECKPOINT
    hash_file = checkpoint_dir / PARAMS_HASH_FILE
    why = "no last.ckpt"
    if last.is_file() and hash_file.is_file() and hash_file.read_text().strip() == digest:
        try:  # a checkpoint cut short by the kill itself must not stop the rerun
            torch.load(last, map_location="cpu", weights_only=True, mmap=True)
            return last
        except Exception as err:  # torch raises several types for truncated/corrupt files
            why = f"{LAST_CHECKPOINT} cannot be loaded: {str(err).splitlines()[0][:200]}"
    elif last.is_file():
        why = "params changed"
    if rank_zero_only.rank != 0:  # the launcher's RANK/LOCAL_RANK/SLURM_PROCID, read at import
        return None
    if checkpoint_dir.exists():
        print(f"training: discarding checkpoints in {checkpoint_dir} ({why}), starting fresh")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    hash_file.write_text(digest + "\n")
    return None


def lightning_trainer(params: Params, **settings) -> pl.Trainer:
    """A deterministic Trainer on `params.trainer`'s accelerator, devices, strategy, num_nodes
    and precision, plus `settings`: the one place training and teacher caching
    (`components.training.teacher_outputs`) build theirs, so both scale out the same way. Values
    Lightning refuses here become one StageError naming them."""
    t = params.trainer
    try:
        return pl.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
                          num_nodes=t.num_nodes, precision=t.precision, deterministic=True,
                          **settings)
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise StageError(
            f"trainer params (accelerator={t.accelerator!r}, devices={t.devices!r}, "
            f"strategy={t.strategy!r}, num_nodes={t.num_nodes}, precision={t.precision!r}) "
            f"are not usable here: {err}") from None


def leave_process_group() -> None:
    """After a multi-process loop the other ranks exit and rank 0 goes on alone: it leaves the
    process group first, so Lightning does not mistake it for a distributed run and nothing
    waits on a collective that never comes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit(module: ClassifierModule, data: pl.LightningDataModule, params: Params, stage: str,
        epochs: int, checkpoint_dir: str | Path, patience: int | None = None,
        callbacks: Sequence[pl.Callback] = ()) -> dict[str, float]:
    """Train (resuming an interrupted run with the same params from its `last.ckpt`), restore
    the best checkpoint's weights into `module`, return its val metrics. `callbacks` are extra
    Lightning callbacks (e.g. a profiler or a fault injector in tests)."""
    checkpoint_dir = Path(checkpoint_dir)
    resume = resume_checkpoint(checkpoint_dir, params_hash(params, stage, epochs, module, data))
    # The version counter is off so a resumed run overwrites best.ckpt/last.ckpt in place
    # instead of writing best-v1.ckpt beside a file it already tracks.
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/loss",
                           mode="min", save_top_k=1, save_weights_only=True,
                           enable_version_counter=False)
    # Full state (optimizer, scheduler, loops, callbacks) after every epoch, one file
    # rewritten in place (Lightning saves through an fsspec transaction: never half written).
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename=LAST_CHECKPOINT.removesuffix(".ckpt"),
                           monitor=None, save_top_k=1, enable_version_counter=False)
    callbacks = [best, last, EpochSeed(params.seed), TQDMProgressBar(refresh_rate=10),
                 *callbacks]
    if patience:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=patience))
    trainer = lightning_trainer(
        params,
        max_epochs=epochs,
        logger=lightning_logger(params, stage),
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_model_summary=False,
        default_root_dir=str(checkpoint_dir),
    )
    module.train()  # HF from_pretrained returns eval mode; Lightning keeps the mode it is given
    if resume is not None:
        print(f"{stage}: resuming from {resume} (a previous run with the same params stopped)")
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    if not trainer.is_global_zero:
        # Multi-process strategies (ddp, ...) run the stage once per process; the others stop
        # after training, rank 0 alone measures the best weights and writes the outputs.
        raise SystemExit(0)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    metrics = _final_validator(trainer, params).validate(module, datamodule=data,
                                                         verbose=False)[0]
    metrics["epochs_trained"] = trainer.current_epoch
    _finish_wandb(trainer, metrics)
    return {k: float(v) for k, v in metrics.items()}


def _final_validator(trainer: pl.Trainer, params: Params) -> pl.Trainer:
    """The trainer that measures the best weights: the training one on a single process.

    Across processes, validation shards the set with a DistributedSampler, which pads the shards
    to equal length by repeating examples (33 examples on 2 processes count one twice), so the
    stage's metrics would depend on the world size. They come from rank 0 alone on one device
    instead, over every validation example exactly once. The other ranks stop after training,
    so rank 0 leaves the process group first: it is then an ordinary single process, which
    Lightning does not mistake for a distributed run, and nothing can wait on a collective that
    never comes.
    """
    if trainer.world_size == 1:
        return trainer
    leave_process_group()
    t = params.trainer
    return pl.Trainer(accelerator=t.accelerator, devices=1, num_nodes=1, precision=t.precision,
                      deterministic=True, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=[TQDMProgressBar(refresh_rate=10)],
                      default_root_dir=trainer.default_root_dir)


def _finish_wandb(trainer: pl.Trainer, metrics: dict) -> None:
    """Close the W&B run with the last logged values and the best weights' `metrics`."""
    import wandb

    if trainer.logger is not None and wandb.run is not None:
        summary = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        wandb.run.summary.update({**summary, **{k: float(v) for k, v in metrics.items()}})
        wandb.finish()
