"""Average pooling as a depthwise conv against F.avg_pool2d."""

import pytest
import torch
import torch.nn.functional as F
from helpers.algebra import TOL, D, max_diff
from hypothesis import assume, given
from hypothesis import strategies as st

from repfuse.algebra import avg_pool_conv
from repfuse.errors import NotFusable


@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       s=st.tuples(st.integers(1, 3), st.integers(1, 3)), p=st.tuples(st.integers(0, 2),
                                                                      st.integers(0, 2)),
       include=st.booleans(), ceil=st.booleans(), div=st.sampled_from([None, 2, 5]),
       h=st.integers(4, 9), w=st.integers(4, 9), seed=st.integers(0, 2**16))
def test_avg_pool_exact_or_refused(k, s, p, include, ceil, div, h, w, seed):
    assume(p[0] <= k[0] // 2 and p[1] <= k[1] // 2)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, w, generator=gen, dtype=D)
    ref = F.avg_pool2d(x, k, s, p, ceil, include, div)
    refuse = (ceil and s != (1, 1)) or (not include and div is None and max(p) > 0)
    if refuse:
        with pytest.raises(NotFusable, match="AvgPool2d"):
            avg_pool_conv(3, k, s, p, count_include_pad=include, ceil_mode=ceil,
                          divisor_override=div)
        return
    conv = avg_pool_conv(3, k, s, p, count_include_pad=include, ceil_mode=ceil,
                         divisor_override=div, dtype=D)
    assert conv.spec.groups == 3
    assert max_diff(conv.forward(x), ref) < TOL


def test_stride_defaults_to_kernel():
    x = torch.randn(1, 2, 8, 8, dtype=D)
    conv = avg_pool_conv(2, 2)
    assert conv.spec.stride == (2, 2)
    assert max_diff(conv.forward(x), F.avg_pool2d(x, 2)) < TOL
