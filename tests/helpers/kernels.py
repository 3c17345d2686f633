"""Geometry strategies and reference helpers for the conv-core kernel tests."""

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import repfuse.core as core

F64 = torch.float64


@st.composite
def geometries(draw, transposed=False):
    """Random small convolution geometry: kernel 1-7 (rectangular, even), stride 1-3,
    per-side padding 0-3, dilation 1-3, groups 1/2/3/depthwise, batch 1-3, both layouts."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        g, cg, og = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == "grouped":
        g, cg, og = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:
        g, cg, og = draw(st.integers(2, 5)), 1, draw(st.integers(1, 2))
    k = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = tuple(draw(st.integers(0, 3)) for _ in range(4))
    geo = dict(groups=g, cin=g * cg, cout=g * og, kernel=k, stride=s, dilation=d, padding=pad,
               batch=draw(st.integers(1, 3)), layout=draw(st.sampled_from(["NCHW", "NHWC"])))
    if transposed:
        geo["output_padding"] = tuple(draw(st.integers(0, max(s[a], d[a]) - 1))
                                      for a in range(2))
        geo["size"] = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        return geo
    size = []
    for a, (lo, hi) in enumerate(((pad[0], pad[1]), (pad[2], pad[3]))):
        ek = d[a] * (k[a] - 1) + 1
        size.append(max(1, ek - lo - hi) + draw(st.integers(0, 2 * s[a])))
    geo["size"] = tuple(size)
    return geo


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def to_layout(t, layout):
    """NCHW tensor (or conv weight) into ``layout``."""
    return nhwc(t) if layout == "NHWC" else t


def torch_conv(x, w, b, geo):
    t, bo, l, r = geo["padding"]
    return F.conv2d(F.pad(x, (l, r, t, bo)), w, b, geo["stride"], 0, geo["dilation"],
                    geo["groups"])


def conv_case(geo, dtype=F64, seed=0):
    """Tensors (NCHW, torch weight layout) and torch autograd's results for ``geo``."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = geo["kernel"]
    x = torch.randn(geo["batch"], geo["cin"], *geo["size"], generator=gen, dtype=F64)
    w = torch.randn(geo["cout"], geo["cin"] // geo["groups"], kh, kw, generator=gen, dtype=F64)
    b = torch.randn(geo["cout"], generator=gen, dtype=F64)
    x, w, b = (v.to(dtype).to(F64).requires_grad_() for v in (x, w, b))
    y = torch_conv(x, w, b, geo)
    gy = torch.randn(y.shape, generator=gen, dtype=F64).to(dtype).to(F64)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    return dict(x=x.detach(), w=w.detach(), b=b.detach(), y=y.detach(), gy=gy, gx=gx, gw=gw)


def args(geo):
    return (geo["stride"], geo["padding"], geo["dilation"], geo["groups"])


def run_dense(c, geo, algorithm, dtype=F64):
    """The three kernels on case ``c`` in ``geo``'s layout; results back in NCHW."""
    lay = geo["layout"]
    x, w, gy = (to_layout(c[k], lay).to(dtype) for k in ("x", "w", "gy"))
    b = c["b"].to(dtype)
    y = core.conv2d(x, w, b, *args(geo), layout=lay, algorithm=algorithm)
    gx = core.conv2d_input(x.shape, w, gy, *args(geo), layout=lay, algorithm=algorithm)
    gw = core.conv2d_weight(x, w.shape, gy, *args(geo), layout=lay, algorithm=algorithm)
    for out in (y, gx, gw):
        assert out.dtype == dtype
    back = (lambda t: t.permute(0, 3, 1, 2)) if lay == "NHWC" else (lambda t: t)
    return back(y), back(gx), back(gw)
