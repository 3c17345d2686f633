"""The grouped-convolution weight gradient against torch autograd (float64)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repfuse import core
from repfuse.core import grouped
from repfuse.core.grouped import conv2d_weight_grouped
from repfuse.core.spec import ConvSpec

F64 = torch.float64


def autograd_weight(x, w, dy, spec):
    """torch autograd of the forward convolution (explicit per-side zero padding)."""
    t, b, l, r = spec.padding
    w = w.detach().requires_grad_(True)
    y = F.conv2d(F.pad(x, (l, r, t, b)), w, None, spec.stride, 0, spec.dilation, spec.groups)
    (gw,) = torch.autograd.grad(y, w, dy)
    return gw


@st.composite
def geometries(draw):
    """Random geometry: groups 1, 1 < g < C, depthwise, O != C; rectangular and even
    kernels; stride, per-side padding and dilation up to 3; batch up to 3."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        g, cg = 1, draw(st.integers(1, 4))
    elif kind == "grouped":
        g, cg = draw(st.integers(2, 3)), draw(st.integers(2, 3))
    else:
        g, cg = draw(st.integers(2, 5)), 1
    og = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(4))
    spec = ConvSpec(g * cg, g * og, kernel, stride, padding, dilation, g)
    ek = spec.effective_kernel
    h = draw(st.integers(max(1, ek[0] - padding[0] - padding[1]), ek[0] + 6))
    w = draw(st.integers(max(1, ek[1] - padding[2] - padding[3]), ek[1] + 6))
    n = draw(st.integers(1, 3))
    return spec, (n, spec.in_channels, h, w)


def _tensors(spec, shape, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    w = torch.randn(spec.torch_weight_shape, generator=gen, dtype=dtype)
    oh, ow = spec.output_size(shape[2:])
    dy = torch.randn((shape[0], spec.out_channels, oh, ow), generator=gen, dtype=dtype)
    return x, w, dy


@given(geometries(), st.integers(0, 2**31 - 1))
def test_grouped_weight_matches_autograd(geom, seed):
    spec, shape = geom
    x, w, dy = _tensors(spec, shape, seed)
    got = conv2d_weight_grouped(x, w.shape, dy, spec)
    torch.testing.assert_close(got, autograd_weight(x, w, dy, spec), atol=1e-10, rtol=0)


@given(geometries(), st.integers(0, 2**31 - 1))
def test_grouped_through_public_kernel(geom, seed):
    spec, shape = geom
    x, w, dy = _tensors(spec, shape, seed)
    got = core.conv2d_weight(x, w.shape, dy, spec.stride, spec.padding, spec.dilation,
                             spec.groups, algorithm="grouped")
    torch.testing.assert_close(got, autograd_weight(x, w, dy, spec), atol=1e-10, rtol=0)


def test_batch_chunks(monkeypatch):
    """A tiny tile budget forces one grouped convolution per sample; same result."""
    spec = ConvSpec(6, 4, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2)
    x, w, dy = _tensors(spec, (5, 6, 9, 8), 0)
    monkeypatch.setattr(grouped, "_TILE_BUDGET", 1)
    got = conv2d_weight_grouped(x, w.shape, dy, spec)
    torch.testing.assert_close(got, autograd_weight(x, w, dy, spec), atol=1e-10, rtol=0)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_groups_between_one_and_channels(groups):
    """1 < groups < C with O != C: the case older torch.nn.grad got wrong."""
    spec = ConvSpec(8, 16, 3, 1, 1, 1, groups)
    x, w, dy = _tensors(spec, (2, 8, 7, 7), groups)
    got = conv2d_weight_grouped(x, w.shape, dy, spec)
    torch.testing.assert_close(got, autograd_weight(x, w, dy, spec), atol=1e-10, rtol=0)


def test_worked_example_a_pointwise_48_to_240():
    """Worked example (a): input 1x48x8x8, weight 240x48x1x1."""
    spec = ConvSpec(48, 240, 1)
    x, w, dy = _tensors(spec, (1, 48, 8, 8), 7)
    expected = autograd_weight(x, w, dy, spec)
    torch.testing.assert_close(conv2d_weight_grouped(x, w.shape, dy, spec), expected,
                               atol=1e-10, rtol=0)
    got = core.conv2d_weight(x, w.shape, dy, algorithm="grouped")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_through_public_kernel(dtype):
    spec = ConvSpec(6, 6, 3, 2, 1, 1, 3)
    x, w, dy = _tensors(spec, (2, 6, 9, 9), 3)
    expected = autograd_weight(x, w, dy, spec)
    got = core.conv2d_weight(x.to(dtype), w.shape, dy.to(dtype), 2, 1, 1, 3,
                             algorithm="grouped")
    assert got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 3e-1}[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_transposed_weight_gradient_grouped():
    """conv_transpose2d_weight with algorithm="grouped" (input and grad_output swapped)."""
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    w = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    y = F.conv_transpose2d(x, w, None, 2, 1, 1, 2, 1)
    dy = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, w, dy)
    got = core.conv_transpose2d_weight(x, w.shape, dy, 2, 1, 1, 2, 1, algorithm="grouped")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_rejects_wrong_weight_size():
    spec = ConvSpec(4, 4, 3, groups=2)
    x, w, dy = _tensors(spec, (1, 4, 5, 5), 0)
    with pytest.raises(ValueError, match="weight_size"):
        conv2d_weight_grouped(x, (4, 4, 3, 3), dy, spec)
