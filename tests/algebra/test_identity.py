"""The identity as a conv for any channels, groups, kernel size (even too) and dilation."""

import pytest
import torch
from helpers.algebra import D, conv_ref
from hypothesis import given
from hypothesis import strategies as st

from repfuse.algebra import identity_conv
from repfuse.errors import NotFusable


@given(c=st.sampled_from([1, 2, 3, 4, 6, 8]), g=st.sampled_from([1, 2, 3, None]),
       k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       h=st.integers(4, 9), w=st.integers(4, 9))
def test_identity_is_identity(c, g, k, d, mode, h, w):
    groups = None if g is None or c % g else g
    ident = identity_conv(c, k, groups=groups, dilation=d, padding_mode=mode, dtype=D)
    assert ident.spec.kernel_size == k and ident.spec.groups == (c if groups is None else groups)
    x = torch.randn(2, c, h, w, dtype=D)
    s = ident.spec
    if mode != "zeros" and max(s.padding) >= min(h, w):
        return  # torch cannot pad that much by reflection
    y = conv_ref(x, ident.weight, ident.bias, s.stride, s.padding, s.dilation, s.groups, mode)
    assert torch.equal(y, x)
    assert torch.equal(ident.forward(x), x)


def test_identity_groups_must_divide():
    with pytest.raises(NotFusable, match="groups=4"):
        identity_conv(6, 3, groups=4)
