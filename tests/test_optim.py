"""Gradient re-parameterization: SGD / momentum SGD steps on the training form, then fusion,
equal fusion, then the same steps on the fused conv with multiplied gradients (float64)."""

import pytest
import torch
from torch import nn

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable
from repfuse.optim import apply_multipliers, gradient_multipliers, trainable_tensors
from repfuse.region import reference as region_eval

F64 = torch.float64


class Maker:
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.convs, self.bns = [], []

    def rand(self, *shape, lo=-1.0, hi=1.0):
        return torch.rand(*shape, generator=self.gen, dtype=F64) * (hi - lo) + lo

    def conv(self, inp, cin, cout, k, padding=0, groups=1, bias=False, stride=1):
        m = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=bias).to(F64)
        with torch.no_grad():
            m.weight.copy_(self.rand(*m.weight.shape))
            if bias:
                m.bias.copy_(self.rand(cout))
        self.convs.append(m)
        return rg.Conv(inp, m.weight, m.bias, ConvSpec.from_module(m), f"conv{len(self.convs)}")

    def bn(self, inp, c):
        m = nn.BatchNorm2d(c).to(F64).eval()
        with torch.no_grad():
            m.running_mean.copy_(self.rand(c))
            m.running_var.copy_(self.rand(c, lo=0.5, hi=2.0))
            m.weight.copy_(self.rand(c, lo=0.5, hi=1.5))
            m.bias.copy_(self.rand(c))
        m.requires_grad_(False)     # frozen BN: a constant scale and shift
        self.bns.append(m)
        return rg.BatchNorm(inp, m.running_mean, m.running_var, m.weight, m.bias, m.eps,
                            f"bn{len(self.bns)}")


def repvgg(seed=0, c=4, bias=False, stride=1):
    m = Maker(seed)
    x = rg.Input(c)
    branches = [m.bn(m.conv(x, c, c, 3, 1, stride=stride), c),
                m.bn(m.conv(x, c, c, 1, bias=bias, stride=stride), c)]
    if stride == 1:
        branches.append(m.bn(x, c))
    return rg.Add(tuple(branches)), m


def mobileone_dw(seed=1, c=5, k=3):
    m = Maker(seed)
    x = rg.Input(c)
    branches = [m.bn(m.conv(x, c, c, 3, 1, groups=c), c) for _ in range(k)]
    branches += [m.bn(m.conv(x, c, c, 1, groups=c), c), m.bn(x, c)]
    return rg.Add(tuple(branches)), m


def mobileone_pw(seed=2, c=4, o=6, k=3):
    m = Maker(seed)
    x = rg.Input(c)
    return rg.Add(tuple(m.bn(m.conv(x, c, o, 1), o) for _ in range(k))), m


def scaled(seed=3, c=4):
    """x + 0.3 * (BN(dwconv3x3(x)) - BN(x)) + conv1x1 with bias (no BN)."""
    m = Maker(seed)
    x = rg.Input(c)
    diff = rg.Sub(m.bn(m.conv(x, c, c, 3, 1, groups=c), c), m.bn(x, c))
    return rg.Add((x, rg.Scale(diff, 0.3), m.conv(x, c, c, 1, bias=True))), m


BUILDERS = {"repvgg": repvgg, "repvgg_bias": lambda: repvgg(5, bias=True),
            "repvgg_s2": lambda: repvgg(6, stride=2), "mobileone_dw": mobileone_dw,
            "mobileone_pw": mobileone_pw, "scaled": scaled}

OPTIMIZERS = {
    "sgd": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.03, momentum=0.8, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.7, dampening=0.3),
}


def _data(c, steps, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 7, 6, generator=g, dtype=F64) for _ in range(steps)]


def _loss(y, step):
    t = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape) * (step + 1)
    return ((torch.tanh(y) - t) ** 2).sum()


def _train_training_form(build, opt_kw, steps, weight_decay=0.0):
    expr, m = build()
    params = [c.weight for c in m.convs] + [c.bias for c in m.convs if c.bias is not None]
    opt = torch.optim.SGD(params, weight_decay=weight_decay, **opt_kw)
    for step, x in enumerate(_data(_in_channels(expr), steps)):
        opt.zero_grad()
        _loss(region_eval.evaluate(expr, x), step).backward()
        opt.step()
    return rg.reduce(expr)


def _in_channels(expr):
    from repfuse.region.tree import input_channels

    return input_channels(expr)


def _train_fused(build, opt_kw, steps, weight_decay=0.0, multiply=True):
    expr, _ = build()
    fused = rg.reduce(expr)
    conv = fused.to_module()
    assert next(conv.parameters()).dtype == F64
    if multiply:
        apply_multipliers(conv, gradient_multipliers(expr), weight_decay=weight_decay)
    opt = torch.optim.SGD(conv.parameters(), **opt_kw)
    for step, x in enumerate(_data(_in_channels(expr), steps)):
        opt.zero_grad()
        _loss(conv(x), step).backward()
        opt.step()
    return conv[-1] if isinstance(conv, nn.Sequential) else conv


