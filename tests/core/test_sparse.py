"""Sparse (in_channels) weight gradient against slices of torch autograd's (float64)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repfuse import core
from repfuse.core.sparse import conv2d_weight_sparse
from repfuse.core.spec import ConvSpec

F64 = torch.float64
ALGORITHMS = ["auto", "native", "grouped", "reference"]


def autograd_weight(x, w, dy, spec):
    t, b, l, r = spec.padding
    w = w.detach().requires_grad_(True)
    y = F.conv2d(F.pad(x, (l, r, t, b)), w, None, spec.stride, 0, spec.dilation, spec.groups)
    (gw,) = torch.autograd.grad(y, w, dy)
    return gw


def expected_slice(gw, spec, sel):
    """What the sparse update returns, cut from the full weight gradient ``gw``."""
    cg, og = spec.in_per_group, spec.out_per_group
    sel = sel.tolist()
    if spec.groups == 1:
        return gw[:, sel]
    if spec.is_depthwise:
        rows = [c * og + t for c in sel for t in range(og)]
        return gw[rows]
    kh, kw = spec.kernel_size
    if not sel:
        return gw.new_zeros(og, 0, kh, kw)
    return torch.stack([gw[(c // cg) * og:(c // cg + 1) * og, c % cg] for c in sel], 1)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    g = 1 if kind == "dense" else draw(st.integers(2, 4))
    cg = 1 if kind == "depthwise" else draw(st.integers(1 if kind == "dense" else 2, 4))
    og = draw(st.integers(1, 3))
    spec = ConvSpec(g * cg, g * og, (draw(st.integers(1, 5)), draw(st.integers(1, 5))),
                    (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                    tuple(draw(st.integers(0, 3)) for _ in range(4)),
                    (draw(st.integers(1, 3)), draw(st.integers(1, 3))), g)
    ek = spec.effective_kernel
    h = draw(st.integers(ek[0], ek[0] + 6))
    w = draw(st.integers(ek[1], ek[1] + 6))
    c = spec.in_channels
    form = draw(st.sampled_from(["tensor", "slice", "mask", "list"]))
    if form == "slice":
        start = draw(st.integers(0, c))
        step = draw(st.integers(1, 3))
        in_channels = slice(start, draw(st.integers(start, c)), step)
        sel = torch.arange(c)[in_channels]
    elif form == "mask":
        in_channels = torch.tensor(draw(st.lists(st.booleans(), min_size=c, max_size=c)))
        sel = in_channels.nonzero().flatten()
    else:
        picks = draw(st.lists(st.integers(0, c - 1), max_size=c, unique=True))
        sel = torch.tensor(picks, dtype=torch.long)
        in_channels = picks if form == "list" else sel
    return spec, (draw(st.integers(1, 3)), c, h, w), in_channels, sel


def _tensors(spec, shape, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    w = torch.randn(spec.torch_weight_shape, generator=gen, dtype=dtype)
    oh, ow = spec.output_size(shape[2:])
    dy = torch.randn((shape[0], spec.out_channels, oh, ow), generator=gen, dtype=dtype)
    return x, w, dy


@given(cases(), st.integers(0, 2**31 - 1))
def test_sparse_matches_autograd_slice(case, seed):
    spec, shape, in_channels, sel = case
    x, w, dy = _tensors(spec, shape, seed)
    expected = expected_slice(autograd_weight(x, w, dy, spec), spec, sel)
    for algorithm in ALGORITHMS:
        got = core.conv2d_weight(x, w.shape, dy, spec.stride, spec.padding, spec.dilation,
                                 spec.groups, in_channels=in_channels, algorithm=algorithm)
        assert got.shape == expected.shape, algorithm
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reads_only_selected_channels(algorithm):
    """Unselected channels hold NaN: any read of them would poison the result."""
    spec = ConvSpec(8, 6, 3, 1, 1, 1, 2)
    x, w, dy = _tensors(spec, (2, 8, 6, 6), 4)
    sel = torch.tensor([5, 1, 6])
    expected = expected_slice(autograd_weight(x, w, dy, spec), spec, sel)
    poisoned = x.clone()
    keep = torch.zeros(8, dtype=torch.bool)
    keep[sel] = True
    poisoned[:, ~keep] = float("nan")
    got = conv2d_weight_sparse(poisoned, w.shape, dy, spec, sel, algorithm)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("in_channels", [slice(0, 24), torch.arange(24)])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_worked_example_a_first_24_channels(in_channels, algorithm):
    """Worked example (a): input 1x48x8x8, weight 240x48x1x1, first 24 input channels."""
    spec = ConvSpec(48, 240, 1)
    x, w, dy = _tensors(spec, (1, 48, 8, 8), 7)
    expected = autograd_weight(x, w, dy, spec)[:, :24]
    got = core.conv2d_weight(x, w.shape, dy, in_channels=in_channels, algorithm=algorithm)
    assert got.shape == (240, 24, 1, 1)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_depthwise_with_channel_multiplier():
    """Depthwise, 2 output channels per input channel: rows c*2 and c*2 + 1 of weight."""
    spec = ConvSpec(6, 12, 3, 2, 1, 1, 6)
    x, w, dy = _tensors(spec, (2, 6, 9, 9), 2)
    gw = autograd_weight(x, w, dy, spec)
    got = core.conv2d_weight(x, w.shape, dy, 2, 1, 1, 6, in_channels=torch.tensor([4, 1]))
    torch.testing.assert_close(got, gw[[8, 9, 2, 3]], atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layouts_and_dtypes(dtype):
    spec = ConvSpec(8, 4, (3, 2), 1, (1, 0, 1, 1), 1, 2)
    x, w, dy = _tensors(spec, (2, 8, 6, 5), 6)
    sel = torch.tensor([0, 7, 3])
    expected = expected_slice(autograd_weight(x, w, dy, spec), spec, sel)
    tol = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}[dtype]
    kw = {"padding": (1, 0, 1, 1), "groups": 2, "in_channels": sel}
    got = core.conv2d_weight(x.to(dtype), w.shape, dy.to(dtype), **kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    got = core.conv2d_weight(x.to(dtype).permute(0, 2, 3, 1), (4, 3, 2, 4),
                             dy.to(dtype).permute(0, 2, 3, 1), layout="NHWC", **kw)
    torch.testing.assert_close(got.double(), expected.permute(0, 2, 3, 1), atol=tol, rtol=tol)


def test_bad_in_channels_raise_value_error():
    spec = ConvSpec(4, 4, 3, padding=1)
    x, w, dy = _tensors(spec, (1, 4, 5, 5), 0)
    with pytest.raises(ValueError, match="in_channels"):
        core.conv2d_weight(x, w.shape, dy, padding=1, in_channels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="in_channels"):
        core.conv2d_weight(x, w.shape, dy, padding=1, in_channels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="in_channels"):
        core.conv2d_weight(x, w.shape, dy, padding=1, in_channels=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="weight_size"):
        conv2d_weight_sparse(x, (4, 4, 2, 2), dy, spec, [0])
