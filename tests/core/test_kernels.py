"""Dense convolution kernels (forward, input and weight gradients) against torch autograd."""

import pytest
import torch
import torch.nn.functional as F
from helpers.kernels import F64, args, conv_case, geometries, nhwc, run_dense, to_layout, torch_conv
from hypothesis import given

import repfuse.core as core
from repfuse.core.layout import compute_dtype, make_spec
from repfuse.errors import DtypeError, GeometryError


@pytest.mark.parametrize("algorithm", ["reference", "native", "auto"])
@given(geo=geometries())
def test_dense_kernels_match_torch_float64(algorithm, geo):
    c = conv_case(geo)
    y, gx, gw = run_dense(c, geo, algorithm)
    torch.testing.assert_close(y, c["y"], atol=1e-10, rtol=0)
    torch.testing.assert_close(gx, c["gx"], atol=1e-10, rtol=0)
    torch.testing.assert_close(gw, c["gw"], atol=1e-10, rtol=0)


@given(geo=geometries())
def test_grouped_weight_gradient_matches_torch_float64(geo):
    c = conv_case(geo)
    lay = geo["layout"]
    gw = core.conv2d_weight(to_layout(c["x"], lay), to_layout(c["w"], lay).shape,
                            to_layout(c["gy"], lay), *args(geo), layout=lay,
                            algorithm="grouped")
    torch.testing.assert_close(gw, to_layout(c["gw"], lay), atol=1e-10, rtol=0)


def _abs_bound(c, geo):
    """Sums of |products| for each result: the scale rounding errors are relative to."""
    ax, aw, agy = c["x"].abs(), c["w"].abs(), c["gy"].abs()
    y = torch_conv(ax.requires_grad_(), aw.requires_grad_(), c["b"].abs(), geo)
    gx, gw = torch.autograd.grad(y, (ax, aw), agy)
    return y.detach(), gx, gw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["reference", "native"])
@given(geo=geometries())
def test_dense_kernels_low_precision(dtype, algorithm, geo):
    """Inputs rounded to ``dtype``; results within a few units of ``dtype``'s precision of
    the float64 results on the same values (half types accumulate in float32)."""
    c = conv_case(geo, dtype)
    eps = torch.finfo(dtype).eps
    scale = 16 if dtype == torch.float32 else 2
    for got, want, bound in zip(run_dense(c, geo, algorithm, dtype),
                                (c["y"], c["gx"], c["gw"]), _abs_bound(c, geo)):
        err = (got.to(F64) - want).abs()
        # half the spacing of subnormals covers results below the smallest normal number
        tiny = torch.finfo(dtype).tiny * eps
        assert bool((err <= scale * eps * bound + tiny).all()), float(err.max())


def test_nhwc_native_output_needs_no_copy():
    x = torch.randn(2, 9, 9, 8)
    w = torch.randn(16, 3, 3, 8)
    y = core.conv2d(x, w, None, 1, 1, layout="NHWC")
    assert y.shape == (2, 9, 9, 16) and y.is_contiguous()
    gx = core.conv2d_input(x.shape, w, y, 1, 1, layout="NHWC")
    assert gx.shape == x.shape and gx.is_contiguous()
    gw = core.conv2d_weight(x, w.shape, y, 1, 1, layout="NHWC")
    assert gw.shape == w.shape and gw.is_contiguous()


# ------------------------------------------------------------------ errors
def _x():
    return torch.randn(1, 4, 5, 5, dtype=F64)


@pytest.mark.parametrize("call, match", [
    (lambda: core.conv2d(_x(), torch.randn(2, 4, 7, 7, dtype=F64)), "empty output"),
    (lambda: core.conv2d(_x(), torch.randn(3, 2, 3, 3, dtype=F64), groups=3), "groups=3"),
    (lambda: core.conv2d(_x(), torch.randn(3, 3, 3, 3, dtype=F64)), "input .*weight"),
    (lambda: core.conv2d(_x(), torch.randn(3, 4, 3, 3, dtype=F64), torch.zeros(2, dtype=F64)),
     "bias"),
    (lambda: core.conv2d_weight(_x(), (3, 4, 3), torch.randn(1, 3, 3, 3, dtype=F64)),
     "weight_size"),
    (lambda: core.conv2d_weight(_x(), (3, 2, 3, 3), torch.randn(1, 3, 3, 3, dtype=F64)),
     "weight_size"),
    (lambda: core.conv2d_weight(_x(), (3, 4, 3, 3), torch.randn(1, 3, 4, 3, dtype=F64)),
     "grad_output"),
    (lambda: core.conv2d_input((1, 4, 5, 5), torch.randn(3, 4, 3, 3, dtype=F64),
                               torch.randn(1, 2, 3, 3, dtype=F64)), "grad_output"),
    (lambda: core.conv2d_input((1, 4, 5), torch.randn(3, 4, 3, 3, dtype=F64),
                               torch.randn(1, 3, 3, 3, dtype=F64)), "input_size"),
    (lambda: core.conv2d(_x(), torch.randn(3, 4, 3, 3, dtype=F64), layout="NCWH"), "layout"),
    (lambda: core.conv2d(_x(), torch.randn(3, 4, 3, 3, dtype=F64), padding=(1, 2, 3)),
     "padding"),
    (lambda: core.conv2d(_x(), torch.randn(3, 4, 3, 3, dtype=F64), stride=0), "stride"),
])
def test_impossible_geometry_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, GeometryError)
    assert "\n" not in str(info.value)


