"""Cropping a conv's output against slicing the output of the conv itself."""

import pytest
import torch
from helpers.algebra import TOL, D, conv_ref, max_diff
from hypothesis import assume, given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv, crop_output
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError, NotFusable


@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       s=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       d=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       pads=st.tuples(*[st.integers(0, 2)] * 4), crop=st.tuples(*[st.integers(0, 2)] * 4),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       h=st.integers(8, 13), w=st.integers(8, 13), seed=st.integers(0, 2**16))
def test_crop_output_is_slicing_the_output(k, s, d, pads, crop, mode, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    spec = ConvSpec(4, 6, k, s, pads, d, 2, mode)
    assume(max(pads) < min(h, w))
    conv = AffineConv.from_tensors(torch.randn(spec.weight_shape, generator=gen, dtype=D),
                                   torch.randn(6, generator=gen, dtype=D), spec)
    x = torch.randn(2, 4, h, w, generator=gen, dtype=D)
    y = conv_ref(x, conv.weight, conv.bias, s, spec.padding, d, 2, mode)
    t, b, l, r = crop
    assume(y.shape[2] > t + b and y.shape[3] > l + r)
    want = y[:, :, t:y.shape[2] - b, l:y.shape[3] - r]
    try:
        cropped = crop_output(conv, crop)
    except NotFusable as err:   # reads that would start between two dilated taps
        assert "dilated" in str(err)
        return
    c = cropped.spec
    got = conv_ref(x, cropped.weight, cropped.bias, c.stride, c.padding, c.dilation, c.groups,
                   c.padding_mode)
    assert max_diff(got, want) < TOL


def test_crop_of_the_input_embeds_a_1xk_conv_like_acnet():
    """A crop of one row on each side, then a 1x3 conv without row padding, is a 3x3 conv
    (ACNet's horizontal branch when the padding is smaller than k // 2)."""
    gen = torch.Generator().manual_seed(0)
    ident = AffineConv.from_tensors(torch.eye(4, dtype=D).reshape(4, 4, 1, 1),
                                    None, ConvSpec(4, 4, 1))
    cropped = crop_output(ident, (1, 1, 0, 0))
    assert cropped.spec.kernel_size == (3, 1) and cropped.spec.padding == (0, 0, 0, 0)
    x = torch.randn(1, 4, 9, 7, generator=gen, dtype=D)
    assert max_diff(conv_ref(x, cropped.weight, cropped.bias, 1, (0, 0, 0, 0), 1, 1),
                    x[:, :, 1:-1, :]) == 0


def test_negative_crop_is_refused():
    conv = AffineConv.from_tensors(torch.randn(4, 4, 3, 3, dtype=D), None, ConvSpec(4, 4, 3))
    with pytest.raises(GeometryError, match="must be >= 0"):
        crop_output(conv, (-1, 0, 0, 0))
