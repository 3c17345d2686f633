"""Linear, Conv1d and layout nodes: reduced with the algebra (a Linear is a 1x1 conv, a
Conv1d a conv with one row), against the unfused torch layers in float64, and proven."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable
from repfuse.proofs.region import prove_region

D = torch.float64


def _rand(shape, gen, lo=-1.0, hi=1.0):
    return torch.rand(shape, generator=gen, dtype=D) * (hi - lo) + lo


def _bn(c, gen, name):
    """A BatchNorm1d's tensors as parameters / buffers, and its expression builder."""
    mean, var = _rand(c, gen), _rand(c, gen, 0.5, 2.0)
    w, b = nn.Parameter(_rand(c, gen, 0.5, 1.5)), nn.Parameter(_rand(c, gen))

    def torch_form(y):   # axis 1 is the channel axis
        return F.batch_norm(y, mean, var, w, b, False, 0.0, 1e-5)

    def expr(e):
        return rg.BatchNorm(e, mean, var, w, b, 1e-5, name)
    return torch_form, expr


@st.composite
def linear_regions(draw):
    """(torch function, expression builder, input) of a random Linear region on vectors
    or tokens: parallel BN -> Linear -> BN -> scale branches, identity / BN branches,
    averaged or summed, tokens' BNs through transposes or a flatten / reshape_as."""
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    tokens = draw(st.booleans())
    style = draw(st.sampled_from(["transpose", "flatten"]))
    cin = draw(st.integers(1, 5))
    cout = draw(st.sampled_from([cin, draw(st.integers(1, 5))]))
    parts = []
    for k in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["linear"] * 3 + (["identity", "bn"] if cin == cout else [])))
        pre = _bn(cin, gen, f"pre{k}") if draw(st.booleans()) and kind == "linear" else None
        post = _bn(cout, gen, f"post{k}") if draw(st.booleans()) or kind == "bn" else None
        weight = nn.Parameter(_rand((cout, cin), gen)) if kind == "linear" else None
        bias = nn.Parameter(_rand(cout, gen)) if kind == "linear" and draw(st.booleans()) \
            else None
        scale = nn.Parameter(_rand(cout, gen)) if draw(st.booleans()) else None
        parts.append((pre, weight, bias, post, scale, f"l{k}"))
    average = draw(st.booleans())

    def norm_t(fn, y):       # a BN1d on the channel axis of vectors or tokens
        if not tokens:
            return fn(y)
        if style == "transpose":
            return fn(y.transpose(1, 2)).transpose(1, 2)
        return fn(y.flatten(0, 1)).reshape_as(y)

    def norm_e(fn, e):
        if not tokens:
            return fn(e)
        if style == "transpose":
            return rg.Transpose(fn(rg.Transpose(e, (0, 2, 1))), (0, 2, 1))
        return rg.Unflatten(fn(rg.Flatten(e)), e)

    def torch_form(x):
        outs = []
        for pre, w, b, post, scale, _ in parts:
            y = norm_t(pre[0], x) if pre else x
            y = F.linear(y, w, b) if w is not None else y
            y = norm_t(post[0], y) if post else y
            outs.append(y * scale if scale is not None else y)
        y = sum(outs[1:], outs[0])
        return y / len(outs) if average else y

    def build(x):
        outs = []
        for pre, w, b, post, scale, name in parts:
            e = norm_e(pre[1], x) if pre else x
            e = rg.Linear(e, w, b, name) if w is not None else e
            e = norm_e(post[1], e) if post else e
            outs.append(rg.Scale(e, scale, dim=2 if tokens else 1) if scale is not None else e)
        e = rg.Add(tuple(outs)) if len(outs) > 1 else outs[0]
        return rg.Scale(e, 1.0 / len(outs)) if average else e

    shape = (3, 4, cin) if tokens else (5, cin)
    x = torch.randn(shape, generator=gen, dtype=D)
    return torch_form, build, x


@given(region=linear_regions())
def test_linear_regions_become_one_linear(region):
    torch_form, build, x = region
    expr = rg.with_input(x.shape, build)
    if not any(isinstance(n, rg.Linear) for n in rg.walk(expr)):
        return   # without a Linear a (N, 4, 1) input may be read either way, both exact
    assert rg.region_input(expr).layout == ("NLC" if x.dim() == 3 else "NC")
    fused = rg.reduce(expr)
    module = fused.to_module()
    assert isinstance(module, nn.Linear) and fused.describe() == "linear"
    with torch.no_grad():
        torch.testing.assert_close(module.double()(x), torch_form(x), rtol=1e-10, atol=1e-10)
    report = prove_region(expr, fused, x)
    assert report.ok, [c.to_dict() for c in report.failures]