def _assert_same(conv, fused):
    for got, want in ((conv.weight, fused.weight), (conv.bias, fused.bias)):
        err = float((got.detach() - want.detach()).abs().max())
        assert err <= 1e-10 * max(1.0, float(want.detach().abs().max())), err


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_step_commutes_with_fusion(name, opt):
    build, kw = BUILDERS[name], OPTIMIZERS[opt]
    for steps in (1, 3):
        _assert_same(_train_fused(build, kw, steps), _train_training_form(build, kw, steps))


@pytest.mark.parametrize("name", ["repvgg", "repvgg_bias", "scaled"])
def test_weight_decay_maps_to_decay_towards_the_offset(name):
    build, kw = BUILDERS[name], OPTIMIZERS["momentum"]
    want = _train_training_form(build, kw, 3, weight_decay=0.05)
    _assert_same(_train_fused(build, kw, 3, weight_decay=0.05), want)


def test_without_multipliers_steps_differ():
    """The commutation test can fail: plain SGD on the fused conv is not the same step."""
    build, kw = BUILDERS["repvgg"], OPTIMIZERS["sgd"]
    want = _train_training_form(build, kw, 1)
    got = _train_fused(build, kw, 1, multiply=False)
    assert float((got.weight.detach() - want.weight.detach()).abs().max()) > 1e-4


def _bn_scale(bn):
    return bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


def test_repvgg_multipliers_match_the_formula():
    """M = s3^2 everywhere, + s1^2 at the centre tap; c = the identity branch's kernel."""
    expr, m = repvgg(bias=True)
    mult = gradient_multipliers(expr)
    s3, s1, sid = (_bn_scale(b) for b in m.bns)
    want = (s3**2)[:, None, None, None].expand(4, 4, 3, 3).clone()
    want[:, :, 1, 1] += (s1**2)[:, None]
    torch.testing.assert_close(mult.weight, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(mult.bias, s1**2, atol=1e-12, rtol=0)
    ident = torch.zeros(4, 4, 3, 3, dtype=F64)
    ident[range(4), range(4), 1, 1] = sid
    torch.testing.assert_close(mult.weight_offset, ident, atol=1e-12, rtol=0)


def test_mobileone_dw_multipliers_match_the_formula():
    expr, m = mobileone_dw(k=2)
    mult = gradient_multipliers(expr)
    s = [_bn_scale(b) for b in m.bns]
    want = (s[0] ** 2 + s[1] ** 2)[:, None, None, None].expand(5, 1, 3, 3).clone()
    want[:, 0, 1, 1] += s[2] ** 2
    torch.testing.assert_close(mult.weight, want, atol=1e-12, rtol=0)
    assert float(mult.bias.abs().max()) == 0.0     # BN shifts are constants


def test_acnet_corners_are_frozen():
    m = Maker(4)
    x = rg.Input(3)
    expr = rg.Add((m.bn(m.conv(x, 3, 3, (1, 3), (0, 1)), 3),
                   m.bn(m.conv(x, 3, 3, (3, 1), (1, 0)), 3)))
    mult = gradient_multipliers(expr)
    assert float(mult.weight[:, :, 0, 0].abs().max()) == 0.0
    assert float(mult.weight[:, :, 1, 1].min()) > 0


def test_not_diagonal_or_bilinear_regions_refused():
    m = Maker(7)
    x = rg.Input(3)
    seq = rg.Add((m.conv(x, 3, 3, 3, 1), m.conv(m.conv(x, 3, 3, 1), 3, 3, 3, 1)))
    with pytest.raises(NotFusable, match="bilinear"):
        gradient_multipliers(seq)
    pooled = rg.Add((m.conv(x, 3, 3, 3, 1), rg.AvgPool(m.conv(x, 3, 3, 1), (3, 3), (1, 1), 1)))
    with pytest.raises(NotFusable, match="not diagonal"):
        gradient_multipliers(pooled)
    with pytest.raises(NotFusable, match="nothing"):
        gradient_multipliers(m.bn(x, 3))


def test_trainable_tensors_and_hook_validation():
    expr, m = repvgg(bias=True)
    got = {id(t) for t in trainable_tensors(expr)}
    assert got == {id(m.convs[0].weight), id(m.convs[1].weight), id(m.convs[1].bias)}
    with pytest.raises(ValueError, match="shape"):
        apply_multipliers(nn.Conv2d(4, 4, 1), gradient_multipliers(expr))
