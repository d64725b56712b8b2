"""Token merging (ToMe / PiToMe): hand-made cases, padding invariance and ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from components.models.merging import (
    merge_tokens,
    pitome_energy,
    pitome_margin,
    proportional_attention_bias,
)

METHODS = ["tome", "pitome"]


def batch(lengths: list[int], n: int | None = None, d: int = 8, c: int = 6, seed: int = 0):
    """Random right-padded inputs: x [B, N, D], keys [B, N, C], sizes [B, N, 1], mask [B, N]."""
    g = torch.Generator().manual_seed(seed)
    n = n or max(lengths)
    x = torch.randn(len(lengths), n, d, generator=g)
    keys = torch.randn(len(lengths), n, c, generator=g)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).float()
    return x, keys, mask.unsqueeze(-1).clone(), mask


def basis_keys(n: int) -> torch.Tensor:
    """One orthogonal key per token: every pair has cosine 0."""
    return torch.eye(n).unsqueeze(0)


def real_rows(x, sizes, mask, i):
    keep = mask[i] > 0
    return x[i][keep], sizes[i][keep]


@pytest.mark.parametrize("method", METHODS)
def test_identical_tokens_merge_first(method):
    n = 8
    x = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(1))
    keys = basis_keys(n)
    keys[0, 4] = keys[0, 3]  # 3 (B, odd) and 4 (A, even): the only similar pair
    sizes, mask = torch.ones(1, n, 1), torch.ones(1, n)
    out, out_sizes, out_mask = merge_tokens(x, keys, sizes, mask, r=1, method=method, margin=0.5)
    assert out.shape == (1, n - 1, 4) and out_mask.shape == (1, n - 1)
    merged = (x[0, 3] + x[0, 4]) / 2
    others = torch.cat([x[0, :3], x[0, 5:]])
    slot = int(torch.nonzero(out_sizes[0, :, 0] == 2).squeeze())
    torch.testing.assert_close(out[0, slot], merged)
    torch.testing.assert_close(torch.cat([out[0, :slot], out[0, slot + 1:]]), others)
    assert out_sizes.sum() == n and out_mask.sum() == n - 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [1, 2, 4])
def test_sizes_add_up(method, r):
    x, keys, _, mask = batch([12, 9, 3, 1], seed=r)
    # Uneven starting sizes (as after earlier merges); pads carry size 1 that must not count.
    sizes = torch.randint(1, 4, mask.shape, generator=torch.Generator().manual_seed(2))
    sizes = sizes.float().unsqueeze(-1)
    total = (sizes[..., 0] * mask).sum(1)
    out, out_sizes, out_mask = merge_tokens(x, keys, sizes, mask, r=r, method=method)
    torch.testing.assert_close((out_sizes[..., 0] * out_mask).sum(1), total)
    assert out.shape[1] == 12 - r and torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_r_zero_returns_inputs(method):
    x, keys, sizes, mask = batch([5, 3])
    out = merge_tokens(x, keys, sizes, mask, r=0, method=method)
    assert out[0] is x and out[1] is sizes and out[2] is mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [1, 3, 5])
def test_pad_values_never_reach_real_tokens(method, r):
    # r=3 and 5 are more than the short examples can merge among their real tokens.
    lengths = [12, 5, 2, 1]
    x, keys, sizes, mask = batch(lengths, seed=3)
    pad = mask == 0
    x_huge, keys_huge = x.clone(), keys.clone()
    x_huge[pad], keys_huge[pad] = 1e30, -1e30
    ref = merge_tokens(x, keys, sizes, mask, r=r, method=method)
    got = merge_tokens(x_huge, keys_huge, sizes, mask, r=r, method=method)
    for i, length in enumerate(lengths):
        ref_x, ref_s = real_rows(*ref, i)
        got_x, got_s = real_rows(*got, i)
        torch.testing.assert_close(got_x, ref_x)
        torch.testing.assert_close(got_s, ref_s)
        assert torch.isfinite(got_x).all() and got_s.sum() == length
    # [CLS] alone, or [CLS] + one token: nothing real can merge, so nothing real changes.
    for i in (2, 3):
        got_x, got_s = real_rows(*got, i)
        torch.testing.assert_close(got_x, x[i, : lengths[i]])
        assert (got_s == 1).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [1, 2, 3])
def test_batch_equals_examples_one_by_one(method, r):
    lengths = [13, 9, 16, 7, 8]
    x, keys, sizes, mask = batch(lengths, seed=10 + r)
    mask_long = mask.long()
    out, out_sizes, out_mask = merge_tokens(x, keys, sizes, mask_long, r=r, method=method)
    assert out_mask.dtype == torch.long
    for i, n in enumerate(lengths):
        alone = merge_tokens(x[i:i + 1, :n], keys[i:i + 1, :n], sizes[i:i + 1, :n],
                             mask_long[i:i + 1, :n], r=r, method=method)
        assert alone[2].sum() == n - r
        # Real tokens come first, in the same (original position) order as alone.
        assert out_mask[i, : n - r].all() and not out_mask[i, n - r:].any()
        torch.testing.assert_close(out[i, : n - r], alone[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_sizes[i, : n - r], alone[1][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_cls_is_kept_at_index_zero(method):
    n = 9
    x = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(4))
    keys = basis_keys(n).repeat(2, 1, 1)
    keys[:, 1] = keys[:, 0]  # [CLS] has an identical twin: the best pair if it were allowed
    keys[:, 2] = keys[:, 0]
    sizes, mask = torch.ones(2, n, 1), torch.ones(2, n)
    mask[1, 6:] = 0
    for r in (1, 2, 3):
        out, out_sizes, _ = merge_tokens(x, keys, sizes, mask, r=r, method=method, margin=0.5)
        torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
        assert (out_sizes[:, 0] == 1).all()
    # Without protection [CLS] is merged (the check above is not vacuous).
    out, out_sizes, _ = merge_tokens(x, keys, sizes, mask, r=1, method=method,
                                     protect_first=False, margin=0.5)
    assert (out_sizes[:, 0, 0] == 2).all()
    torch.testing.assert_close(out[:, 0], (x[:, 0] + x[:, 1]) / 2)


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_pitome_protects_isolated_token(r):
    n, c = 10, 12
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, n, 4, generator=g)
    keys = torch.zeros(1, n, c)
    keys[0, 0, 10] = 1.0  # [CLS]
    keys[0, 1:9, 0] = 1.0  # a cluster of near-identical tokens
    keys[0, 1:9, 1:4] = 0.01 * torch.randn(8, 3, generator=g)
    isolated = 9
    keys[0, isolated, 11] = 1.0  # orthogonal to every other token
    sizes, mask = torch.ones(1, n, 1), torch.ones(1, n)
    out, out_sizes, _ = merge_tokens(x, keys, sizes, mask, r=r, method="pitome")
    assert out.shape[1] == n - r
    torch.testing.assert_close(out[0, -1], x[0, isolated], rtol=0, atol=0)
    assert out_sizes[0, -1] == 1 and out_sizes[0, 0] == 1
    assert out_sizes[0, 1:-1].sum() == 8  # only cluster tokens were merged, among themselves


def cluster_keys(cos: float, n: int, c: int, first: int) -> torch.Tensor:
    """[n, c] unit keys with pairwise cosine ``cos``: a shared axis (index 0) plus one private
    axis each (``first``, ``first + 1``, ...)."""
    k = torch.zeros(n, c)
    k[:, 0] = cos**0.5
    k[torch.arange(n), first + torch.arange(n)] = (1 - cos) ** 0.5
    return k


def test_pitome_energy_ignores_protected_cls():
    """Issue 15 (6a): the authors drop [CLS] before computing energies. Token 3 is [CLS]'s twin
    and orthogonal to every other token; counting [CLS] as a neighbour lifted it above the one
    genuinely similar pair (1, 2) and merged it, isolated as it is, into token 1."""
    n = 6
    keys = basis_keys(n)
    keys[0, 3] = keys[0, 0]
    keys[0, 2] = 0.6 * keys[0, 1] + 0.8 * keys[0, 2]  # cos(1, 2) = 0.6, above the margin
    x = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(6))
    sizes, mask = torch.ones(1, n, 1), torch.ones(1, n)
    out, out_sizes, _ = merge_tokens(x, keys, sizes, mask, r=1, method="pitome", margin=0.5)
    torch.testing.assert_close(out[0], torch.stack([x[0, 0], (x[0, 1] + x[0, 2]) / 2,
                                                    *x[0, 3:]]))
    assert out_sizes[0, :, 0].tolist() == [1, 2, 1, 1, 1]
    # The energies themselves: [CLS] is no neighbour, the mean runs over the 5 other tokens.
    kind = torch.tensor([[2, 1, 1, 1, 1, 1]])
    below = float(np.exp(-0.5) - 1)  # f_m(0) with m = 0.5
    energy = pitome_energy(keys, kind, margin=0.5, alpha=1.0)[0, 1:]
    expected = torch.tensor([1.6 + 3 * below] * 2 + [1 + 4 * below] * 3) / 5
    torch.testing.assert_close(energy, expected)
    # Without protection [CLS] is an ordinary token and does count (as in the released code).
    unprotected = pitome_energy(keys, torch.ones_like(kind), margin=0.5, alpha=1.0)[0]
    torch.testing.assert_close(unprotected[3], torch.tensor(2 + 4 * below) / 6)


def test_pitome_energy_follows_eq4_of_the_paper():
    """Issue 15 (6b): f_m(x) = x for x >= m (paper, Eq. 4), alpha (exp(x - m) - 1) below; not
    the released code's elu(x - m), and a cosine exactly at the margin counts m, not 0."""
    keys = torch.tensor([[[5.0, 0.0], [3.0, 4.0], [0.0, 5.0]]])  # cosines 0.6, 0.8 and 0 exactly
    kind = torch.ones(1, 3, dtype=torch.long)
    m, alpha = 0.6, 0.5
    below = alpha * float(np.exp(0.0 - m) - 1)
    expected = torch.tensor([1 + 0.6 + below, 0.6 + 1 + 0.8, below + 0.8 + 1]) / 3
    got = pitome_energy(torch.nn.functional.normalize(keys, dim=-1), kind, m, alpha)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_pitome_merges_what_eq4_ranks_highest():
    """A loose cluster of four (pairwise cosine 0.65) against a tight triple of identical keys,
    margin 0.5: Eq. (4) gives the cluster the higher energy, so two of its tokens merge; elu(x - m)
    (the released code) would rank the triple first and merge two of its copies instead."""
    n, c = 8, 12
    keys = torch.zeros(1, n, c)
    keys[0, 0, 11] = 1.0  # [CLS], orthogonal to all
    keys[0, 1:5] = cluster_keys(0.65, 4, c, first=1)
    keys[0, 5:8, 10] = 1.0  # three identical tokens, orthogonal to the cluster
    x = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(7))
    sizes, mask = torch.ones(1, n, 1), torch.ones(1, n)
    out, out_sizes, _ = merge_tokens(x, keys, sizes, mask, r=1, method="pitome", margin=0.5)
    assert out_sizes[0, :, 0].tolist() == [1, 2, 1, 1, 1, 1, 1]
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 2]) / 2)
    # The check is not vacuous: the released code's f ranks the triple above the cluster.
    sim = keys[0, 1:] @ keys[0, 1:].T
    elu_energy = torch.nn.functional.elu(sim - 0.5).mean(-1)
    assert elu_energy[4:].min() > elu_energy[:4].max()


