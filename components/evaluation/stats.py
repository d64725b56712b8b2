"""Uncertainty for decisions made on a few hundred test examples.

- `Bootstrap`: one seeded set of resampled index rows (percentile bootstrap), shared by every
  system, so the intervals of two systems and of their difference come from the same resamples
  (a paired bootstrap: the difference is computed per resample, on the same examples).
- `mcnemar_exact`: McNemar's exact test on the discordant pairs of two classifiers (a
  two-sided binomial test of b vs b + c at p = 0.5), the standard test for "do these two
  classifiers differ in accuracy on the same examples".
- `timing_summary`: median and interquartile range of repeated timings.

Accuracy and macro-F1 are computed in numpy from per-resample confusion counts (macro-F1 as
sklearn's `f1_score(average="macro")` over the classes present in labels or predictions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

LEVEL = 0.95


def macro_f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro-F1 per row of confusion counts [..., C, C] (actual x predicted); classes with no
    label and no prediction are left out of the mean, as sklearn does."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1).astype(np.float64)
    actual, predicted = counts.sum(-1), counts.sum(-2)
    denom = actual + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = denom > 0
    return (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1)


class Bootstrap:
    """Seeded resamples of `n` examples; `resamples` rows of indices drawn with replacement.

    Args:
        labels: true class ids of the evaluation split.
        num_classes: number of classes (confusion counts are C x C).
        resamples: how many bootstrap resamples.
        seed: the pipeline seed; the same seed gives the same intervals.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, resamples: int, seed: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.c = int(num_classes)
        rng = np.random.default_rng(seed)
        self.idx = rng.integers(0, len(self.labels), size=(resamples, len(self.labels)))

    def _counts(self, preds: np.ndarray) -> np.ndarray:
        codes = self.labels * self.c + np.asarray(preds, dtype=np.int64)
        sampled = codes[self.idx]  # [B, n]
        offsets = np.arange(len(sampled))[:, None] * self.c * self.c
        flat = np.bincount((sampled + offsets).ravel(), minlength=len(sampled) * self.c ** 2)
        return flat.reshape(len(sampled), self.c, self.c)

    def _scores(self, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counts = self._counts(preds)
        acc = np.trace(counts, axis1=1, axis2=2) / len(self.labels)
        return acc, macro_f1_from_counts(counts)

    @staticmethod
    def interval(samples: np.ndarray) -> list[float]:
        lo, hi = np.percentile(samples, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
        return [float(lo), float(hi)]

    def scores(self, preds: np.ndarray) -> dict:
        """95% intervals of accuracy and macro-F1."""
        acc, f1 = self._scores(preds)
        return {"accuracy_ci": self.interval(acc), "macro_f1_ci": self.interval(f1)}

    def difference(self, preds: np.ndarray, reference: np.ndarray) -> dict:
        """Paired bootstrap of accuracy(preds) - accuracy(reference) (and macro-F1), with
        whether the 95% interval contains 0 ("within noise")."""
        a_acc, a_f1 = self._scores(preds)
        b_acc, b_f1 = self._scores(reference)
        labels = self.labels
        diff = float((preds == labels).mean() - (reference == labels).mean())
        ci = self.interval(a_acc - b_acc)
        return {"accuracy_diff": diff, "accuracy_diff_ci": ci,
                "macro_f1_diff_ci": self.interval(a_f1 - b_f1),
                "within_noise": bool(ci[0] <= 0.0 <= ci[1])}


def versus(boot: Bootstrap, preds: np.ndarray, reference: np.ndarray) -> dict:
    """A system against a reference on the same examples: the paired bootstrap difference
    (`Bootstrap.difference`) and McNemar's exact p-value."""
    return {**boot.difference(preds, reference),
            "mcnemar_p": mcnemar_exact(preds, reference, boot.labels)["p_value"]}


def mcnemar_exact(preds: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    """McNemar's exact test: b = examples only `preds` gets right, c = only `reference` does."""
    right_a, right_b = preds == labels, reference == labels
    b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"only_this_right": b, "only_reference_right": c, "p_value": p}


def timing_summary(values: Sequence[float]) -> dict:
    """Median and interquartile range of repeated measurements."""
    q1, med, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median": float(med), "iqr": float(q3 - q1), "rounds": len(values)}
