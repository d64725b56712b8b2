"""The train/validation/test split of prepare: a seeded per-class shuffle, so every split sees
every class."""

from __future__ import annotations

import numpy as np

from components.config import Prepare
from components.data.artifacts import SPLITS


def stratified_split(
    labels: np.ndarray, cfg: Prepare, seed: int
) -> dict[str, np.ndarray]:
    """Seeded per-class shuffle; each class contributes round(n * fraction) to validation/test
    (at least one each) so every split sees every class."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        n_val = max(1, round(n * cfg.validation_fraction))
        n_test = max(1, round(n * cfg.test_fraction))
        parts["validation"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}