@st.composite
def conv1d_branches(draw):
    c = draw(st.sampled_from([2, 4]))
    o = draw(st.sampled_from([2, 4]))
    stride = draw(st.integers(1, 3))
    branches = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(1, 5))
        d = draw(st.integers(1, 2))
        total = d * (k - 1)
        groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and o % g == 0]))
        m = nn.Conv1d(c, o, k, stride, total // 2, d, groups,
                      bias=draw(st.booleans())).double()
        branches.append((m, draw(st.booleans())))
    return c, branches, draw(st.integers(0, 2**16))


@given(case=conv1d_branches())
def test_conv1d_branches_become_one_conv1d(case):
    c, branches, seed = case
    gen = torch.Generator().manual_seed(seed)
    bns = []
    for m, with_bn in branches:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=D))
        bns.append(_bn(m.out_channels, gen, "bn") if with_bn else None)

    def build(x):
        outs = []
        for (m, _), bn in zip(branches, bns):
            spec = ConvSpec.one_row(c, m.out_channels, m.kernel_size[0], m.stride[0],
                                    m.padding[0], m.dilation[0], m.groups)
            e = rg.Conv(x, m.weight, m.bias, spec, "c")
            outs.append(bn[1](e) if bn else e)
        return rg.Add(tuple(outs))

    x = torch.randn(2, c, 11, generator=gen, dtype=D)
    expr = rg.with_input(x.shape, build)
    with torch.no_grad():
        outs = [bn[0](m(x)) if bn else m(x) for (m, _), bn in zip(branches, bns)]
    if len({o.shape for o in outs}) > 1:      # misaligned: refused, never wrong
        with pytest.raises(NotFusable):
            rg.reduce(expr)
        return
    try:
        fused = rg.reduce(expr)
    except NotFusable as err:                 # centres differ (even kernels): refused
        assert "grid" in str(err) or "offsets" in str(err), str(err)
        return
    module = fused.to_module().double()
    assert isinstance(module, (nn.Conv1d, nn.Sequential))
    with torch.no_grad():
        torch.testing.assert_close(module(x), sum(outs[1:], outs[0]), rtol=1e-10, atol=1e-10)
    assert prove_region(expr, fused, x).ok


def test_layouts_follow_the_nodes():
    w = torch.randn(6, 4, dtype=D)
    x = rg.Input(4, "NCL")
    t = rg.Transpose(x, (0, 2, 1))
    lin = rg.Linear(t, w, None)
    layouts = rg.value_layouts(lin)
    assert [layouts[id(n)] for n in (x, t, lin)] == ["NCL", "NLC", "NLC"]
    # a Linear on a channels-first value, a BN on tokens: no layout fits
    with pytest.raises(NotFusable, match="Linear does not apply to a NCL value"):
        rg.value_layouts(rg.Linear(x, w, None, "l"))
    bn = rg.BatchNorm(rg.Linear(rg.Input(4, "NLC"), w, None), torch.zeros(6), torch.ones(6),
                      None, None, 1e-5, "b")
    with pytest.raises(NotFusable, match="BatchNorm 'b': BatchNorm does not apply to a NLC"):
        rg.value_layouts(bn)
    # the input layout is inferred from what reads it
    assert rg.region_input(rg.with_input((2, 5, 4), lambda i: rg.Linear(i, w, None))).layout \
        == "NLC"


def test_scale_along_another_axis_refused_and_a_moved_channel_axis_kept():
    w = torch.randn(4, 4, dtype=D)
    x = rg.Input(4, "NLC")
    wrong = rg.Scale(rg.Linear(x, w, None), torch.ones(4, dtype=D), "s", dim=1)
    with pytest.raises(NotFusable, match="axis 1 of a NLC value"):
        rg.reduce(wrong)
    # tokens in, a sequence out: the Linear, then the transpose
    out_ncl = rg.Transpose(rg.Linear(x, w, None), (0, 2, 1))
    fused = rg.reduce(out_ncl)
    assert (fused.input_layout, fused.value_layout) == ("NLC", "NCL")
    assert fused.describe() == "linear+permute"
    tokens = torch.randn(2, 5, 4, dtype=D)
    module = fused.to_module()
    torch.testing.assert_close(module(tokens), (tokens @ w.T).transpose(1, 2))
    # a sequence in, (N * L, C) out: not a move of the channel axis
    x = rg.Input(4, "NCL")
    merged = rg.Flatten(rg.Linear(rg.Transpose(x, (0, 2, 1)), w, None))
    with pytest.raises(NotFusable, match="reads a NCL value and gives a NC one"):
        rg.reduce(merged)


