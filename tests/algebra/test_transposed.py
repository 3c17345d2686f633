"""Transposed convolutions in the algebra, against torch's ConvTranspose2d in float64:
a following BN (any groups, dilation, output padding, stride 1-3), parallel branches
embedded into a common geometry, a preceding per-channel map (exact only where every
output reads every tap), regrouping and concatenation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repfuse import algebra as A
from repfuse.algebra.affine import AffineConv
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable

D = torch.float64


@st.composite
def deconvs(draw, cin=None, stride=None, groups=None, cout=None):
    """A random nn.ConvTranspose2d (float64, random weights); its padding is at most its
    taps' reach, so inputs of 8 rows or more give a non-empty output (``_x``)."""
    if groups is None and cin and cout:
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if cin % g == 0 and cout % g == 0]))
    g = groups or draw(st.sampled_from([1, 2, 4]))
    cin = cin or g * draw(st.integers(1, 2))
    cout = cout or g * draw(st.integers(1, 2))
    s = stride or draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    d = draw(st.integers(1, 2))
    p = draw(st.integers(0, d * (k - 1)))
    op = draw(st.integers(0, max(s, d) - 1))
    m = nn.ConvTranspose2d(cin, cout, k, s, p, op, g, bias=draw(st.booleans()), dilation=d)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.parameters():
            t.copy_(torch.randn(t.shape, generator=gen))
    return m.double()


def _affine(m: nn.ConvTranspose2d) -> AffineConv:
    return AffineConv.from_tensors(m.weight, m.bias, ConvSpec.from_module(m))


def _x(c, seed=0, h=8, w=9):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=D)


def _bn(c, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


@given(m=deconvs(), seed=st.integers(0, 99))
def test_bn_after_any_deconv(m, seed):
    bn = _bn(m.out_channels, seed)
    fused = A.fold_bn_module(_affine(m), bn)
    x = _x(m.in_channels, seed)
    with torch.no_grad():
        expected = bn(m(x))
        torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)
        module = fused.to_module()
        assert isinstance(module, nn.ConvTranspose2d)
        torch.testing.assert_close(module.double()(x), expected, rtol=1e-12, atol=1e-12)


@given(a=deconvs(cin=4, stride=2, cout=4), b=deconvs(cin=4, stride=2, cout=4),
       seed=st.integers(0, 99))
def test_parallel_deconvs_sum_where_aligned(a, b, seed):
    x = _x(4, seed)
    try:
        fused = A.add(_affine(a), A.negate(_affine(b)))
    except NotFusable as err:
        # refused only where the output grids differ or no common geometry exists
        sa, sb = ConvSpec.from_module(a), ConvSpec.from_module(b)
        assert not sa.aligned_with(sb) or "common geometry" in str(err), str(err)
        return
    with torch.no_grad():
        torch.testing.assert_close(fused(x), a(x) - b(x), rtol=1e-12, atol=1e-12)


def test_2x2_deconv_embeds_into_4x4_p1():
    gen = torch.Generator().manual_seed(0)
    small, big = nn.ConvTranspose2d(4, 6, 2, 2).double(), nn.ConvTranspose2d(4, 6, 4, 2, 1)
    big = big.double()
    fused = A.add(_affine(big), _affine(small))
    assert fused.spec.kernel_size == (4, 4) and fused.spec.padding == (1, 1, 1, 1)
    x = torch.randn(1, 4, 5, 7, generator=gen, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fused.to_module().double()(x), big(x) + small(x))


@given(m=deconvs(), scale_only=st.booleans(), seed=st.integers(0, 99))
def test_channelwise_map_before_deconv_exact_or_refused(m, scale_only, seed):
    bn = _bn(m.in_channels, seed)
    first = A.bn_module_conv(bn, dtype=D)
    if scale_only:
        first = first.replace(bias=torch.zeros_like(first.bias))
    spec = ConvSpec.from_module(m)
    x = _x(m.in_channels, seed)
    try:
        fused = A.compose(first, _affine(m))
    except NotFusable as err:
        assert not scale_only and not A.shift_passes_transposed(spec), str(err)
        return
    assert scale_only or A.shift_passes_transposed(spec)
    with torch.no_grad():
        expected = m(first(x))
        torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)


def test_shift_before_deconv_is_a_bias_only_where_every_output_reads_every_tap():
    # stride 1 and padding >= dilation * (k - 1) on both sides: exact
    assert A.shift_passes_transposed(ConvSpec(2, 2, 3, 1, 2, transposed=True))
    assert A.shift_passes_transposed(ConvSpec(2, 2, 1, transposed=True))
    # stride 2: even and odd outputs read different taps; padding 1: the borders read fewer
    assert not A.shift_passes_transposed(ConvSpec(2, 2, 2, 2, transposed=True))
    assert not A.shift_passes_transposed(ConvSpec(2, 2, 1, 2, transposed=True))
    assert not A.shift_passes_transposed(ConvSpec(2, 2, 3, 1, 1, transposed=True))


@given(m=deconvs(groups=4), to=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_regroup_deconv(m, to, seed):
    fused = A.regroup(_affine(m), to)
    assert fused.spec.groups == to
    x = _x(m.in_channels, seed)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-12, atol=1e-12)


def test_concat_and_depthwise_deconvs():
    a = nn.ConvTranspose2d(4, 4, 3, 2, 1, 1, groups=4).double()
    b = nn.ConvTranspose2d(4, 8, 4, 2, 1, groups=2).double()
    fused = A.concat(_affine(a), _affine(b))
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([a(x), b(x)], 1))
        torch.testing.assert_close(fused.to_module().double()(x), torch.cat([a(x), b(x)], 1))


def test_forward_and_transposed_branches_are_not_summed():
    conv = AffineConv.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    deconv = _affine(nn.ConvTranspose2d(4, 4, 3, 1, 1))
    with pytest.raises(NotFusable, match="transposed convolution combined with a forward"):
        A.add(conv, deconv)
    with pytest.raises(NotFusable, match="after the transposed"):
        A.compose(deconv, conv)


def test_torch_layer_for_per_side_padding():
    """Per-side padding becomes torch's padding and output padding where it can."""
    w = torch.randn(2, 3, 3, 3, dtype=D)
    spec = ConvSpec(2, 3, 3, 2, (1, 0, 1, 0), transposed=True)
    conv = AffineConv(w, torch.zeros(3, dtype=D), spec, D)
    module = conv.to_module().double()
    assert module.padding == (1, 1) and module.output_padding == (1, 1)
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x))
        reference = F.conv_transpose2d(x, w, None, 2, 0)[:, :, 1:, 1:]
        torch.testing.assert_close(conv(x), reference)
    bad = AffineConv(w, torch.zeros(3, dtype=D), spec.replace(padding=(0, 1, 0, 1)))
    with pytest.raises(NotFusable, match="crops more at the end"):
        bad.to_module()
