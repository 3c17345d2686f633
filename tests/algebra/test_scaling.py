"""Scale, shift, negate by scalars and per-channel tensors."""

import pytest
import torch
from helpers.algebra import TOL, D, max_diff, rand_conv
from hypothesis import given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv, negate, scale, scale_rows, shift
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


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dims", [2, 4])
def test_scale_rows_gradients(fmt, dims):
    """Per-output-channel scaling against finite differences, for the kernel and the
    scale, with the kernel in either memory format (2-D: a Linear's weight)."""
    gen = torch.Generator().manual_seed(2)
    shape = (5, 3, 3, 2)[:dims]
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    if dims == 4:
        w = w.contiguous(memory_format=fmt)
    w.requires_grad_(True)
    s = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scale_rows, (w, s))


def test_scale_rows_of_a_float32_kernel_and_its_scale_gradient_without_a_product():
    """A float32 kernel times a float64 scale is float64, its gradient float32; with the
    incoming gradient laid out as the kernel, the scale's gradient is made without a
    kernel-sized product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=gen).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    s = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    out = scale_rows(w, s)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, w.double() * s.reshape(-1, 1, 1, 1), atol=0, rtol=0)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    (gs,) = torch.autograd.grad(out, s, g, retain_graph=True)
    torch.testing.assert_close(gs, (g * w.double()).sum((1, 2, 3)))

    class Sizes(TorchDispatchMode):
        made: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in args
                     if isinstance(a, torch.Tensor)}
            if isinstance(result, torch.Tensor) and result.numel() == w.numel() \
                    and result.untyped_storage().data_ptr() not in given:
                self.made.append(func.overloadpacket.__name__)
            return result

    w64 = w.detach().double().contiguous(memory_format=torch.channels_last)
    out = scale_rows(w64.requires_grad_(False), s)
    with Sizes() as mode:
        torch.autograd.grad(out, s, g)
    assert mode.made == [], mode.made
    gw, = torch.autograd.grad(scale_rows(w, s), w, g)
    assert gw.dtype == torch.float32
