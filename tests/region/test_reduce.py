"""reduce() of region expressions against evaluate() and against torch modules (float64)."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable
from repfuse.region import (
    Add,
    AvgPool,
    BatchNorm,
    Concat,
    Conv,
    Input,
    Neg,
    Pad,
    Scale,
    Shift,
    Sub,
    count_params,
    describe,
    parameters,
    reduce,
)
from repfuse.region.reference import evaluate

TOL = 1e-10
D = torch.float64


def make_bn(c, gen, affine=True):
    bn = nn.BatchNorm2d(c, affine=affine).to(D)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=gen, dtype=D) * 2 - 1)
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=D) * 1.5 + 0.5)
        if affine:
            bn.weight.copy_(torch.rand(c, generator=gen, dtype=D) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=gen, dtype=D) * 2 - 1)
    return bn.eval()


def bn_node(inp, bn, name=""):
    return BatchNorm(inp, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name)


def conv_node(inp, conv, name=""):
    return Conv(inp, conv.weight, conv.bias, ConvSpec.from_module(conv), name)


def make_conv(cin, cout, k, gen, **kw):
    conv = nn.Conv2d(cin, cout, k, **kw).to(D)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=D))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=D))
    return conv


def check(expr, x, reference=None):
    fused = reduce(expr)
    want = evaluate(expr, x) if reference is None else reference
    got = fused.forward(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOL
    module = fused.replace(dtype=D).to_module()  # parameter-free regions default to float32
    assert (module(x) - want).abs().max().item() < TOL
    return fused


def test_repvgg_region_matches_modules():
    gen = torch.Generator().manual_seed(0)
    c = 8
    x = torch.randn(2, c, 9, 7, dtype=D, generator=gen)
    c3, c1 = make_conv(c, c, 3, gen, padding=1, bias=False), make_conv(c, c, 1, gen, bias=False)
    b3, b1, bi = make_bn(c, gen), make_bn(c, gen), make_bn(c, gen)
    inp = Input(c)
    expr = Add((bn_node(conv_node(inp, c3, "c3"), b3, "b3"),
                bn_node(conv_node(inp, c1, "c1"), b1, "b1"), bn_node(inp, bi, "bi")))
    fused = check(expr, x, b3(c3(x)) + b1(c1(x)) + bi(x))
    assert fused.spec.kernel_size == (3, 3) and fused.spec.groups == 1
    assert describe(expr) == ["conv3x3+bn", "conv1x1+bn", "bn"]
    assert count_params(expr) == c * c * 9 + c * c + 6 * c
    assert set(parameters(expr)) == {"c3.weight", "b3.weight", "b3.bias", "c1.weight",
                                     "b1.weight", "b1.bias", "bi.weight", "bi.bias"}


def test_reduce_is_differentiable_in_branch_parameters():
    gen = torch.Generator().manual_seed(1)
    c = 4
    c3, c1, b3 = make_conv(c, c, 3, gen, padding=1), make_conv(c, c, 1, gen), make_bn(c, gen)
    inp = Input(c)
    expr = Add((bn_node(conv_node(inp, c3), b3), conv_node(inp, c1), inp))
    fused = reduce(expr)
    x = torch.randn(1, c, 5, 5, dtype=D, generator=gen)
    gy = torch.randn(1, c, 5, 5, dtype=D, generator=gen)
    params = list(parameters(expr).values())
    g_fused = torch.autograd.grad((fused.forward(x) * gy).sum(), params)
    g_ref = torch.autograd.grad((evaluate(expr, x) * gy).sum(), params)
    for a, b in zip(g_fused, g_ref):
        assert (a - b).abs().max().item() < TOL


def test_shared_parameters_counted_once():
    gen = torch.Generator().manual_seed(2)
    conv = make_conv(4, 4, 3, gen, padding=1)
    inp = Input(4)
    expr = Add((conv_node(inp, conv, "a"), conv_node(inp, conv, "a")))
    assert count_params(expr) == 4 * 4 * 9 + 4
    x = torch.randn(1, 4, 6, 6, dtype=D, generator=gen)
    check(expr, x, 2 * conv(x))


@st.composite
def branch(draw, inp, c, gen):
    """A random linear branch on ``inp`` with stride 1 and 'same' output grid."""
    kind = draw(st.sampled_from(["conv", "conv_bn", "bn", "identity", "pool", "scale", "seq",
                                 "dbb_pad", "dilated"]))
    k = draw(st.sampled_from([1, 3, 5]))
    if kind == "identity":
        return inp
    if kind == "bn":
        return bn_node(inp, make_bn(c, gen, affine=draw(st.booleans())))
    if kind == "pool":
        return AvgPool(inp, (k, k), (1, 1), k // 2, count_include_pad=True)
    if kind == "scale":
        f = torch.randn(c, dtype=D, generator=gen) if draw(st.booleans()) else 0.7
        return Scale(Shift(inp, torch.randn(c, dtype=D, generator=gen)), f)
    groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
    if kind == "dilated":
        d = draw(st.integers(1, 2))
        conv = make_conv(c, c, 3, gen, padding=d, dilation=d, groups=groups)
        return conv_node(inp, conv)
    conv = make_conv(c, c, k, gen, padding=k // 2, groups=groups, bias=draw(st.booleans()))
    if kind == "conv":
        return conv_node(inp, conv)
    if kind == "conv_bn":
        return bn_node(conv_node(inp, conv), make_bn(c, gen))
    first = make_conv(c, c, 1, gen, groups=groups, bias=False)
    if kind == "seq":  # 1x1 (no bias) then kxk with zero padding
        return bn_node(conv_node(conv_node(inp, first), conv), make_bn(c, gen))
    # DBB: 1x1 -> BN -> pad with the BN's response to zero -> kxk without padding
    second = make_conv(c, c, k, gen, groups=groups)
    padded = Pad(bn_node(conv_node(inp, first), make_bn(c, gen)), (k // 2,) * 4,
                 zero_response=True)
    return conv_node(padded, second)


@given(data=st.data(), c=st.sampled_from([2, 4]), n=st.integers(1, 4),
       h=st.integers(3, 8), w=st.integers(3, 8), seed=st.integers(0, 2**16))
def test_random_sums_of_branches(data, c, n, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    inp = Input(c)
    branches = [data.draw(branch(inp, c, gen)) for _ in range(n)]
    op = data.draw(st.sampled_from(["add", "sub", "neg", "post_bn", "concat"]))
    if op == "sub" and n > 1:
        expr = Sub(Add(tuple(branches[:-1])), branches[-1])
    elif op == "neg":
        expr = Neg(Add(tuple(branches)))
    elif op == "post_bn":
        expr = bn_node(Add(tuple(branches)), make_bn(c, gen))
    elif op == "concat":
        expr = Concat(tuple(branches))
    else:
        expr = Add(tuple(branches))
    x = torch.randn(2, c, h, w, dtype=D, generator=gen)
    check(expr, x)
    assert len(describe(expr)) >= 1
    check_adjoint(expr, x, gen)


def check_adjoint(expr, x, gen):
    """Gradients of <fused(x), g> and <training form(x), g> w.r.t. every parameter agree:
    autograd through reduce() is the re-parameterization map's adjoint."""
    params = [t for t in parameters(expr).values() if t.requires_grad]
    if not params:
        return
    fused = reduce(expr)
    g = torch.randn(fused.forward(x).shape, dtype=D, generator=gen)
    got = torch.autograd.grad((fused.forward(x) * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((evaluate(expr, x) * g).sum(), params, allow_unused=True)
    for a, b in zip(got, want):
        assert a is not None or b is not None
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert (a - b).abs().max().item() < TOL


def test_refusals_name_the_node():
    gen = torch.Generator().manual_seed(3)
    inp = Input(4)
    # BN then a zero-padded conv: the BN shift would pass through the padding
    conv = make_conv(4, 4, 3, gen, padding=1)
    expr = conv_node(bn_node(inp, make_bn(4, gen), "pre_bn"), conv, "the_conv")
    with pytest.raises(NotFusable, match="the_conv.*bias"):
        reduce(expr)
    # misaligned branches: 3x3 without padding + identity
    expr = Add((conv_node(inp, make_conv(4, 4, 3, gen)), inp))
    with pytest.raises(NotFusable, match="output grids"):
        reduce(expr)
    # BN without running statistics
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(NotFusable, match="running statistics"):
        reduce(bn_node(inp, bn, "nostats"))
    # pad with a value that is not the branch's zero response
    expr = Pad(bn_node(inp, make_bn(4, gen)), (1, 1, 1, 1), 0.0, name="p")
    with pytest.raises(NotFusable, match="Pad 'p'"):
        reduce(expr)


@st.composite
def chain_op(draw, inp, c, gen):
    kind = draw(st.sampled_from(["conv", "conv", "bn", "pool", "scale", "shift", "pad"]))
    if kind == "conv":
        k = draw(st.integers(1, 3))
        cout = draw(st.sampled_from([2, 4]))
        g = draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and cout % g == 0]))
        conv = make_conv(c, cout, k, gen, stride=draw(st.integers(1, 2)),
                         padding=draw(st.integers(0, 1)), dilation=draw(st.integers(1, 2)),
                         groups=g, bias=draw(st.booleans()),
                         padding_mode=draw(st.sampled_from(["zeros", "zeros", "replicate"])))
        return conv_node(inp, conv), cout
    if kind == "bn":
        return bn_node(inp, make_bn(c, gen)), c
    if kind == "pool":
        k = draw(st.integers(1, 3))
        return AvgPool(inp, (k, k), (draw(st.integers(1, 2)),) * 2, draw(st.integers(0, k // 2)),
                       count_include_pad=draw(st.booleans())), c
    if kind == "scale":
        return Scale(inp, torch.randn(c, dtype=D, generator=gen)), c
    if kind == "shift":
        return Shift(inp, torch.randn(c, dtype=D, generator=gen)), c
    p = draw(st.tuples(*[st.integers(0, 1)] * 4))
    return Pad(inp, p, 0.0, zero_response=draw(st.booleans())), c


@given(data=st.data(), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_chains_exact_or_refused(data, n, seed):
    """Any chain of linear ops: reduce() equals evaluate() or raises NotFusable."""
    gen = torch.Generator().manual_seed(seed)
    c = 2
    expr = Input(c)
    for _ in range(n):
        expr, c = data.draw(chain_op(expr, c, gen))
    x = torch.randn(1, 2, 9, 8, dtype=D, generator=gen)
    try:
        want = evaluate(expr, x)
    except RuntimeError:
        return  # the chain is not defined for this input size
    try:
        fused = reduce(expr)
    except NotFusable as err:
        assert str(err)
        return
    assert max_diff_ok(fused.forward(x), want)
    check_adjoint(expr, x, gen)


def max_diff_ok(a, b):
    return a.shape == b.shape and (a - b).abs().max().item() < TOL


def test_chain_property_is_not_vacuous():
    """The chains above include fusable ones: a padded 1x1 then a pool then a conv."""
    gen = torch.Generator().manual_seed(4)
    inp = Input(2)
    expr = Pad(conv_node(inp, make_conv(2, 2, 1, gen, bias=False)), (1, 0, 1, 1))
    expr = AvgPool(expr, (3, 3), (2, 2), 1)
    expr = conv_node(Scale(expr, torch.randn(2, dtype=D, generator=gen)),
                     make_conv(2, 4, 2, gen, stride=1))
    x = torch.randn(1, 2, 9, 8, dtype=D, generator=gen)
    assert max_diff_ok(reduce(expr).forward(x), evaluate(expr, x))


def test_dtype_follows_the_weights():
    """A float32 region stays float32 even with float64 constants; the identity joins it."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    inp = Input(3)
    expr = Add((Scale(conv_node(inp, conv), torch.ones(3, dtype=D)), Scale(inp, 2.0)))
    fused = reduce(expr)
    assert fused.dtype == torch.float32 and fused.to_module().weight.dtype == torch.float32
    x = torch.randn(1, 3, 5, 5)
    assert (fused.to_module()(x) - (conv(x) + 2 * x)).abs().max().item() < 1e-5
    half = nn.Conv2d(3, 3, 1).half()
    assert reduce(Add((conv_node(inp, half), inp))).dtype == torch.float16
