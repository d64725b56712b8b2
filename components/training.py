"""The one Lightning fit loop, used by teacher fine-tuning and by distillation.

`ClassifierModule` trains any `model(input_ids, attention_mask) -> logits` with a pluggable
loss; `fit()` builds the Trainer (checkpointing, early stopping, progress bar, W&B logger,
seeded and deterministic) and returns the best weights' validation metrics.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from components import tracking
from components.common import StageError
from components.config import Params

# loss(outputs, batch) -> (loss, named parts). `outputs` is the model's logits, or, when the
# loss has `needs_features = True`, the model's `features()` tuple (logits first).
LossFn = Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]


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


def fit(module: ClassifierModule, data: pl.LightningDataModule, params: Params, stage: str,
        epochs: int, checkpoint_dir: str | Path, patience: int | None = None) -> dict[str, float]:
    """Train, restore the best checkpoint's weights into `module`, return its val metrics."""
    checkpoint_dir = Path(checkpoint_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/loss",
                           mode="min", save_top_k=1, save_weights_only=True)
    callbacks = [best, TQDMProgressBar(refresh_rate=10)]
    if patience:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=patience))
    t = params.trainer
    try:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            precision=t.precision,
            deterministic=True,
            logger=tracking.lightning_logger(params, stage),
            callbacks=callbacks,
            log_every_n_steps=10,
            enable_model_summary=False,
            default_root_dir=str(checkpoint_dir),
        )
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise StageError(
            f"trainer params (accelerator={t.accelerator!r}, devices={t.devices!r}, "
            f"strategy={t.strategy!r}, num_nodes={t.num_nodes}, precision={t.precision!r}) "
            f"are not usable here: {err}") from None
    module.train()  # HF from_pretrained returns eval mode; Lightning keeps the mode it is given
    trainer.fit(module, datamodule=data)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    metrics["epochs_trained"] = trainer.current_epoch
    _finish_wandb(trainer)
    if not trainer.is_global_zero:
        # Multi-process strategies (ddp, ...) run the stage once per process; only rank 0
        # goes on to write the stage's outputs.
        raise SystemExit(0)
    return {k: float(v) for k, v in metrics.items()}


def _finish_wandb(trainer: pl.Trainer) -> None:
    import wandb

    if trainer.logger is not None and wandb.run is not None:
        wandb.run.summary.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        wandb.finish()
