"""Embedding kernels into larger / differently dilated ones, and regrouping."""

import pytest
import torch
from helpers.algebra import TOL, D, conv_ref, max_diff
from hypothesis import assume, given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv, common_geometry, embed_kernel, regroup
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def rand_affine(spec, gen):
    return AffineConv.from_tensors(torch.randn(spec.weight_shape, generator=gen, dtype=D),
                                   torch.randn(spec.out_channels, generator=gen, dtype=D), spec)


def run(conv, x):
    s = conv.spec
    return conv_ref(x, conv.weight, conv.bias, s.stride, s.padding, s.dilation, s.groups,
                    s.padding_mode)


@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pads=st.tuples(*[st.integers(0, 4)] * 4),
       big=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       bd=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       shift=st.tuples(st.integers(0, 4), st.integers(0, 4)), s=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_embed_exact_or_refused(k, d, pads, big, bd, shift, s, seed):
    """Any source/target pair: either the embedded kernel computes exactly the same output,
    or the target does not contain the source's taps / grid and NotFusable is raised."""
    gen = torch.Generator().manual_seed(seed)
    src = ConvSpec(4, 4, k, s, pads, d)
    # a target with the same output grid: choose its low padding, derive the high one
    lo = (shift[0], shift[1])
    hi = [src.grid_key()[1 + a] + (bd[a] * (big[a] - 1) + 1) - lo[a] for a in range(2)]
    assume(min(hi) >= 0)
    target = ConvSpec(4, 4, big, s, (lo[0], hi[0], lo[1], hi[1]), bd)
    conv = rand_affine(src, gen)
    fits = all(set(src.tap_offsets(a)) <= set(target.tap_offsets(a)) for a in range(2))
    if not fits:
        with pytest.raises(NotFusable, match="offsets"):
            embed_kernel(conv, target)
        return
    out = embed_kernel(conv, target)
    assert out.spec.kernel_size == target.kernel_size and out.spec.padding == target.padding
    x = torch.randn(2, 4, 9, 10, generator=gen, dtype=D)
    try:
        ref = run(conv, x)
    except RuntimeError:
        assume(False)
    assert max_diff(run(out, x), ref) < TOL


@pytest.mark.parametrize("small,pad", [((1, 1), 0), ((1, 3), (0, 1)), ((3, 1), (1, 0)),
                                       ((3, 3), 1), ((5, 5), 2)])
def test_embed_acnet_and_small_kernels_into_5x5(small, pad):
    gen = torch.Generator().manual_seed(0)
    conv = rand_affine(ConvSpec(3, 3, small, 1, pad), gen)
    out = embed_kernel(conv, ConvSpec(3, 3, 5, 1, 2))
    x = torch.randn(1, 3, 7, 8, generator=gen, dtype=D)
    assert max_diff(run(out, x), run(conv, x)) < TOL


@pytest.mark.parametrize("k,d", [(3, 2), (3, 3), (5, 2), (3, 1)])
def test_embed_dilated_small_into_large(k, d):
    """UniRepLKNet: a dilated small kernel is a sparse large kernel."""
    gen = torch.Generator().manual_seed(1)
    conv = rand_affine(ConvSpec(4, 4, k, 1, d * (k - 1) // 2, d, groups=4), gen)
    out = embed_kernel(conv, ConvSpec(4, 4, 9, 1, 4, groups=4))
    x = torch.randn(1, 4, 11, 12, generator=gen, dtype=D)
    assert max_diff(run(out, x), run(conv, x)) < TOL


def test_misaligned_refused():
    gen = torch.Generator().manual_seed(0)
    # even kernel with symmetric padding: output one larger than the 3x3's
    with pytest.raises(NotFusable, match="output grids"):
        embed_kernel(rand_affine(ConvSpec(2, 2, 2, 1, 1), gen), ConvSpec(2, 2, 3, 1, 1))
    # an unpadded 1x1 is the centre tap of a 3x3 with padding 1
    out = embed_kernel(rand_affine(ConvSpec(2, 2, 1, 1, (0, 0, 0, 0)), gen),
                       ConvSpec(2, 2, 3, 1, 1))
    assert out.spec.kernel_size == (3, 3)
    # different strides
    with pytest.raises(NotFusable, match="output grids"):
        embed_kernel(rand_affine(ConvSpec(2, 2, 1, 2, 0), gen), ConvSpec(2, 2, 3, 1, 1))
    # zero-padded branch in a reflect-padded geometry
    with pytest.raises(NotFusable, match="pads with"):
        embed_kernel(rand_affine(ConvSpec(2, 2, 3, 1, 1), gen),
                     ConvSpec(2, 2, 5, 1, 2, padding_mode="reflect"))


@given(cin=st.sampled_from([4, 8]), cout=st.sampled_from([4, 8]), g=st.sampled_from([2, 4]),
       to=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_regroup(cin, cout, g, to, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = rand_affine(ConvSpec(cin, cout, 3, 1, 1, 1, g), gen)
    x = torch.randn(1, cin, 5, 5, generator=gen, dtype=D)
    if g % to:
        with pytest.raises(NotFusable, match="groups"):
            regroup(conv, to)
        return
    out = regroup(conv, to)
    assert out.spec.groups == to
    assert max_diff(run(out, x), run(conv, x)) < TOL


def test_common_geometry_envelope():
    specs = [ConvSpec(4, 4, 7, 1, 3), ConvSpec(4, 4, 3, 1, 2, 2), ConvSpec(4, 4, (1, 5), 1,
                                                                         (0, 0, 2, 2))]
    target = common_geometry(specs)
    assert target.kernel_size == (7, 7) and target.padding == (3, 3, 3, 3)
    assert target.dilation == (1, 1)
    dil = common_geometry([ConvSpec(4, 4, 3, 1, 2, 2), ConvSpec(4, 4, 1)])
    assert dil.kernel_size == (3, 3) and dil.dilation == (2, 2)
