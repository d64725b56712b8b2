"""Token merging for the student encoder: fewer tokens per layer, same model.

Two ways of picking which tokens to merge are implemented from their papers' descriptions:

* ``"tome"``: bipartite soft matching from Bolya et al., "Token Merging: Your ViT But Faster"
  (ICLR 2023). Tokens at even positions form set A, odd positions set B; every A token finds its
  most similar B token (cosine similarity of attention keys) and the ``r`` best-matched A tokens
  are merged into their partners.
* ``"pitome"``: energy-guided matching from Tran et al., "Accelerating Transformers with
  Spectrum-Preserving Token Merging" (NeurIPS 2024). Each token gets the energy score of the
  paper's Eq. (4), ``E_i = mean_j f_m(cos(k_i, k_j))`` with ``f_m(x) = x`` for ``x >= m`` and
  ``alpha * (exp(x - m) - 1)`` below the margin ``m``. Only the ``2r`` highest-energy tokens
  (those inside dense clusters) are candidates: they are split alternately by energy rank into
  A and B and all ``r`` A tokens are merged into their best B match. Low-energy (isolated,
  informative) tokens are never touched.

PiToMe and the authors' released code (github.com/hchautran/PiToMe, commit 550b5de, file
``algo/pitome/merge.py``; re-implemented here from the paper, none of it copied):

* The neighbours ``j`` in the energy are the mergeable tokens: like the released code, a
  protected [CLS] is removed before energies are computed, so it neither adds to another
  token's energy nor counts in the mean (and pads are never neighbours).
* Above the margin the paper's Eq. (4) uses ``f_m(x) = x``, which is what is implemented; the
  released vision code computes ``elu(x - m, alpha)``, i.e. ``x - m`` above the margin, which
  lowers a token's energy by ``m`` for every neighbour above the margin and so ranks tokens
  differently. (Its text/BERT path uses yet another, Gaussian, kernel, and splits the
  candidates into a higher- and a lower-energy half instead of alternately.) The paper's
  ``x >= m`` boundary is kept: a cosine exactly at the margin counts ``m``, not 0.

Merging is a size-weighted average (``x = sum(x_i s_i) / sum(s_i)``) and sizes add up, so
``proportional_attention_bias`` can give a merged token the attention weight of its members.

Padding. Inputs are right-padded; ``mask`` is 1 for real tokens. Pairing scores are set so
that, in decreasing order of preference, a token is matched with: a real token (the cosine
similarity, in [-1, 1]); for a pad, another pad (``_PAD_PAIR``); anything else (``_MIXED``);
the protected [CLS] last (``_PROTECTED``). Pads therefore rank after every real candidate and
an example merges exactly the tokens it would merge alone, unpadded, as long as it has enough
real tokens (ToMe: ``r`` real A tokens besides [CLS]; PiToMe: ``2r`` real tokens besides
[CLS]).

Short examples. An example with ``T`` mergeable real tokens (besides a protected [CLS]) can
pair at most ``floor(T / 2)`` of them with other real tokens, so it never merges more than that
many real tokens, whatever ``r`` the batch uses: with an odd ``T`` the token left over (PiToMe:
the lowest-energy one; ToMe without a protected [CLS]: the A token whose best match is the
least similar) is kept apart instead of being forced into a dissimilar partner. The remaining
merges are spent on pads: a pad merged into a real token adds nothing to it (members are
weighted by ``sizes * mask``). ToMe can only remove A slots, so when an example has too few pad
A slots its left-over token is moved, unchanged, into a pad B slot, which becomes real (the
merged mask is the max of its members). Output sizes are ``sizes * mask`` (0 for pads).

Output order: the surviving slots keep their original relative order, so [CLS] stays at index
0 and a right-padded batch stays right-padded (except for that ToMe move, where a real token
lands in a former pad slot).

Everything is written with ops that export to ONNX with dynamic batch and sequence axes
(opset 16+, for ScatterElements with add reduction); ``r`` is a fixed Python int per layer.
Sorting never relies on a stable sort (not exportable): ties are broken by position explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("tome", "pitome")
# Pairing scores (finite, so they survive FP16/ONNX): real-real pairs use the cosine in [-1, 1].
_PAD_PAIR = -5e3  # pad with pad: the harmless way to spend merges a short example cannot make
_MIXED = -1e4  # real with pad: only when nothing better exists
# A real token past the floor(T/2) that can pair among an example's T real tokens: its real
# partners rank after every pad, so the surplus merges of a short example go to pads.
_LEFT_OVER = -1.5e4
_PROTECTED = -2e4  # anything with the protected [CLS]: never chosen while a choice remains
# Removed slots are pushed past every kept position before the final sort.
_REMOVED_KEY = 1e9


def proportional_attention_bias(sizes: Tensor) -> Tensor:
    """Additive attention-logit term ``log(size)`` of every key (ToMe's proportional attention).

    Args:
        sizes: [B, N, 1] how many original tokens each slot represents (0 for pads).

    Returns:
        [B, 1, 1, N] to add to the [B, heads, N, N] attention scores. Pads (size 0) get 0 rather
        than -inf: the mask bias already removes them, and -inf would risk NaN.
    """
    return sizes.squeeze(-1).clamp(min=1.0).log()[:, None, None, :]


def pitome_margin(layer: int, num_layers: int, base: float) -> float:
    """PiToMe's energy margin for one layer: linear from ``base`` at layer 0 toward 0.

    Deeper layers have more similar tokens, so PiToMe lowers the margin there; this uses
    ``base * (1 - layer / num_layers)`` (the last layer gets ``base / num_layers``).

    Args:
        layer: 0-based layer index.
        num_layers: number of layers.
        base: margin of the first layer (the paper uses 0.9).
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    return base * (1.0 - layer / num_layers)


def _descending_rank(scores: Tensor) -> Tensor:
    """Rank (0 = highest) of every element of ``scores`` [B, M], ties broken by lower index.

    Neither torch's unstable sort nor topk promises a tie order, and the stable sort does not
    export, so each element's rank is counted explicitly (O(M^2), like the similarity matrix).
    Ranks are distinct whole numbers, returned in ``scores.dtype``.
    """
    pos = torch.arange(scores.shape[-1], device=scores.device)
    beaten = scores.unsqueeze(-1) < scores.unsqueeze(-2)  # [.., i, j]: j ranks before i
    tied_before = (scores.unsqueeze(-1) == scores.unsqueeze(-2)) & (
        pos.unsqueeze(-1) > pos.unsqueeze(-2))
    return (beaten | tied_before).to(scores.dtype).sum(-1)


def _descending_order(scores: Tensor) -> Tensor:
    """Indices sorting ``scores`` [B, M] high to low, ties broken by lower index.

    The ranks are distinct, so sorting them is unambiguous in PyTorch and ONNX Runtime alike.
    """
    return torch.sort(_descending_rank(scores), dim=-1).indices


def _pairable(kind: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 1] how many of each example's mergeable real tokens can pair up: ``2 floor(T/2)``."""
    return 2.0 * torch.floor((kind == 1).to(dtype).sum(-1, keepdim=True) / 2.0)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Gather rows ``idx`` [B, K] of ``t`` [B, N, D] -> [B, K, D]."""
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _pair_scores(sim: Tensor, kind_a: Tensor, kind_b: Tensor) -> Tensor:
    """Replace similarities of pairs that are not real-real by the fixed pairing scores.

    ``kind`` is 1 for a mergeable real token, 0 for a pad, 2 for the protected [CLS].
    """
    ka, kb = kind_a.unsqueeze(-1), kind_b.unsqueeze(-2)
    fixed = torch.where(
        (ka == 2) | (kb == 2), _PROTECTED, torch.where((ka == 0) & (kb == 0), _PAD_PAIR, _MIXED))
    return torch.where((ka == 1) & (kb == 1), sim, fixed.to(sim.dtype))


def _tome_pairs(k: Tensor, kind: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """ToMe bipartite soft matching: positions of the r merged A tokens and of their B matches.

    Without a protected [CLS], A holds ``ceil(T/2)`` of an example's ``T`` real tokens, so with
    an odd ``T`` and ``r >= ceil(T/2)`` all of them would merge into B's ``floor(T/2)``: the A
    token ranked past ``floor(T/2)`` real pairs loses its real partners (``_LEFT_OVER``) and ranks
    after the pad-pad pairs. With a protected [CLS], A holds exactly ``floor(T/2)`` real tokens
    and nothing changes.
    """
    kind_a, kind_b = kind[:, ::2], kind[:, 1::2]
    sim = _pair_scores(k[:, ::2] @ k[:, 1::2].transpose(1, 2), kind_a, kind_b)
    best = sim.max(dim=-1).values
    # Real-real pairs score in [-1, 1], above every pad score, so they hold the top ranks.
    left_over = (best > _PAD_PAIR) & (_descending_rank(best) >= _pairable(kind, best.dtype) / 2)
    sim = torch.where(left_over.unsqueeze(-1) & (kind_b == 1).unsqueeze(1),
                      torch.full_like(sim, _LEFT_OVER), sim)
    best, match = sim.max(dim=-1)  # first index on ties, like ONNX ArgMax
    chosen = _descending_order(best)[:, :r]  # indices into A
    return chosen * 2, match.gather(1, chosen) * 2 + 1


def pitome_energy(keys: Tensor, kind: Tensor, margin: float, alpha: float) -> Tensor:
    """PiToMe energy score, Eq. (4) of Tran et al. (NeurIPS 2024), of every token.

    ``E_i = (1 / |M|) sum_{j in M} f_m(cos(k_i, k_j))`` over the mergeable real tokens ``M``
    (a protected [CLS] and pads are no one's neighbours; ``i`` itself is one, as in the released
    code's mean over all tokens), with ``f_m(x) = x`` if ``x >= m`` and ``alpha (exp(x - m) - 1)``
    otherwise.

    Args:
        keys: [B, N, C] L2-normalised keys.
        kind: [B, N] 1 for a mergeable real token, 0 for a pad, 2 for the protected [CLS].
        margin: ``m`` (see ``pitome_margin``).
        alpha: slope of ``f_m`` below the margin.

    Returns:
        [B, N] energies; entries of pads and [CLS] are meaningless (callers override them).
    """
    sim = keys @ keys.transpose(1, 2)
    f = torch.where(sim >= margin, sim, alpha * (torch.exp(sim - margin) - 1.0))
    neighbour = (kind == 1).unsqueeze(1)
    f = torch.where(neighbour, f, torch.zeros_like(f))
    return f.sum(-1) / neighbour.to(keys.dtype).sum(-1).clamp(min=1.0)


def _pitome_pairs(
    k: Tensor, kind: Tensor, r: int, margin: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """PiToMe: the 2r highest-energy tokens are split A/B by energy rank; A merges into B."""
    energy = pitome_energy(k, kind, margin, alpha)
    # Pads rank below every real token and [CLS] below pads, so neither is picked while real
    # candidates remain (real energies lie in [-alpha, 1]).
    energy = torch.where(kind == 1, energy, torch.where(kind == 0, _MIXED, _PROTECTED).to(k.dtype))
    # With an odd T < 2r the lowest-energy real token would be the last A and be forced into a
    # real B: demote it below the pads so that exactly floor(T/2) real tokens merge. (With
    # T > 2r it is no candidate either way.)
    left_over = (kind == 1) & (_descending_rank(energy) >= _pairable(kind, energy.dtype))
    energy = torch.where(left_over, torch.full_like(energy, _LEFT_OVER), energy)
    candidates = _descending_order(energy)[:, : 2 * r]
    a_pos, b_pos = candidates[:, 0::2], candidates[:, 1::2]
    sim_ab = _take(k, a_pos) @ _take(k, b_pos).transpose(1, 2)
    sim_ab = _pair_scores(sim_ab, kind.gather(1, a_pos), kind.gather(1, b_pos))
    return a_pos, b_pos.gather(1, sim_ab.argmax(dim=-1))


def merge_tokens(
    x: Tensor,
    keys: Tensor,
    sizes: Tensor,
    mask: Tensor,
    r: int,
    method: str = "tome",
    protect_first: bool = True,
    margin: float = 0.9,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``r`` tokens of every example into others, shortening the sequence by ``r``.

    Args:
        x: [B, N, D] hidden states (after attention, before the MLP).
        keys: [B, N, C] attention keys (e.g. the mean over heads) used for cosine similarity.
        sizes: [B, N, 1] float, original tokens per slot (1 initially; 0 allowed for pads).
        mask: [B, N] 1 for real tokens, 0 for pads (any dtype; returned in the same dtype).
        r: tokens to remove (fixed Python int). Requires ``r <= (N - protect_first) // 2``.
        method: ``"tome"`` or ``"pitome"``.
        protect_first: never merge token 0 ([CLS]); it stays at index 0.
        margin: PiToMe energy margin (see ``pitome_margin``).
        alpha: PiToMe slope of the energy below the margin (``pitome_energy``).

    Returns:
        ``(x, sizes, mask)`` with N - r slots in original order; sizes of pads are 0. An
        example with T mergeable real tokens merges ``min(r, floor(T/2))`` of them (the module
        docstring says where the other merges go). With ``r == 0`` the inputs themselves are
        returned.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if r == 0:
        return x, sizes, mask
    # Shape checks would be frozen into an ONNX trace (and warn), so only run them eagerly.
    if not torch.jit.is_tracing() and r > (x.shape[1] - int(protect_first)) // 2:
        raise ValueError(
            f"cannot merge r={r} of {x.shape[1]} tokens (at most "
            f"{(x.shape[1] - int(protect_first)) // 2} with protect_first={protect_first})")

    b, n = mask.shape
    real = mask > 0
    kind = real.long()
    if protect_first:
        first = torch.arange(n, device=x.device).unsqueeze(0) == 0
        kind = torch.where(first & real, 2, kind)
    k = F.normalize(keys, dim=-1)
    if method == "tome":
        src, dst = _tome_pairs(k, kind, r)
    else:
        src, dst = _pitome_pairs(k, kind, r, margin, alpha)

    # Size-weighted average with weights sizes * mask: a pad never changes a real token.
    # torch.where (not a product) keeps inf/NaN in pad slots from leaking into sums.
    m = real.to(x.dtype).unsqueeze(-1)
    w = sizes * m
    xw = torch.where(w > 0, x * w, torch.zeros_like(x))
    dst_d = dst.unsqueeze(-1)
    acc_xw = xw.scatter_add(1, dst_d.expand(-1, -1, x.shape[-1]), _take(xw, src))
    recv_w = torch.zeros_like(w).scatter_add(1, dst_d, _take(w, src))
    recv_m = torch.zeros_like(m).scatter_add(1, dst_d, _take(m, src))
    total_w = w + recv_w
    # Slots that received no weight keep their exact value (no x * s / s rounding).
    merged = torch.where(
        recv_w > 0, acc_xw / torch.where(total_w > 0, total_w, torch.ones_like(total_w)), x)
    new_mask = (m + recv_m).clamp(max=1.0)

    # Drop the merged-away slots, keeping the others in their original order.
    # float32 keys: exact positions and no overflow whatever the activation dtype.
    pos = torch.arange(n, device=x.device, dtype=torch.float32).unsqueeze(0).expand(b, -1)
    removed = torch.zeros_like(pos).scatter(1, src, torch.ones_like(src, dtype=pos.dtype))
    keep = torch.sort(pos + removed * _REMOVED_KEY, dim=-1).indices[:, :-r]
    return (
        _take(merged, keep),
        _take(total_w, keep),
        _take(new_mask, keep).squeeze(-1).to(mask.dtype),
    )
