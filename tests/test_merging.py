"""Token merging (ToMe / PiToMe): hand-made cases, padding invariance and ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from components.models.merging import merge_tokens, pitome_margin, proportional_attention_bias

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


class Merge(nn.Module):
    def __init__(self, r: int, method: str):
        super().__init__()
        self.r, self.method = r, method

    def forward(self, x, keys, sizes, mask):
        return merge_tokens(x, keys, sizes, mask, r=self.r, method=self.method, margin=0.2)


@pytest.mark.parametrize("method", METHODS)
def test_onnx_export_with_dynamic_batch_and_sequence(method, tmp_path):
    import onnxruntime as ort

    module = Merge(r=2, method=method)
    path = tmp_path / f"{method}.onnx"
    names = ["x", "keys", "sizes", "mask"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes |= {f"out_{name}": {0: "batch", 1: "merged"} for name in ("x", "sizes", "mask")}
    torch.onnx.export(module, batch([8, 6]), str(path), input_names=names,
                      output_names=["out_x", "out_sizes", "out_mask"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for lengths in ([13, 7, 11], [5], [20, 20, 9, 14]):
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