def test_algorithm_errors_name_the_choices():
    x, w = _x(), torch.randn(3, 4, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match="'grouped' does not apply to conv2d.*'reference'"):
        core.conv2d(x, w, algorithm="grouped")
    with pytest.raises(ValueError, match="'grouped' does not apply to conv2d_input"):
        core.conv2d_input(x.shape, w, torch.randn(1, 3, 3, 3, dtype=F64), algorithm="grouped")
    with pytest.raises(ValueError, match="'fast' is unknown"):
        core.conv2d_weight(x, w.shape, torch.randn(1, 3, 3, 3, dtype=F64), algorithm="fast")


def test_dtype_errors():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64") as info:
        core.conv2d(x, torch.randn(3, 4, 3, 3, dtype=F64))
    assert isinstance(info.value, DtypeError)
    with pytest.raises(TypeError, match="torch.int64"):
        core.conv2d(x.long(), torch.ones(3, 4, 3, 3, dtype=torch.long))
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float64) == F64


def test_make_spec_padding_forms_agree():
    same = make_spec((3, 4, 3, 5), padding="same", input_shape=(1, 4, 6, 6))
    assert same.padding == (1, 1, 2, 2)
    assert make_spec((3, 4, 3, 3), padding="valid").padding == (0, 0, 0, 0)
    assert make_spec((3, 4, 3, 3), padding=[1, 2]).padding == (1, 1, 2, 2)
    x, w = _x(), torch.randn(3, 4, 3, 5, dtype=F64)
    torch.testing.assert_close(core.conv2d(x, w, padding="same"),
                               F.conv2d(x, w, padding="same"), atol=1e-12, rtol=0)


@pytest.mark.parametrize("algorithm", ["reference", "native"])
def test_strided_views_are_read_by_their_strides(algorithm):
    """NHWC inputs given as permuted (non-contiguous) views, and sliced NCHW inputs."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 6, 9, 11, generator=gen, dtype=F64)
    w = torch.randn(4, 3, 3, 2, generator=gen, dtype=F64)
    x = base[:, ::2, 1:, ::2]
    want = F.conv2d(x, w, None, 2, 1)
    got = core.conv2d(x, w, None, 2, 1, algorithm=algorithm)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    got = core.conv2d(x.permute(0, 2, 3, 1), w.permute(0, 2, 3, 1), None, 2, 1, layout="NHWC",
                      algorithm=algorithm)
    torch.testing.assert_close(got, nhwc(want), atol=1e-12, rtol=0)


def _routes(monkeypatch):
    """Counts of calls to the reference kernels behind ``algorithm="auto"``."""
    from repfuse.core import reference

    calls = []
    for name in ("conv2d", "conv2d_input", "conv2d_weight"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@pytest.mark.parametrize("groups,multiplier,size,dtype,routed", [
    (16, 1, 6, torch.float64, True),      # depthwise on a probe-sized grid: reference
    (16, 2, 6, torch.float64, True),      # with a channel multiplier
    (16, 1, 80, torch.float64, False),    # 2 x 40 x 41 output positions: aten
    (4, 1, 6, torch.float64, False),      # four input channels per group: aten
    (16, 1, 6, torch.float32, False),     # float32 has aten's grouped kernels
])
def test_auto_computes_small_float64_depthwise_with_the_reference(
        monkeypatch, groups, multiplier, size, dtype, routed):
    calls = _routes(monkeypatch)
    x = torch.randn(2, 16, size, size + 1, dtype=dtype)
    w = torch.randn(16 * multiplier, 16 // groups, 3, 3, dtype=dtype)
    b = torch.randn(16 * multiplier, dtype=dtype)
    y = core.conv2d(x, w, b, 2, 1, 1, groups)
    gy = torch.randn_like(y)
    gx = core.conv2d_input(x.shape, w, gy, 2, 1, 1, groups)
    gw = core.conv2d_weight(x, w.shape, gy, 2, 1, 1, groups)
    assert calls == (["conv2d", "conv2d_input", "conv2d_weight"] if routed else [])
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.conv2d(xl, wl, b, 2, 1, 1, groups)
    want_gx, want_gw = torch.autograd.grad(want, (xl, wl), gy)
    tol = dict(atol=1e-10, rtol=0) if dtype == torch.float64 else {}
    torch.testing.assert_close(y, want.detach(), **tol)
    torch.testing.assert_close(gx, want_gx, **tol)
    torch.testing.assert_close(gw, want_gw, **tol)
