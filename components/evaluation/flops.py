"""Analytic FLOPs per example for transformer encoders (how evaluate compares models).

Counted: the matrix multiplies of every layer, as 2 FLOPs per multiply-add: Q/K/V/output
projections 4*n*d^2, attention scores and the weighted sum 2*n^2*d, the MLP 2*n*d*f; plus the
classifier head. Not counted: embeddings lookups, LayerNorm, softmax, GELU, biases (a few % at
these sizes). `n` is the number of real tokens (padding excluded). With token merging, a layer
that merges r tokens runs attention on n tokens and its MLP on n - r (ToMe merges between the
two), and every later layer sees the shrunken sequence.
"""

from __future__ import annotations


def encoder_flops(tokens: float, layers: int, hidden: int, intermediate: int, num_labels: int,
                  merge: dict[int, int] | None = None) -> float:
    """FLOPs for one example of `tokens` real tokens; `merge` maps layer -> tokens removed."""
    merge = merge or {}
    n, d, f = float(tokens), hidden, intermediate
    total = 0.0
    for layer in range(layers):
        total += 2 * (4 * n * d * d + 2 * n * n * d)  # projections + attention
        n = max(1.0, n - merge.get(layer, 0))  # merging happens before the MLP
        total += 2 * (2 * n * d * f)  # MLP up + down
    return total + 2 * d * num_labels
