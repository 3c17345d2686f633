"""Per-region proofs of ConvTranspose2d, Linear and Conv1d regions: correct fusions pass,
planted faults are caught, and the fused side runs on the core's transposed kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repfuse import core
from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.proofs.region import prove_region

D = torch.float64


def _bn(c, gen, name, cls=nn.BatchNorm2d):
    m = cls(c).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, generator=gen))
        m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(c, generator=gen))
    return m


def _bn_node(x, m, name):
    return rg.BatchNorm(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, name)


def rep_deconv(seed=0):
    """4x4/s2 p1 (groups 2) + BN and 2x2/s2 + BN, summed."""
    gen = torch.Generator().manual_seed(seed)
    big = nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2, bias=False)
    small = nn.ConvTranspose2d(4, 6, 2, 2, output_padding=0)
    b1, b2 = _bn(6, gen, "b1"), _bn(6, gen, "b2")
    x = rg.Input(4)
    return rg.Add((
        _bn_node(rg.ConvTranspose(x, big.weight, None, ConvSpec.from_module(big), "big"), b1,
                 "b1"),
        _bn_node(rg.ConvTranspose(x, small.weight, small.bias, ConvSpec.from_module(small),
                                  "small"), b2, "b2")))


def token_linear(seed=0):
    """Tokens: BatchNorm1d through transposes, Linear, layer scale (C != L)."""
    gen = torch.Generator().manual_seed(seed)
    lin, bn = nn.Linear(6, 5), _bn(6, gen, "bn", nn.BatchNorm1d)
    gamma = nn.Parameter(torch.rand(5, generator=gen) + 0.5)

    def build(x):
        y = rg.Transpose(_bn_node(rg.Transpose(x, (0, 2, 1)), bn, "bn"), (0, 2, 1))
        return rg.Scale(rg.Linear(y, lin.weight, lin.bias, "lin"), gamma, "gamma", dim=2)
    return rg.with_input((2, 7, 6), build)


def conv1d(seed=0):
    gen = torch.Generator().manual_seed(seed)
    c3, c1 = nn.Conv1d(4, 4, 3, 2, 1, bias=False), nn.Conv1d(4, 4, 1, 2)
    bn = _bn(4, gen, "bn", nn.BatchNorm1d)

    def build(x):
        spec3 = ConvSpec.one_row(4, 4, 3, 2, 1)
        spec1 = ConvSpec.one_row(4, 4, 1, 2, 0)
        return rg.Add((_bn_node(rg.Conv(x, c3.weight, None, spec3, "c3"), bn, "bn"),
                       rg.Conv(x, c1.weight, c1.bias, spec1, "c1")))
    return rg.with_input((2, 4, 9), build)


def ffn_tail(seed=0):
    """UniRepLKNet's FFN tail: Linear on (N, H, W, C), permute to NCHW, BN, layer scale."""
    gen = torch.Generator().manual_seed(seed)
    lin, bn = nn.Linear(7, 5, bias=False), _bn(5, gen, "bn")
    gamma = nn.Parameter(torch.rand(5, generator=gen) + 0.5)

    def build(x):
        y = _bn_node(rg.Transpose(rg.Linear(x, lin.weight, None, "lin"), (0, 3, 1, 2)), bn,
                     "bn")
        return rg.Scale(y, gamma, "gamma")
    return rg.with_input((2, 3, 4, 7), build)


def bn_permute_linear(seed=0):
    """The mirror: BN on NCHW, permute to NHWC, Linear."""
    gen = torch.Generator().manual_seed(seed)
    bn, lin = _bn(6, gen, "bn"), nn.Linear(6, 4)
    return rg.with_input((2, 6, 3, 4), lambda x: rg.Linear(
        rg.Transpose(_bn_node(x, bn, "bn"), (0, 2, 3, 1)), lin.weight, lin.bias, "lin"))


def conv_bn_to_channels_last(seed=0):
    """A 3x3 conv and BN, then permute to NHWC: a conv, then the permute."""
    gen = torch.Generator().manual_seed(seed)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), _bn(5, gen, "bn")
    return rg.with_input((2, 3, 5, 6), lambda x: rg.Transpose(_bn_node(
        rg.Conv(x, conv.weight, None, ConvSpec.from_module(conv), "conv"), bn, "bn"),
        (0, 2, 3, 1)))


ZOO = {"rep_deconv": rep_deconv, "token_linear": token_linear, "conv1d": conv1d,
       "ffn_tail": ffn_tail, "bn_permute_linear": bn_permute_linear,
       "conv_bn_to_channels_last": conv_bn_to_channels_last}


def _failed(report):
    return {c.name for c in report.failures}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_correct_fusions_prove(name):
    expr = ZOO[name]()
    fused = rg.reduce(expr)
    report = prove_region(expr, fused, module=True)
    assert report.ok, [c.to_dict() for c in report.failures]
    assert any(c.name.startswith("grad ") and c.name != "grad input" for c in report.checks)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_perturbed_weight_and_dropped_bias_caught(name):
    expr = ZOO[name]()
    fused = rg.reduce(expr)
    w = fused.weight.detach()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    failed = _failed(prove_region(expr, fused.replace(weight=w * (1 + 1e-3 * noise))))
    assert {"output[random]", "grad input"} <= failed
    failed = _failed(prove_region(expr, fused.replace(bias=torch.zeros_like(fused.bias))))
    assert "output[random]" in failed and "grad input" not in failed


