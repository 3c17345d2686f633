"""Parallel sum, difference and channel concat of branches against summing torch convs."""

import math

import pytest
import torch
import torch.nn as nn
from helpers.algebra import TOL, D, max_diff, rand_conv
from hypothesis import given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv, add, concat, identity_conv, subtract
from repfuse.core.layout import make_spec
from repfuse.errors import NotFusable


@st.composite
def centred_conv(draw, cin, cout, s):
    """A conv whose output grid is the 'same' grid at stride s (odd effective kernel)."""
    kh, kw = draw(st.integers(0, 3)) * 2 + 1, draw(st.integers(0, 3)) * 2 + 1
    d = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([g for g in (1, 2, 4) if cin % g == 0 and cout % g == 0]))
    return dict(kernel_size=(kh, kw), stride=s, padding=(d * (kh - 1) // 2, d * (kw - 1) // 2),
                dilation=d, groups=g, bias=draw(st.booleans()))


@given(data=st.data(), n=st.integers(1, 4), s=st.integers(1, 2), with_id=st.booleans(),
       mode=st.sampled_from(["zeros", "reflect"]), h=st.integers(7, 11),
       seed=st.integers(0, 2**16))
def test_add_aligned_branches(data, n, s, with_id, mode, h, seed):
    gen = torch.Generator().manual_seed(seed)
    c = 4
    geoms = [data.draw(centred_conv(c, c, s)) for _ in range(n)]
    convs = [rand_conv(c, c, gen=gen, padding_mode=mode, **g) for g in geoms]
    x = torch.randn(2, c, h, h + 1, generator=gen, dtype=D)
    parts = [AffineConv.from_conv(m) for m in convs]
    ref = sum(m(x) for m in convs)
    if with_id and s == 1:
        parts.append(identity_conv(c, dtype=D))
        ref = ref + x
    fused = add(*parts)
    assert fused.spec.groups == math.gcd(*[p.spec.groups for p in parts])
    assert max_diff(fused.forward(x), ref) < TOL
    diff = subtract(parts[0], add(*parts[1:])) if len(parts) > 1 else None
    if diff is not None:
        ref2 = 2 * convs[0](x) - ref
        assert max_diff(diff.forward(x), ref2) < TOL


@given(data=st.data(), n=st.integers(2, 3), s=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_concat_branches(data, n, s, seed):
    gen = torch.Generator().manual_seed(seed)
    outs = [data.draw(st.sampled_from([2, 4])) for _ in range(n)]
    convs = [rand_conv(4, o, gen=gen, **data.draw(centred_conv(4, o, s))) for o in outs]
    x = torch.randn(1, 4, 7, 6, generator=gen, dtype=D)
    fused = concat(*[AffineConv.from_conv(m) for m in convs])
    assert fused.out_channels == sum(outs)
    assert max_diff(fused.forward(x), torch.cat([m(x) for m in convs], 1)) < TOL


@given(k=st.integers(1, 4), p=st.integers(0, 2), s=st.integers(1, 2), h=st.integers(6, 9))
def test_add_exact_or_refused_for_any_pair(k, p, s, h):
    """A 3x3/pad-1 branch plus any other branch: summed exactly iff the grids align."""
    gen = torch.Generator().manual_seed(k * 100 + p * 10 + s)
    a = rand_conv(2, 2, 3, gen, padding=1, stride=s)
    b = rand_conv(2, 2, k, gen, padding=p, stride=s)
    x = torch.randn(1, 2, h, h, generator=gen, dtype=D)
    same = AffineConv.from_conv(a).spec.aligned_with(AffineConv.from_conv(b).spec)
    if not same:
        with pytest.raises(NotFusable, match="output grids"):
            add(AffineConv.from_conv(a), AffineConv.from_conv(b))
        return
    fused = add(AffineConv.from_conv(a), AffineConv.from_conv(b))
    assert max_diff(fused.forward(x), a(x) + b(x)) < TOL


def test_refusals():
    gen = torch.Generator().manual_seed(0)
    a = AffineConv.from_conv(rand_conv(2, 2, 3, gen, padding=1, padding_mode="reflect"))
    b = AffineConv.from_conv(rand_conv(2, 2, 3, gen, padding=1))
    with pytest.raises(NotFusable, match="padding_mode"):
        add(a, b)
    c = AffineConv.from_conv(rand_conv(2, 4, 3, gen, padding=1))
    with pytest.raises(NotFusable, match="output channels"):
        add(b, c)
    d = AffineConv.from_conv(rand_conv(3, 2, 3, gen, padding=1))
    with pytest.raises(NotFusable, match="channel"):
        add(b, d)


def test_reflect_branch_plus_identity():
    """A pointwise branch reads no padding, so it joins a reflect-padded sum exactly."""
    gen = torch.Generator().manual_seed(1)
    conv = rand_conv(3, 3, 3, gen, padding=1, padding_mode="reflect")
    x = torch.randn(1, 3, 5, 5, generator=gen, dtype=D)
    fused = add(AffineConv.from_conv(conv), identity_conv(3, dtype=D))
    assert fused.padding_mode == "reflect"
    assert max_diff(fused.to_module()(x), conv(x) + x) < TOL


def test_sum_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    a, b = rand_conv(2, 2, 3, gen, padding=1, groups=2), rand_conv(2, 2, 1, gen)
    x = torch.randn(1, 2, 5, 5, generator=gen, dtype=D)
    gy = torch.randn(1, 2, 5, 5, generator=gen, dtype=D)
    params = [a.weight, a.bias, b.weight, b.bias]
    fused = add(AffineConv.from_conv(a), AffineConv.from_conv(b))
    g1 = torch.autograd.grad((fused.forward(x) * gy).sum(), params)
    g2 = torch.autograd.grad(((a(x) + b(x)) * gy).sum(), params)
    for u, v in zip(g1, g2):
        assert max_diff(u, v) < TOL
    assert isinstance(fused.to_module(), nn.Conv2d)


@pytest.mark.parametrize("grad", [True, False])
def test_add_gives_each_branch_its_taps_gradient(grad):
    """Differentiated or not, the sum gives the same kernel, and each branch's weight
    gradient is the upstream gradient on its taps (a dilated branch: its strided taps); a
    float32 branch summed into float64 ones gets its gradient in float32."""
    gen = torch.Generator().manual_seed(5)
    big = nn.Conv2d(4, 4, 5, padding=2).double()
    one = nn.Conv2d(4, 4, 1).double()
    row = nn.Conv2d(4, 4, (1, 3), padding=(0, 1)).double()
    dil = nn.Conv2d(4, 4, 3, padding=2, dilation=2).double()
    convs = (big, one, row, dil)
    with torch.set_grad_enabled(grad):
        fused = add(*[AffineConv.from_conv(m) for m in convs])
    with torch.no_grad():
        plain = add(*[AffineConv.from_conv(m) for m in convs])
    torch.testing.assert_close(fused.weight.detach(), plain.weight, atol=0, rtol=0)
    x = torch.randn(2, 4, 9, 8, generator=gen, dtype=D)
    assert max_diff(plain.forward(x), sum(m(x) for m in convs)) < TOL
    if not grad:
        return
    g = torch.randn(fused.weight.shape, generator=gen, dtype=D)
    found = torch.autograd.grad(fused.weight, [m.weight for m in convs], g)
    for got, want in zip(found, (g, g[:, :, 2:3, 2:3], g[:, :, 2:3, 1:4], g[:, :, ::2, ::2])):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_sum_passes_gradcheck_with_mixed_dtypes_and_channels_last():
    """The taps' sum (a custom autograd function) against finite differences, for every
    input: the base kernel in channels-last, a 1x1, a row and an identity branch."""
    gen = torch.Generator().manual_seed(9)
    w3 = torch.randn(3, 3, 3, 3, generator=gen, dtype=D).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    w1 = torch.randn(3, 3, 1, 1, generator=gen, dtype=D).requires_grad_(True)
    wr = torch.randn(3, 3, 1, 3, generator=gen, dtype=D).requires_grad_(True)
    spec3, spec1 = make_spec(w3.shape, padding=1), make_spec(w1.shape)
    specr = make_spec(wr.shape, padding=(0, 1))

    def fused(a, b, c):
        return add(AffineConv.from_tensors(a, None, spec3),
                   AffineConv.from_tensors(b, None, spec1),
                   AffineConv.from_tensors(c, None, specr), identity_conv(3, dtype=D)).weight

    assert torch.autograd.gradcheck(fused, (w3, w1, wr))
    w1f = w1.detach().float().requires_grad_(True)
    out = add(AffineConv.from_tensors(w3, None, spec3), AffineConv.from_tensors(w1f, None, spec1))
    (g,) = torch.autograd.grad(out.weight.sum(), [w1f])
    assert g.dtype == torch.float32 and torch.equal(g, torch.ones_like(w1f))