def test_flatten_of_a_spatial_conv_refused():
    """Merging positions is the identity on the canonical view only for pointwise maps."""
    w = torch.randn(4, 4, 3, dtype=D)
    spec = ConvSpec.one_row(4, 4, 3, padding=1)
    x = rg.Input(4, "NLC")
    conv = rg.Transpose(rg.Conv(rg.Transpose(x, (0, 2, 1)), w, None, spec), (0, 2, 1))
    with pytest.raises(NotFusable, match="not pointwise"):
        rg.reduce(rg.Unflatten(rg.Flatten(conv), x))


def test_describe_layers():
    w = torch.randn(4, 4, 3, dtype=D)
    x = rg.Input(4, "NCL")
    conv = rg.Conv(x, w, None, ConvSpec.one_row(4, 4, 3, 2, 1, groups=2))
    assert rg.describe(rg.Add((conv, x))) == ["conv1d3/s2 g2", "identity"]
    assert rg.reduce(rg.Conv(x, w, None, ConvSpec.one_row(4, 4, 3, 1, 1))).describe() == \
        "conv1d3"


@given(seed=st.integers(0, 2**16), keepdim=st.booleans(), conv=st.booleans())
def test_pointwise_maps_before_a_global_pool_fold_into_the_head(seed, keepdim, conv):
    """BN2d (and a 1x1 conv) -> global pool -> [flatten] -> BN1d -> Linear: the mean
    commutes with the pointwise maps before it, so one Linear reads the pooled input."""
    gen = torch.Generator().manual_seed(seed)
    bn2d_t, bn2d = _bn(4, gen, "bn2d")
    bn1d_t, bn1d = _bn(6 if conv else 4, gen, "bn1d")
    c1 = nn.Conv2d(4, 6, 1).double() if conv else None
    lin = nn.Linear(6 if conv else 4, 3).double()

    def torch_form(x):
        y = bn2d_t(x)
        y = c1(y) if conv else y
        y = F.adaptive_avg_pool2d(y, 1).flatten(1) if keepdim else y.mean((2, 3))
        return lin(bn1d_t(y))

    def build(x):
        e = bn2d(x)
        if conv:
            e = rg.Conv(e, c1.weight, c1.bias, ConvSpec(4, 6, 1), "c1")
        e = rg.Flatten(rg.GlobalPool(e, True), 1) if keepdim else rg.GlobalPool(e)
        return rg.Linear(bn1d(e), lin.weight, lin.bias, "lin")

    x = torch.randn(2, 4, 5, 3, generator=gen, dtype=D)
    expr = rg.with_input(x.shape, build)
    fused = rg.reduce(expr)
    assert fused.pooled and fused.describe() == "globalpool+linear"
    with torch.no_grad():
        torch.testing.assert_close(fused.to_module().double()(x), torch_form(x),
                                   rtol=1e-10, atol=1e-10)
    assert prove_region(expr, fused, x, module=True).ok


def test_global_pool_refusals():
    w = torch.randn(4, 4, 3, 3, dtype=D)
    x = rg.Input(4)
    conv = rg.Conv(x, w, torch.zeros(4, dtype=D), ConvSpec(4, 4, 3, padding=1), "c")
    with pytest.raises(NotFusable, match="not pointwise: the mean does not commute"):
        rg.reduce(rg.Linear(rg.GlobalPool(conv), torch.randn(3, 4, dtype=D), None))
    pooled = rg.GlobalPool(x, True)
    with pytest.raises(NotFusable, match="combines a globally pooled value"):
        rg.reduce(rg.Add((rg.Conv(pooled, w[:, :, :1, :1], None, ConvSpec(4, 4, 1)), x)))
    with pytest.raises(NotFusable, match="not pooled to 1x1"):
        rg.reduce(rg.Linear(rg.Flatten(x, 1), torch.randn(3, 4, dtype=D), None))
