"""Batch-norm folding against nn.BatchNorm2d in eval mode."""

import pytest
import torch
import torch.nn as nn
from helpers.algebra import TOL, D, max_diff, rand_bn, rand_conv
from hypothesis import given
from hypothesis import strategies as st

from repfuse.algebra import (
    AffineConv,
    bn_conv,
    bn_module_conv,
    fold_bn,
    fold_bn_module,
    fold_preceding_bn,
)
from repfuse.errors import NotFusable


@given(k=st.integers(1, 3), g=st.sampled_from([1, 2, 4]), affine=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fold_following_bn(k, g, affine, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    conv, bn = rand_conv(4, 8, k, gen, padding=k // 2, groups=g, bias=bias), rand_bn(8, gen,
                                                                                      affine)
    x = torch.randn(2, 4, 6, 5, generator=gen, dtype=D)
    fused = fold_bn_module(AffineConv.from_conv(conv), bn)
    assert max_diff(fused.forward(x), bn(conv(x))) < TOL
    args = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert max_diff(fold_bn(AffineConv.from_conv(conv), *args).forward(x), bn(conv(x))) < TOL


@given(k=st.integers(1, 4), d=st.integers(1, 3), c=st.sampled_from([2, 4, 6]),
       g=st.sampled_from([1, 2, None]), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_bn_alone_as_identity_conv(k, d, c, g, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = rand_bn(c, gen, affine)
    groups = None if g is None else (g if c % g == 0 else 1)
    fused = bn_module_conv(bn, kernel_size=k, dilation=d, groups=groups)
    assert fused.spec.kernel_size == (k, k)
    assert fused.spec.groups == (c if groups is None else groups)
    x = torch.randn(2, c, 5, 6, generator=gen, dtype=D)
    assert max_diff(fused.forward(x), bn(x)) < TOL


@given(k=st.integers(1, 3), s=st.integers(1, 2), g=st.sampled_from([1, 2]),
       pad=st.integers(0, 1), mode=st.sampled_from(["zeros", "reflect", "replicate"]),
       seed=st.integers(0, 2**16))
def test_fold_preceding_bn(k, s, g, pad, mode, seed):
    """conv(bn(x)): exact without zero padding (or with replicating padding modes),
    refused with zero padding."""
    gen = torch.Generator().manual_seed(seed)
    bn, conv = rand_bn(4, gen), rand_conv(4, 6, k, gen, stride=s, padding=pad, groups=g,
                                          padding_mode=mode)
    args = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    if pad and mode == "zeros":
        with pytest.raises(NotFusable, match="bias"):
            fold_preceding_bn(AffineConv.from_conv(conv), *args)
        return
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=D)
    fused = fold_preceding_bn(AffineConv.from_conv(conv), *args)
    assert max_diff(fused.forward(x), conv(bn(x))) < TOL
    assert fused.spec.groups == g


def test_bn_without_running_stats_refused():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    conv = AffineConv.from_conv(nn.Conv2d(4, 4, 1))
    with pytest.raises(NotFusable, match="running statistics"):
        fold_bn_module(conv, bn)
    with pytest.raises(NotFusable, match="running statistics"):
        bn_module_conv(bn)
    with pytest.raises(NotFusable, match="running statistics"):
        fold_bn(conv, None, None)
    with pytest.raises(NotFusable, match="running statistics"):
        bn_conv(None, None)


def test_bn_channel_mismatch_refused():
    conv = AffineConv.from_conv(nn.Conv2d(4, 4, 1))
    with pytest.raises(NotFusable, match="channels"):
        fold_bn_module(conv, nn.BatchNorm2d(3).eval())


def test_fold_is_differentiable_in_bn_parameters():
    gen = torch.Generator().manual_seed(0)
    conv, bn = rand_conv(3, 3, 3, gen, padding=1), rand_bn(3, gen)
    x = torch.randn(1, 3, 5, 5, generator=gen, dtype=D)
    gy = torch.randn(1, 3, 5, 5, generator=gen, dtype=D)
    params = [conv.weight, conv.bias, bn.weight, bn.bias]
    g1 = torch.autograd.grad((fold_bn_module(AffineConv.from_conv(conv), bn).forward(x) * gy)
                             .sum(), params)
    g2 = torch.autograd.grad((bn(conv(x)) * gy).sum(), params)
    for a, b in zip(g1, g2):
        assert max_diff(a, b) < TOL