def test_pitome_short_odd_example_keeps_its_isolated_token():
    """Issue 15 (6c): [CLS] + T = 3 real tokens in a batch merging r = 2 (2r > T). Tokens 1 and 2
    are close, token 3 points away from both (cosine -0.8): it must stay as it is rather than
    be merged into token 2, i.e. floor(3/2) = 1 real merge, not ceil(3/2) = 2."""
    n, length = 9, 4
    keys = torch.zeros(2, n, 3)
    keys[:, :, 0] = 1.0  # the long example: any keys
    keys[1, :length] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.98, 0.2, 0.0],
                                     [-0.8, 0.6, 0.0]])
    x = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, n)
    mask[1, length:] = 0
    out, out_sizes, out_mask = merge_tokens(x, keys, mask.unsqueeze(-1), mask, r=2,
                                            method="pitome", margin=0.5)
    got_x, got_s = real_rows(out, out_sizes, out_mask, 1)
    torch.testing.assert_close(got_x, torch.stack([x[1, 0], (x[1, 1] + x[1, 2]) / 2, x[1, 3]]))
    assert got_s[:, 0].tolist() == [1, 2, 1]
    assert out_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]  # still right-padded


@pytest.mark.parametrize("n", [4, 8])
def test_tome_unprotected_short_odd_example_keeps_its_least_similar_token(n):
    """Issue 15 (6c) for ToMe with protect_first=False: T = 3 real tokens, A = {0, 2}, B = {1}
    and r = 2. Token 0 is close to 1, token 2 points away (cosine -0.8): only 0 merges. With
    N = 8 the other merge goes to pads; with N = 4 there is no pad A slot, so token 2 moves,
    unchanged, into the pad slot 3."""
    keys = torch.zeros(2, n, 2)
    keys[:, :, 0] = 1.0
    keys[1, :3] = torch.tensor([[0.98, 0.2], [1.0, 0.0], [-0.8, 0.6]])
    x = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, n)
    mask[1, 3:] = 0
    out, out_sizes, out_mask = merge_tokens(x, keys, mask.unsqueeze(-1), mask, r=2,
                                            method="tome", protect_first=False)
    got_x, got_s = real_rows(out, out_sizes, out_mask, 1)
    torch.testing.assert_close(got_x, torch.stack([(x[1, 0] + x[1, 1]) / 2, x[1, 2]]))
    assert got_s[:, 0].tolist() == [2, 1]
    if n == 8:  # pads absorbed the spare merge: nothing moved
        assert out_mask[1].tolist() == [1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize(("method", "protect_first"),
                         [("tome", True), ("tome", False), ("pitome", True), ("pitome", False)])
@pytest.mark.parametrize("r", [2, 3, 5])
def test_no_example_merges_more_real_tokens_than_pair_up(method, protect_first, r):
    """An example with T mergeable real tokens merges min(r, floor(T/2)) of them, whatever the
    batch's r, and pads (here huge) still never reach a real token."""
    lengths = [12, 11, 10, 9, 7, 6, 5, 4, 3, 2, 1]
    x, keys, sizes, mask = batch(lengths, seed=20 + r)
    pad = mask == 0
    x[pad], keys[pad] = 1e30, -1e30
    out, out_sizes, out_mask = merge_tokens(x, keys, sizes, mask, r=r, method=method,
                                            protect_first=protect_first)
    for i, length in enumerate(lengths):
        merges = min(r, (length - int(protect_first)) // 2)
        assert out_mask[i].sum() == length - merges, (i, length)
        got_x, got_s = real_rows(out, out_sizes, out_mask, i)
        assert got_s.sum() == length and torch.isfinite(got_x).all()


class Merge(nn.Module):
    def __init__(self, r: int, method: str, protect_first: bool = True):
        super().__init__()
        self.r, self.method, self.protect_first = r, method, protect_first

    def forward(self, x, keys, sizes, mask):
        return merge_tokens(x, keys, sizes, mask, r=self.r, method=self.method, margin=0.2,
                            protect_first=self.protect_first)


@pytest.mark.parametrize(("method", "protect_first"),
                         [("tome", True), ("tome", False), ("pitome", True)])
def test_onnx_export_with_dynamic_batch_and_sequence(method, protect_first, tmp_path):
    import onnxruntime as ort

    module = Merge(r=2, method=method, protect_first=protect_first)
    path = tmp_path / f"{method}.onnx"
    names = ["x", "keys", "sizes", "mask"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes |= {f"out_{name}": {0: "batch", 1: "merged"} for name in ("x", "sizes", "mask")}
    torch.onnx.export(module, batch([8, 6]), str(path), input_names=names,
                      output_names=["out_x", "out_sizes", "out_mask"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # The last batch has short odd examples (T = 3 or 2 besides [CLS] < 2r), the left-over rule.
    for lengths in ([13, 7, 11], [5], [20, 20, 9, 14], [9, 4, 3, 5, 2]):
        inputs = batch(lengths, seed=len(lengths))
        expected = module(*inputs)
        got = sess.run(None, {k: v.numpy() for k, v in zip(names, inputs, strict=True)})
        for e, o in zip(expected, got, strict=True):
            assert o.shape == tuple(e.shape) == (len(lengths), max(lengths) - 2, *e.shape[2:])
            np.testing.assert_allclose(o, e.numpy(), atol=1e-5, rtol=0)


def test_proportional_attention_bias():
    sizes = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).unsqueeze(-1)
    bias = proportional_attention_bias(sizes)
    assert bias.shape == (1, 1, 1, 4) and torch.isfinite(bias).all()
    torch.testing.assert_close(bias[0, 0, 0, :3], torch.tensor([1.0, 3.0, 2.0]).log())


def test_pitome_margin_schedule_and_argument_checks():
    margins = [pitome_margin(i, 4, 0.9) for i in range(4)]
    assert margins[0] == 0.9 and margins == sorted(margins, reverse=True) and margins[-1] > 0
    with pytest.raises(ValueError):
        pitome_margin(4, 4, 0.9)
    x, keys, sizes, mask = batch([6])
    with pytest.raises(ValueError, match="cannot merge"):
        merge_tokens(x, keys, sizes, mask, r=3)
    with pytest.raises(ValueError, match="method"):
        merge_tokens(x, keys, sizes, mask, r=1, method="bogus")
