"""Region-restricted convolution against a naive loop of its definition (float64)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repfuse import core
from repfuse.core import masked as region
from repfuse.core.spec import ConvSpec

F64 = torch.float64
BIG = 2**24  # float32 cannot tell BIG from BIG + 1
STRATEGIES = [None, "stacked", "boundary"]


def naive_conv2d(x, w, spec, rin, rout):
    """The definition, one tap at a time: x[n, c, ih, iw] * w[o, c, i, j] counts in
    y[n, o, oh, ow] only where region_in[n, ih, iw] == region_out[n, oh, ow]; reads
    outside the input (padding) count zero. Differentiable (autograd gives the
    gradients of the definition)."""
    n, c, h, wd = x.shape
    oh, ow = spec.output_size((h, wd))
    g, cg, og = spec.groups, spec.in_per_group, spec.out_per_group
    kh, kw = spec.kernel_size
    ids_in, ids_out = rin.tolist(), rout.tolist()  # python ints: exact comparison
    wg = w.reshape(g, og, cg, kh, kw)
    out = []
    for b in range(n):
        for p in range(oh):
            for q in range(ow):
                acc = x.new_zeros(g, og)
                for i in range(kh):
                    for j in range(kw):
                        ih, iw = spec.reads(p, q, i, j)
                        if 0 <= ih < h and 0 <= iw < wd and ids_in[b][ih][iw] == ids_out[b][p][q]:
                            xs = x[b, :, ih, iw].reshape(g, 1, cg)
                            acc = acc + (wg[:, :, :, i, j] * xs).sum(-1)
                out.append(acc.reshape(g * og))
    return torch.stack(out).reshape(n, oh, ow, g * og).permute(0, 3, 1, 2)


def naive_all(x, w, spec, rin, rout, dy):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    # The zero term keeps y in the graph when no product counts at all.
    y = naive_conv2d(x, w, spec, rin, rout) + 0 * (x.sum() + w.sum())
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), gx, gw


@st.composite
def tiny(draw, max_hw=5):
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 2))
    og = draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    spec = ConvSpec(g * cg, g * og, kernel, stride, padding, dilation, g)
    ek = spec.effective_kernel
    h = draw(st.integers(max(1, ek[0] - padding[0] - padding[1]), max_hw))
    w = draw(st.integers(max(1, ek[1] - padding[2] - padding[3]), max_hw))
    if h + padding[0] + padding[1] < ek[0] or w + padding[2] + padding[3] < ek[1]:
        h, w = h + ek[0], w + ek[1]
    n = draw(st.integers(1, 2))
    return spec, (n, spec.in_channels, h, w)


def _case(spec, shape, seed, n_ids, base=BIG):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    oh, ow = spec.output_size((h, w))
    x = torch.randn(shape, generator=gen, dtype=F64)
    wt = torch.randn(spec.torch_weight_shape, generator=gen, dtype=F64)
    dy = torch.randn((n, spec.out_channels, oh, ow), generator=gen, dtype=F64)
    rin = torch.randint(0, n_ids, (n, h, w), generator=gen) + base
    rout = torch.randint(0, n_ids, (n, oh, ow), generator=gen) + base
    return x, wt, dy, rin, rout


@contextlib.contextmanager
def forced(strategy):
    """Force one fast strategy of ``repfuse.core.masked`` (None: let it decide)."""
    saved, region._FORCE = region._FORCE, strategy
    try:
        yield
    finally:
        region._FORCE = saved


def _all(x, w, dy, spec, rin, rout, algorithm):
    return (region.conv2d(x, w, None, spec, rin, rout, algorithm),
            region.conv2d_input(x.shape, w, dy, spec, rin, rout, algorithm),
            region.conv2d_weight(x, w.shape, dy, spec, rin, rout, algorithm))


@pytest.mark.parametrize("strategy", STRATEGIES)
@given(tiny(), st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_matches_naive_definition(strategy, geom, seed, n_ids):
    spec, shape = geom
    x, w, dy, rin, rout = _case(spec, shape, seed, n_ids)
    expected = naive_all(x, w, spec, rin, rout, dy)
    algorithms = ["reference", "auto"] if strategy is None else ["auto"]
    with forced(strategy):
        for algorithm in algorithms:
            for got, exp in zip(_all(x, w, dy, spec, rin, rout, algorithm), expected):
                torch.testing.assert_close(got, exp, atol=1e-10, rtol=0)


@st.composite
def larger(draw):
    g = draw(st.sampled_from([1, 2, 4]))
    cg = draw(st.sampled_from([1, 3]))
    og = draw(st.integers(1, 3))
    k = draw(st.integers(1, 5))
    spec = ConvSpec(g * cg, g * og, (k, draw(st.integers(1, 5))),
                    (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                    tuple(draw(st.integers(0, 3)) for _ in range(4)),
                    (draw(st.integers(1, 3)), draw(st.integers(1, 3))), g)
    ek = spec.effective_kernel
    h = draw(st.integers(ek[0], ek[0] + 12))
    w = draw(st.integers(ek[1], ek[1] + 12))
    return spec, (draw(st.integers(1, 3)), spec.in_channels, h, w)


def _blob_ids(n, h, w, gen, n_ids):
    """Block-structured ids (large regions, short boundaries), as segmentation masks."""
    cuts_h = torch.randint(0, h + 1, (n, 1, 1), generator=gen)
    cuts_w = torch.randint(0, w + 1, (n, 1, 1), generator=gen)
    rows = torch.arange(h).view(1, h, 1) >= cuts_h
    cols = torch.arange(w).view(1, 1, w) >= cuts_w
    return (rows.long() + 2 * cols.long()) % n_ids + BIG


@pytest.mark.parametrize("strategy", STRATEGIES)
@given(larger(), st.integers(0, 2**31 - 1), st.integers(1, 4), st.booleans())
def test_fast_matches_reference(strategy, geom, seed, n_ids, blobs):
    spec, shape = geom
    x, w, dy, rin, rout = _case(spec, shape, seed, n_ids)
    if blobs:
        gen = torch.Generator().manual_seed(seed)
        rin = _blob_ids(shape[0], shape[2], shape[3], gen, n_ids)
        rout = rin[:, ::spec.stride[0], ::spec.stride[1]][:, :dy.shape[2], :dy.shape[3]]
        rout = F.pad(rout, (0, dy.shape[3] - rout.shape[2], 0, dy.shape[2] - rout.shape[1]),
                     value=BIG)
    expected = _all(x, w, dy, spec, rin, rout, "reference")
    with forced(strategy):
        for got, exp in zip(_all(x, w, dy, spec, rin, rout, "auto"), expected):
            torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("algorithm", ["reference", "auto"])
def test_worked_example_b_grad_input(groups, algorithm):
    """Worked example (b): 4x4 input, 2x2 filter, 3x3 output, random 0/1 ids."""
    spec = ConvSpec(2, 2, 2, groups=groups)
    gen = torch.Generator().manual_seed(11 + groups)
    x = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64)
    w = torch.randn(spec.torch_weight_shape, generator=gen, dtype=F64)
    dy = torch.randn(1, 2, 3, 3, generator=gen, dtype=F64)
    rin = torch.randint(0, 2, (1, 4, 4), generator=gen)
    rout = torch.randint(0, 2, (1, 3, 3), generator=gen)
    _, gx, _ = naive_all(x, w, spec, rin, rout, dy)
    got = core.conv2d_input(x.shape, w, dy, groups=groups, region_in=rin, region_out=rout,
                            algorithm=algorithm)
    torch.testing.assert_close(got, gx, atol=1e-12, rtol=0)
    # The restriction matters here: the unrestricted gradient differs.
    assert not torch.allclose(got, core.conv2d_input(x.shape, w, dy, groups=groups))


def test_ids_above_2_pow_24_compare_exactly():
    """2**24 and 2**24 + 1 are one float32 value; as region ids they must stay distinct."""
    spec = ConvSpec(1, 1, 3, padding=1)
    x = torch.ones(1, 1, 4, 4, dtype=F64)
    w = torch.ones(1, 1, 3, 3, dtype=F64)
    rin = torch.full((1, 4, 4), BIG, dtype=torch.long)
    rin[:, :, 2:] = BIG + 1
    rout = torch.full((1, 4, 4), BIG, dtype=torch.long)
    expected = naive_conv2d(x, w, spec, rin, rout)
    for algorithm in ("reference", "auto"):
        got = core.conv2d(x, w, None, 1, 1, region_in=rin, region_out=rout,
                          algorithm=algorithm)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert got[0, 0, 0, 3] == 0  # reads only columns 2..3, all id BIG + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_public_kernels(dtype):
    spec = ConvSpec(4, 6, 3, 1, 1, 1, 2)
    x, w, dy, rin, rout = _case(spec, (2, 4, 6, 6), 5, 2)
    exp_y, exp_gx, exp_gw = naive_all(x, w, spec, rin, rout, dy)
    kw = {"groups": 2, "padding": 1, "region_in": rin, "region_out": rout}
    tol = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}[dtype]
    y = core.conv2d(x.to(dtype), w.to(dtype), **kw)
    gx = core.conv2d_input(x.shape, w.to(dtype), dy.to(dtype), **kw)
    gw = core.conv2d_weight(x.to(dtype), w.shape, dy.to(dtype), **kw)
    for got, exp in ((y, exp_y), (gx, exp_gx), (gw, exp_gw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, atol=tol, rtol=tol)


def test_nhwc_public_kernels():
    spec = ConvSpec(4, 4, (3, 2), 2, (1, 0, 0, 1), 1, 2)
    x, w, dy, rin, rout = _case(spec, (2, 4, 7, 6), 9, 3)
    exp_y, exp_gx, exp_gw = naive_all(x, w, spec, rin, rout, dy)
    kw = {"stride": 2, "padding": (1, 0, 0, 1), "groups": 2, "layout": "NHWC",
          "region_in": rin, "region_out": rout}
    w_nhwc = w.permute(0, 2, 3, 1)
    y = core.conv2d(x.permute(0, 2, 3, 1), w_nhwc, **kw)
    gx = core.conv2d_input((2, 7, 6, 4), w_nhwc, dy.permute(0, 2, 3, 1), **kw)
    gw = core.conv2d_weight(x.permute(0, 2, 3, 1), w_nhwc.shape, dy.permute(0, 2, 3, 1), **kw)
    torch.testing.assert_close(y, exp_y.permute(0, 2, 3, 1), atol=1e-10, rtol=0)
    torch.testing.assert_close(gx, exp_gx.permute(0, 2, 3, 1), atol=1e-10, rtol=0)
    torch.testing.assert_close(gw, exp_gw.permute(0, 2, 3, 1), atol=1e-10, rtol=0)


def test_bias_added_everywhere():
    spec = ConvSpec(2, 3, 3)
    x, w, _, rin, rout = _case(spec, (1, 2, 5, 5), 1, 2)
    bias = torch.randn(3, dtype=F64)
    got = core.conv2d(x, w, bias, region_in=rin, region_out=rout)
    expected = naive_conv2d(x, w, spec, rin, rout) + bias.view(1, 3, 1, 1)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_mask_shape_mismatch_names_the_mask():
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    w = torch.randn(4, 3, 3, 3, dtype=F64)
    good_in, good_out = torch.zeros(2, 6, 6, dtype=torch.long), torch.zeros(2, 4, 4,
                                                                           dtype=torch.long)
    with pytest.raises(ValueError, match=r"region_in .*expected \[2, 6, 6\]"):
        core.conv2d(x, w, region_in=torch.zeros(2, 5, 6, dtype=torch.long),
                    region_out=good_out)
    with pytest.raises(ValueError, match=r"region_out .*expected \[2, 4, 4\]"):
        core.conv2d_input(x.shape, w, torch.zeros(2, 4, 4, 4, dtype=F64),
                          region_in=good_in, region_out=good_out[:1])
    with pytest.raises(ValueError, match="region_out"):
        core.conv2d_weight(x, w.shape, torch.zeros(2, 4, 4, 4, dtype=F64),
                           region_in=good_in, region_out=None)
    with pytest.raises(ValueError, match="region_in .*integer"):
        core.conv2d(x, w, region_in=good_in.double(), region_out=good_out)
    with pytest.raises(ValueError, match="algorithm"):
        core.conv2d(x, w, region_in=good_in, region_out=good_out, algorithm="grouped")
