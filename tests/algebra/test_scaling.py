"""Scale, shift, negate by scalars and per-channel tensors."""

import pytest
import torch
from helpers.algebra import TOL, D, max_diff, rand_conv
from hypothesis import given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv, negate, scale, shift
from repfuse.errors import NotFusable


@given(shape=st.sampled_from([(), (1,), (6,), (6, 1, 1), (1, 6, 1, 1)]), scalar=st.booleans(),
       seed=st.integers(0, 2**16))
def test_scale_shift_negate(shape, scalar, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = rand_conv(3, 6, 3, gen, padding=1)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=D)
    f = 0.37 if scalar else torch.randn(shape, generator=gen, dtype=D)
    v = -1.5 if scalar else torch.randn(shape, generator=gen, dtype=D)
    fv = f if scalar else f.reshape(-1, 1, 1) if f.numel() > 1 else f.reshape(())
    vv = v if scalar else v.reshape(-1, 1, 1) if v.numel() > 1 else v.reshape(())
    ac = AffineConv.from_conv(conv)
    assert max_diff(scale(ac, f).forward(x), conv(x) * fv) < TOL
    assert max_diff(shift(ac, v).forward(x), conv(x) + vv) < TOL
    assert max_diff(negate(ac).forward(x), -conv(x)) < TOL


def test_bad_factor_shape_refused():
    ac = AffineConv.from_conv(rand_conv(3, 6, 1, torch.Generator().manual_seed(0)))
    with pytest.raises(NotFusable, match="per-channel"):
        scale(ac, torch.ones(4))
    with pytest.raises(NotFusable, match="per-channel"):
        shift(ac, torch.ones(6, 2))