def test_wrong_transposed_geometry_caught():
    expr = rep_deconv()
    fused = rg.reduce(expr)
    spec = fused.spec
    for bad in (spec.replace(output_padding=(1, 1)), spec.replace(padding=(0, 1, 1, 1)),
                spec.replace(padding=(2, 2, 2, 2), dilation=2)):
        assert "output[random]" in _failed(prove_region(expr, fused.replace(spec=bad)))
    # the same weight read as a forward conv's (O, I/g) layout
    w = fused.weight.detach().transpose(0, 1).contiguous()
    forward = spec.replace(transposed=False, in_channels=spec.in_channels)
    wrong = fused.replace(weight=w.reshape(forward.weight_shape), spec=forward)
    assert not prove_region(expr, wrong).ok


def test_swapped_output_channels_of_a_deconv_caught():
    expr = rep_deconv()
    fused = rg.reduce(expr)
    assert fused.spec.groups == 1
    perm = torch.tensor([1, 0, 2, 3, 4, 5])   # the (I, O) weight's output channels
    rep = prove_region(expr, fused.replace(weight=fused.weight.detach()[:, perm]))
    assert {"output[random]", "grad input"} <= _failed(rep)


def test_merged_tokens_read_unmerged_caught():
    """A Linear region that merges tokens into the batch, proven as if it did not."""
    lin, bn = nn.Linear(6, 5, bias=False), _bn(5, torch.Generator().manual_seed(0), "bn",
                                                nn.BatchNorm1d)
    expr = rg.with_input((2, 7, 6), lambda x: _bn_node(rg.Flatten(
        rg.Linear(x, lin.weight, None, "lin")), bn, "bn"))
    fused = rg.reduce(expr)
    assert (fused.input_layout, fused.value_layout) == ("NLC", "NC")
    assert prove_region(expr, fused, module=True).ok
    assert not prove_region(expr, fused.replace(input_layout="")).ok


def test_flipped_conv1d_kernel_and_wrong_stride_caught():
    expr = conv1d()
    fused = rg.reduce(expr)
    assert "output[random]" in _failed(prove_region(expr, fused.replace(
        weight=fused.weight.detach().flip(-1))))
    assert not prove_region(expr, fused.replace(spec=fused.spec.replace(stride=(1, 1)))).ok


def test_transposed_gradients_come_from_the_core_kernels(monkeypatch):
    """The fused side's input and weight gradients are the core's transposed kernels:
    breaking them fails exactly those checks."""
    expr = rep_deconv()
    fused = rg.reduce(expr)
    real_input, real_weight = core.conv_transpose2d_input, core.conv_transpose2d_weight
    monkeypatch.setattr(core, "conv_transpose2d_input",
                        lambda *a, **k: 1.001 * real_input(*a, **k))
    failed = _failed(prove_region(expr, fused))
    assert failed == {"grad input"}
    monkeypatch.setattr(core, "conv_transpose2d_input", real_input)
    monkeypatch.setattr(core, "conv_transpose2d_weight",
                        lambda *a, **k: 1.001 * real_weight(*a, **k))
    failed = _failed(prove_region(expr, fused))
    assert failed and all(n.endswith(".weight") for n in failed)
    assert "grad big.weight" in failed


def test_non_differentiable_transposed_reducer_caught(monkeypatch):
    expr = rep_deconv()
    real = rg.reduce

    def detached(e):
        f = real(e)
        return f.replace(weight=f.weight.detach())

    monkeypatch.setattr(rg, "reduce", detached)
    failed = _failed(prove_region(expr, real(expr)))
    assert "grad big.weight" in failed and not any(n.startswith("output") for n in failed)


def test_pooled_head_proves_and_unpooled_kernel_caught():
    gen = torch.Generator().manual_seed(3)
    bn2d, bn1d, lin = _bn(4, gen, "a"), _bn(4, gen, "b", nn.BatchNorm1d), nn.Linear(4, 3)
    expr = rg.with_input((2, 4, 5, 6), lambda x: rg.Linear(
        _bn_node(rg.GlobalPool(_bn_node(x, bn2d, "a")), bn1d, "b"), lin.weight, lin.bias,
        "lin"))
    fused = rg.reduce(expr)
    assert fused.pooled and prove_region(expr, fused, module=True).ok
    # a kernel that does not pool reads every position: wrong outputs
    assert "output[random]" in _failed(prove_region(expr, fused.replace(pooled=False)))


@pytest.mark.parametrize("name, moves, layers", [
    ("ffn_tail", ("NHWC", "NCHW"), [nn.Linear, "permute"]),
    ("bn_permute_linear", ("NCHW", "NHWC"), ["permute", nn.Linear]),
    ("conv_bn_to_channels_last", ("NCHW", "NHWC"), [nn.Conv2d, "permute"])])
def test_moved_channel_axis_keeps_the_permute_and_a_wrong_one_is_caught(name, moves, layers,
                                                                       monkeypatch):
    """A region that moves the channel axis: the fused kernel reads the region input's
    canonical view, the module keeps the permute (after a Linear on channels-last values,
    before it; after any other conv); a module permuting wrongly fails its check while the
    kernel's pass."""
    from repfuse.algebra import modules

    expr = ZOO[name]()
    fused = rg.reduce(expr)
    assert (fused.input_layout, fused.value_layout) == moves
    module = fused.to_module()
    assert [type(m) if not isinstance(m, modules.Permute) else "permute"
            for m in module] == layers
    assert prove_region(expr, fused, module=True).ok
    # the kernel proven as if the region kept its layout: its module gives another layout
    assert not prove_region(expr, fused.replace(input_layout=""), module=True).ok
    wrong = dict(modules.LAYOUT_PERMUTES)
    wrong[moves] = (0, *reversed(wrong[moves][1:]))     # the other axes in another order
    monkeypatch.setattr(modules, "LAYOUT_PERMUTES", wrong)
    failed = _failed(prove_region(expr, fused, module=True))
    assert failed and all(n.startswith("module output") for n in failed), failed
