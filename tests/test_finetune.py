"""Sparse update of fused models: gradients equal the dense ones restricted to the chosen
channels; activation memory kept for backward shrinks in proportion to k / C."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repfuse import core
from repfuse.errors import GeometryError, InputError
from repfuse.finetune import SparseUpdateConv2d, merge, saved_activation_bytes, sparse_update

F64 = torch.float64


def _conv(c, o, k, stride=1, padding=0, dilation=1, groups=1, bias=True, mode="zeros", seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c, o, k, stride, padding, dilation, groups, bias=bias,
                     padding_mode=mode).to(F64)


def _dense_and_sparse(conv, sel, x, g):
    """Dense autograd gradients and the sparse module's, same data."""
    xd = x.clone().requires_grad_(True)
    conv.zero_grad()
    (conv(xd) * g).sum().backward()
    sparse = SparseUpdateConv2d(conv, sel)
    xs = x.clone().requires_grad_(True)
    ys = sparse(xs)
    (ys * g).sum().backward()
    return conv, xd.grad, sparse, xs.grad, ys


@given(c=st.integers(1, 6), o=st.integers(1, 5), k=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), n=st.integers(1, 2),
       data=st.data())
def test_groups1_gradients_equal_dense_restricted(c, o, k, stride, padding, dilation, n, data):
    size = dilation * (k - 1) + 1 + data.draw(st.integers(0, 4))
    sel = data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    conv = _conv(c, o, k, stride, padding, dilation)
    x = torch.randn(n, c, size, size + 1, dtype=F64)
    g = torch.randn_like(conv(x))
    conv, gx_dense, sparse, gx_sparse, ys = _dense_and_sparse(conv, sel, x, g)
    idx = torch.tensor(sel)
    torch.testing.assert_close(ys, conv(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(sparse.weight_sel.grad, conv.weight.grad[:, idx],
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(sparse.bias.grad, conv.bias.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(gx_sparse, gx_dense, atol=1e-10, rtol=0)
    # the same numbers as the core's sparse kernel on the full input
    ref = core.conv2d_weight(x, tuple(conv.weight.shape), g, stride, padding, dilation, 1,
                             in_channels=idx)
    torch.testing.assert_close(sparse.weight_sel.grad, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_depthwise_and_padding_modes(mult, mode):
    c = 6
    conv = _conv(c, c * mult, 3, 1, 1, 1, groups=c, mode=mode, seed=3)
    x = torch.randn(2, c, 7, 6, dtype=F64)
    g = torch.randn_like(conv(x))
    sel = [4, 1, 5]
    conv, gx_dense, sparse, gx_sparse, _ = _dense_and_sparse(conv, sel, x, g)
    rows = (torch.tensor(sel)[:, None] * mult + torch.arange(mult)).flatten()
    torch.testing.assert_close(sparse.weight_sel.grad, conv.weight.grad[rows], atol=1e-10, rtol=0)
    torch.testing.assert_close(gx_sparse, gx_dense, atol=1e-10, rtol=0)


def test_sgd_step_touches_only_selected_channels_and_merges():
    conv = _conv(8, 4, 3, padding=1, seed=1)
    before = conv.weight.detach().clone()
    sparse = SparseUpdateConv2d(conv, slice(2, 5))
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    sparse(x).pow(2).sum().backward()
    opt.step()
    merged = sparse.to_conv()
    changed = (merged.weight.detach() != before).flatten(2).any(-1)   # (O, C)
    assert changed[:, 2:5].all() and not changed[:, :2].any() and not changed[:, 5:].any()
    torch.testing.assert_close(merged(x), sparse(x), atol=1e-12, rtol=0)


def test_activation_memory_shrinks_in_proportion():
    c, k = 64, 16
    conv = _conv(c, 32, 3, padding=1, bias=False).float()
    x = torch.randn(4, c, 16, 16)
    dense = saved_activation_bytes(conv, x)
    assert dense == x.numel() * 4          # nn.Conv2d keeps its input for the weight grad
    for kk in (1, k, 32):
        sparse = SparseUpdateConv2d(conv, torch.arange(kk))
        got = saved_activation_bytes(sparse, x)
        assert got == dense * kk // c, (kk, got, dense)


def test_model_wrapper_freezes_and_saves_less():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(1))
    x = torch.randn(2, 8, 12, 12)
    tuned = sparse_update(model, {"2": [0, 3], "4": slice(0, 4)})
    assert isinstance(tuned[2], SparseUpdateConv2d) and isinstance(model[2], nn.Conv2d)
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable == ["2.weight_sel", "2.bias", "4.weight_sel", "4.bias"]
    torch.testing.assert_close(tuned(x), model(x))
    full = sparse_update(model, {"2": slice(None), "4": slice(None)})
    assert saved_activation_bytes(tuned, x) < saved_activation_bytes(full, x)
    merged = merge(tuned)
    assert not any(isinstance(m, SparseUpdateConv2d) for m in merged.modules())
    torch.testing.assert_close(merged(x), model(x))


@given(groups=st.integers(2, 4), cg=st.integers(1, 3), og=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), data=st.data())
def test_any_groups_gradients_equal_dense_restricted(groups, cg, og, k, stride, padding,
                                                     dilation, data):
    """Grouped convs (RepVGG-B1g2/g4 keep them after fusion) and depthwise ones: the Og
    weights each selected input channel reaches, in (k*Og, 1, KH, KW) blocks."""
    c, o = groups * cg, groups * og
    size = dilation * (k - 1) + 1 + data.draw(st.integers(0, 3))
    sel = data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    conv = _conv(c, o, k, stride, padding, dilation, groups=groups, seed=len(sel))
    x = torch.randn(2, c, size, size + 1, dtype=F64)
    g = torch.randn_like(conv(x))
    conv, gx_dense, sparse, gx_sparse, ys = _dense_and_sparse(conv, sel, x, g)
    idx = torch.tensor(sel)
    rows = ((idx // cg)[:, None] * og + torch.arange(og)).flatten()
    cols = (idx % cg).repeat_interleave(og)
    torch.testing.assert_close(ys, conv(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(sparse.weight_sel.grad, conv.weight.grad[rows, cols][:, None],
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(gx_sparse, gx_dense, atol=1e-10, rtol=0)
    if cg > 1:      # the core's sparse kernel on the full input: (Og, k, KH, KW)
        ref = core.conv2d_weight(x, tuple(conv.weight.shape), g, stride, padding, dilation,
                                 groups, in_channels=idx)
        torch.testing.assert_close(sparse.weight_sel.grad[:, 0],
                                   ref.transpose(0, 1).reshape(-1, k, k), atol=1e-10, rtol=0)
    # one SGD step changes exactly the selected entries, and merges back
    before = conv.weight.detach().clone()
    torch.optim.SGD(sparse.parameters(), lr=0.5).step()
    changed = torch.zeros(o, cg, dtype=torch.bool)
    changed[rows, cols] = True
    diff = (sparse.to_conv().weight.detach() != before).flatten(2).any(-1)
    assert not (diff & ~changed).any()


def test_errors():
    with pytest.raises(GeometryError, match="in_channels"):
        SparseUpdateConv2d(nn.Conv2d(4, 4, 3), [7])
    with pytest.raises(GeometryError, match="repeats"):
        SparseUpdateConv2d(nn.Conv2d(4, 4, 3), [1, 1])
    with pytest.raises(InputError, match="no module"):
        sparse_update(nn.Sequential(nn.Conv2d(4, 4, 3)), {"body.0": [0]})
