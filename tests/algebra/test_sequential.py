"""Sequential composition and output padding against evaluating the two convs in turn."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.algebra import TOL, D, conv_ref, max_diff
from hypothesis import assume, given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv, bn_conv, compose, pad_output
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def rand_affine(spec, gen, bias=True):
    w = torch.randn(spec.weight_shape, generator=gen, dtype=D)
    b = torch.randn(spec.out_channels, generator=gen, dtype=D) if bias else None
    return AffineConv.from_tensors(w, b, spec)


def run(conv, x):
    s = conv.spec
    return conv_ref(x, conv.weight, conv.bias, s.stride, s.padding, s.dilation, s.groups,
                    s.padding_mode)


geometry = st.fixed_dictionaries({
    "k": st.tuples(st.integers(1, 4), st.integers(1, 4)),
    "s": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "d": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "g": st.sampled_from([1, 2, 4]),
})


@given(a=geometry, b=geometry, pads=st.tuples(*[st.integers(0, 2)] * 4),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       cmid=st.sampled_from([4, 8]), h=st.integers(6, 12), w=st.integers(6, 12),
       seed=st.integers(0, 2**16))
def test_compose_unpadded_second(a, b, pads, mode, cmid, h, w, seed):
    """then has no padding: exact for any first conv (any padding mode, stride, groups)."""
    gen = torch.Generator().manual_seed(seed)
    sa = ConvSpec(4, cmid, a["k"], a["s"], pads, a["d"], a["g"], mode)
    sb = ConvSpec(cmid, 4, b["k"], b["s"], 0, b["d"], b["g"])
    first, then = rand_affine(sa, gen), rand_affine(sb, gen)
    x = torch.randn(2, 4, h, w, generator=gen, dtype=D)
    try:
        ref = run(then, run(first, x))
    except RuntimeError:
        assume(False)  # input too small for this geometry (or reflect padding too wide)
    fused = compose(first, then)
    assert max_diff(run(fused, x), ref) < TOL
    assert fused.spec.groups == math.gcd(a["g"], b["g"])


@given(b=geometry, pads=st.tuples(*[st.integers(0, 2)] * 4), s=st.integers(1, 2),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       g=st.sampled_from([1, 2, 4]), bias=st.booleans(), h=st.integers(5, 10),
       apad=st.tuples(*[st.integers(0, 1)] * 4), seed=st.integers(0, 2**16))
def test_compose_pointwise_then_padded(b, pads, s, mode, g, bias, h, apad, seed):
    """1x1 (maybe zero-padded) then a padded kxk: exact when the padding commutes with the
    1x1, refused otherwise (zero padding of a biased output, replicate-style padding of a
    strided or padded one)."""
    gen = torch.Generator().manual_seed(seed)
    sa = ConvSpec(4, 8, 1, s, apad, 1, g)
    sb = ConvSpec(8, 4, b["k"], b["s"], pads, b["d"], b["g"], mode)
    first, then = rand_affine(sa, gen, bias=bias), rand_affine(sb, gen)
    x = torch.randn(2, 4, h, h + 1, generator=gen, dtype=D)
    try:
        ref = run(then, run(first, x))
    except RuntimeError:
        assume(False)
    refuse = max(pads) > 0 and ((mode == "zeros" and bias)
                                or (mode != "zeros" and (s > 1 or max(apad) > 0)))
    if refuse:
        with pytest.raises(NotFusable):
            compose(first, then)
        return
    fused = compose(first, then)
    assert max_diff(run(fused, x), ref) < TOL


@given(ka=st.integers(2, 3), kb=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_compose_refuses_padding_after_spatial_kernel(ka, kb, seed):
    gen = torch.Generator().manual_seed(seed)
    first = rand_affine(ConvSpec(4, 4, ka, 1, 1), gen, bias=False)
    then = rand_affine(ConvSpec(4, 4, kb, 1, 1), gen, bias=False)
    with pytest.raises(NotFusable, match="not pointwise"):
        compose(first, then)


@given(p=st.tuples(*[st.integers(0, 2)] * 4), k=st.integers(1, 3), s=st.integers(1, 2),
       g=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_pad_with_bias_value_then_conv(p, k, s, g, seed):
    """DBB's BN-and-pad: pad a 1x1 conv + BN's output with its bias, then an unpadded kxk."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.rand(4, generator=gen, dtype=D)
    var = torch.rand(4, generator=gen, dtype=D) + 0.5
    gamma, beta = torch.rand(4, generator=gen, dtype=D), torch.randn(4, generator=gen, dtype=D)
    first = compose(rand_affine(ConvSpec(4, 4, 1, s, 0, 1, g), gen, bias=False),
                    bn_conv(mean, var, gamma, beta, 1e-5))
    pad_value = beta - mean * gamma / torch.sqrt(var + 1e-5)  # as DBB computes it
    then = rand_affine(ConvSpec(4, 4, k, 1, 0, 1, g), gen)
    x = torch.randn(1, 4, 6, 7, generator=gen, dtype=D)
    t, b, l, r = p
    y = F.pad(run(first, x), (l, r, t, b))
    mask = F.pad(torch.zeros(1, 1, y.shape[2] - t - b, y.shape[3] - l - r, dtype=D),
                 (l, r, t, b), value=1.0)
    y = y + mask * pad_value.reshape(-1, 1, 1)
    ref = run(then, y)
    fused = compose(pad_output(first, p, pad_value), then)
    assert max_diff(run(fused, x), ref) < TOL


def test_pad_with_other_value_refused():
    gen = torch.Generator().manual_seed(0)
    first = rand_affine(ConvSpec(4, 4, 1), gen)
    with pytest.raises(NotFusable, match="zero input"):
        pad_output(first, (1, 1, 1, 1), 0.0)
    with pytest.raises(NotFusable, match="not a padding of its input"):
        pad_output(rand_affine(ConvSpec(4, 4, 3, padding=1), gen, bias=False), (1, 1, 1, 1))


def test_compose_channel_mismatch_refused():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(NotFusable, match="channels"):
        compose(rand_affine(ConvSpec(4, 8, 1), gen), rand_affine(ConvSpec(4, 4, 1), gen))


@given(k=st.integers(1, 4), s=st.integers(1, 2), d=st.integers(1, 2), g=st.sampled_from([1, 2]),
       ga=st.sampled_from([1, 2, 8]), out=st.sampled_from([8, 16]),
       case=st.sampled_from(["scale first", "then 1x1"]), seed=st.integers(0, 2**16))
def test_compose_with_a_pointwise_side(k, s, d, g, ga, out, case, seed):
    """The products taken for a 1x1 side (a per-channel scale first; a 1x1 after a
    depthwise, grouped or dense conv) equal evaluating the two convs in turn."""
    gen = torch.Generator().manual_seed(seed)
    if case == "scale first":
        sa = ConvSpec(8, 8, 1, s, 0, 1, 8)
        sb = ConvSpec(8, 4, k, 1, 0, d, g)
    else:
        sa = ConvSpec(8, out, k, s, k // 2, d, ga)
        sb = ConvSpec(out, 4, 1, 1, 0, 1, g)
    first, then = rand_affine(sa, gen), rand_affine(sb, gen)
    x = torch.randn(2, 8, 15, 15, generator=gen, dtype=D)   # the fused kernel spans 13
    fused = compose(first, then)
    assert max_diff(run(fused, x), run(then, run(first, x))) < TOL
