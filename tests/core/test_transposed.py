"""Transposed-convolution kernels (forward, input and weight gradients) against torch
autograd, including the NHWC weight layout (O, KH, KW, I/groups)."""

import pytest
import torch
import torch.nn.functional as F
from helpers.kernels import F64, geometries, nhwc
from hypothesis import given
from hypothesis import strategies as st

import repfuse.core as core
from repfuse.errors import GeometryError

ALGORITHMS = ["reference", "native", "auto"]


def nhwc_weight(w_t, groups):
    """torch's transposed weight (I, O/g, KH, KW) in the im2row + GEMM layout
    (O, KH, KW, I/g): reshape (g, I/g, O/g, KH, KW) -> permute (0, 2, 3, 4, 1)."""
    i, opg, kh, kw = w_t.shape
    return (w_t.reshape(groups, i // groups, opg, kh, kw).permute(0, 2, 3, 4, 1)
            .reshape(groups * opg, kh, kw, i // groups).contiguous())


def torch_deconv(x, w, b, geo):
    """Transposed convolution with per-side padding: the unpadded result, cropped."""
    t, bo, l, r = geo["padding"]
    y = F.conv_transpose2d(x, w, b, geo["stride"], 0, geo["output_padding"], geo["groups"],
                           geo["dilation"])
    return y[:, :, t:max(0, y.shape[2] - bo), l:max(0, y.shape[3] - r)]


def deconv_args(geo):
    return (geo["stride"], geo["padding"], geo["output_padding"], geo["groups"],
            geo["dilation"])


def deconv_case(geo, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = geo["kernel"]
    x = torch.randn(geo["batch"], geo["cin"], *geo["size"], generator=gen, dtype=F64)
    w = torch.randn(geo["cin"], geo["cout"] // geo["groups"], kh, kw, generator=gen, dtype=F64)
    b = torch.randn(geo["cout"], generator=gen, dtype=F64)
    x.requires_grad_(), w.requires_grad_()
    y = torch_deconv(x, w, b, geo)
    if min(y.shape[2:]) < 1:
        return None
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    return dict(x=x.detach(), w=w.detach(), b=b, y=y.detach(), gy=gy, gx=gx, gw=gw)


def in_layout(c, geo):
    """(x, w, gy) and the expected (y, gx, gw) in ``geo``'s layout."""
    if geo["layout"] == "NCHW":
        return (c["x"], c["w"], c["gy"]), (c["y"], c["gx"], c["gw"])
    g = geo["groups"]
    return ((nhwc(c["x"]), nhwc_weight(c["w"], g), nhwc(c["gy"])),
            (nhwc(c["y"]), nhwc(c["gx"]), nhwc_weight(c["gw"], g)))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(geo=geometries(transposed=True))
def test_transposed_kernels_match_torch_float64(algorithm, geo):
    c = deconv_case(geo)
    lay = geo["layout"]
    if c is None:
        x = torch.zeros(geo["batch"], geo["cin"], *geo["size"], dtype=F64)
        w = torch.zeros(geo["cin"], geo["cout"] // geo["groups"], *geo["kernel"], dtype=F64)
        with pytest.raises(GeometryError, match="empty output"):
            core.conv_transpose2d(x, w, None, *deconv_args(geo), algorithm=algorithm)
        return
    (x, w, gy), (y, gx, gw) = in_layout(c, geo)
    a = deconv_args(geo)
    torch.testing.assert_close(
        core.conv_transpose2d(x, w, c["b"], *a, layout=lay, algorithm=algorithm),
        y, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        core.conv_transpose2d_input(x.shape, w, gy, *a, layout=lay, algorithm=algorithm),
        gx, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        core.conv_transpose2d_weight(x, w.shape, gy, *a, layout=lay, algorithm=algorithm),
        gw, atol=1e-10, rtol=0)


@given(geo=geometries(transposed=True))
def test_transposed_grouped_weight_gradient_float64(geo):
    c = deconv_case(geo)
    if c is None:
        return
    (x, w, gy), (_, _, gw) = in_layout(c, geo)
    got = core.conv_transpose2d_weight(x, w.shape, gy, *deconv_args(geo), layout=geo["layout"],
                                       algorithm="grouped")
    torch.testing.assert_close(got, gw, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2),
                                        (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_transposed_low_precision(dtype, tol, layout):
    geo = dict(groups=2, cin=4, cout=6, kernel=(3, 4), stride=(2, 2), dilation=(1, 2),
               padding=(1, 0, 2, 1), output_padding=(1, 0), batch=2, size=(5, 4), layout=layout)
    c = deconv_case(geo)
    # inputs rounded to dtype; the float64 expectation is computed on the rounded values
    x, w, b, gy = (c[k].to(dtype).to(F64) for k in ("x", "w", "b", "gy"))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y64 = torch_deconv(xg, wg, b, geo)
    gx64, gw64 = torch.autograd.grad(y64, (xg, wg), gy)
    (xl, wl, gyl), (yl, gxl, gwl) = in_layout(
        dict(x=x, w=w, gy=gy, y=y64.detach(), gx=gx64, gw=gw64), geo)
    a = deconv_args(geo)
    for algorithm in ALGORITHMS:
        y = core.conv_transpose2d(xl.to(dtype), wl.to(dtype), b.to(dtype), *a,
                                  layout=layout, algorithm=algorithm)
        gx = core.conv_transpose2d_input(xl.shape, wl.to(dtype), gyl.to(dtype), *a,
                                         layout=layout, algorithm=algorithm)
        gw = core.conv_transpose2d_weight(xl.to(dtype), wl.shape, gyl.to(dtype), *a,
                                          layout=layout, algorithm=algorithm)
        for got, want in ((y, yl), (gx, gxl), (gw, gwl)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.to(F64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("algorithm", ["reference", "native"])
@given(geo=geometries(transposed=True),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_transposed_kernels_low_precision_geometry(algorithm, geo, dtype):
    """Inputs rounded to ``dtype``: results within a few units of ``dtype``'s precision
    (relative to the sums of |products|) of float64 on the same values."""
    c = deconv_case(geo)
    if c is None:
        return
    x, w, b, gy = (c[k].to(dtype).to(F64) for k in ("x", "w", "b", "gy"))
    results = []
    for vals in ((x, w, b, gy), (x.abs(), w.abs(), b.abs(), gy.abs())):
        xg, wg = vals[0].clone().requires_grad_(), vals[1].clone().requires_grad_()
        y = torch_deconv(xg, wg, vals[2], geo)
        results.append((y.detach(), *torch.autograd.grad(y, (xg, wg), vals[3])))
    (xl, wl, gyl), want = in_layout(dict(x=x, w=w, gy=gy, y=results[0][0], gx=results[0][1],
                                         gw=results[0][2]), geo)
    _, bound = in_layout(dict(x=x, w=w, gy=gy, y=results[1][0], gx=results[1][1],
                              gw=results[1][2]), geo)
    a, lay = deconv_args(geo), geo["layout"]
    got = (core.conv_transpose2d(xl.to(dtype), wl.to(dtype), b.to(dtype), *a, layout=lay,
                                 algorithm=algorithm),
           core.conv_transpose2d_input(xl.shape, wl.to(dtype), gyl.to(dtype), *a, layout=lay,
                                       algorithm=algorithm),
           core.conv_transpose2d_weight(xl.to(dtype), wl.shape, gyl.to(dtype), *a, layout=lay,
                                        algorithm=algorithm))
    eps = torch.finfo(dtype).eps
    scale = 16 if dtype == torch.float32 else 2
    for g_, want_, bound_ in zip(got, want, bound):
        assert g_.dtype == dtype
        err = (g_.to(F64) - want_).abs()
        assert bool((err <= scale * eps * bound_ + torch.finfo(dtype).tiny * eps).all())


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1)])
@pytest.mark.parametrize("algorithm", ["reference", "native", "auto", "grouped"])
def test_example_c_transposed_grad_filter_nhwc(groups, stride, padding, algorithm):
    """Worked example (c): deconvolution grad filter, batch 16, NHWC 4x4x4 input, 4x4
    kernel, weight in the (O, KH, KW, I/groups) layout."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(4, 8 // groups, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    y = F.conv_transpose2d(x, w, None, stride, padding, 0, groups)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    (gw,) = torch.autograd.grad(y, (w,), gy)
    weight_size = (8, 4, 4, 4 // groups)
    got = core.conv_transpose2d_weight(nhwc(x.detach()), weight_size, nhwc(gy), stride, padding,
                                       0, groups, 1, layout="NHWC", algorithm=algorithm)
    assert got.shape == weight_size
    torch.testing.assert_close(got, nhwc_weight(gw, groups), atol=1e-10, rtol=0)


def test_transposed_errors_name_the_argument():
    x = torch.zeros(1, 4, 3, 3, dtype=F64)
    w = torch.zeros(4, 2, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match="output_padding"):
        core.conv_transpose2d(x, w, None, 1, 0, 1)
    with pytest.raises(ValueError, match="grad_output"):
        core.conv_transpose2d_weight(x, w.shape, torch.zeros(1, 2, 4, 4, dtype=F64))
    with pytest.raises(ValueError, match="weight_size"):
        core.conv_transpose2d_weight(x, (3, 2, 3, 3), torch.zeros(1, 2, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="input_size"):
        core.conv_transpose2d_input((1, 3, 3, 3), w, torch.zeros(1, 2, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="'grouped' does not apply"):
        core.conv_transpose2d(x, w, algorithm="grouped")
