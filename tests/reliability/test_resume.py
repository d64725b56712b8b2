"""Faults during training: a fit killed mid-way resumes from its last checkpoint and ends where
an uninterrupted fit ends; checkpoints from other params or broken checkpoints are never
resumed."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from components.models.student import Student, StudentConfig
from components.text.tensors import EncodedDataset, TextDataModule
from components.training.fit import (
    LAST_CHECKPOINT,
    PARAMS_HASH_FILE,
    ClassifierModule,
    cross_entropy,
    fit,
)

EPOCHS = 4


class Kill(pl.Callback):
    """Stands in for a SIGKILL / power cut: training dies at the start of epoch `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            raise RuntimeError(f"simulated kill at epoch {self.at}")


def setup_run(seed: int = 0):
    """A small student (with dropout, so RNG state matters) on data whose label is readable
    from one token; rebuilt identically for every run."""
    torch.manual_seed(seed)
    model = Student(StudentConfig(vocab_size=40, num_labels=3, max_length=16, layers=1,
                                  hidden=16, heads=2, intermediate=32, dropout=0.1))
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 3, n)
        ids = [[2, *rng.integers(8, 40, 5).tolist(), *[4 + int(y)] * 3, 3] for y in labels]
        return EncodedDataset(ids, labels)

    data = TextDataModule(split(96), split(32), batch_size=16, pad=0, seed=seed)
    return ClassifierModule(model, cross_entropy, lr=1e-2, weight_decay=0.0,
                            warmup_ratio=0.1), data


@pytest.fixture
def quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B itself is covered by the pipeline tests


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_killed_fit_resumes_from_last_checkpoint_and_matches_uninterrupted(
        tiny_params, tmp_path, quiet_wandb, capsys):
    module, data = setup_run()
    reference = fit(module, data, tiny_params, "distill", EPOCHS, tmp_path / "ref")
    expected = weights(module)

    ckpt = tmp_path / "ckpt"
    module, data = setup_run()
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(module, data, tiny_params, "distill", EPOCHS, ckpt, callbacks=[Kill(at=2)])
    assert (ckpt / LAST_CHECKPOINT).is_file() and (ckpt / PARAMS_HASH_FILE).is_file()
    saved = torch.load(ckpt / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1  # the last finished epoch before the kill
    capsys.readouterr()

    module, data = setup_run()  # a fresh process would rebuild everything from scratch
    resumed = fit(module, data, tiny_params, "distill", EPOCHS, ckpt)
    assert f"resuming from {ckpt / LAST_CHECKPOINT}" in capsys.readouterr().out
    assert resumed["epochs_trained"] == reference["epochs_trained"] == EPOCHS
    assert reference["val/acc"] > 0.6  # it learned something worth reproducing (chance 1/3)
    assert resumed["val/loss"] == pytest.approx(reference["val/loss"], abs=1e-5)
    assert resumed["val/acc"] == pytest.approx(reference["val/acc"], abs=1e-6)
    got = weights(module)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_checkpoint_from_other_params_or_unreadable_is_discarded(tiny_params, tmp_path,
                                                                 quiet_wandb, capsys):
    ckpt = tmp_path / "ckpt"
    module, data = setup_run()
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(module, data, tiny_params, "distill", EPOCHS, ckpt, callbacks=[Kill(at=1)])
    capsys.readouterr()

    # Same stage, different params (epochs): must start from scratch.
    module, data = setup_run()
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(module, data, tiny_params, "distill", EPOCHS + 1, ckpt, callbacks=[Kill(at=1)])
    out = capsys.readouterr().out
    assert "params changed" in out and "resuming" not in out

    # Same params but a checkpoint truncated by the kill: start fresh, say why.
    (ckpt / LAST_CHECKPOINT).write_bytes((ckpt / LAST_CHECKPOINT).read_bytes()[:100])
    module, data = setup_run()
    metrics = fit(module, data, tiny_params, "distill", EPOCHS + 1, ckpt)
    out = capsys.readouterr().out
    assert f"{LAST_CHECKPOINT} cannot be loaded" in out and "resuming" not in out
    assert metrics["epochs_trained"] == EPOCHS + 1
