"""Tricky hand-written patterns through ``repfuse.fuse``: every one is either fused exactly
(float64, 1e-10) or left alone with a reason, never silently wrong.

Patterns that must NOT be treated as linear-per-channel (x * x, a (1, C, H, W) multiplier,
a concatenation along H, p / x) keep their nonlinear node; the linear parts around them
may still fuse.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import repfuse

D = torch.float64
X = (1, 8, 16, 16)


def bn(c, **kw):
    m = nn.BatchNorm2d(c, **kw)
    with torch.no_grad():
        if m.running_mean is not None:
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.3)
    return m


def conv_bn(ci, co, k, s=1, p=None, g=1, d=1, mode="zeros"):
    p = (k // 2) * d if p is None else p
    return nn.Sequential(nn.Conv2d(ci, co, k, s, p, d, g, bias=False, padding_mode=mode), bn(co))


class TwoBranch(nn.Module):
    """a(x) <op> b(x) with a 3x3 and a 1x1 conv-BN branch; ``op`` picks the pattern."""

    def __init__(self, op, a=None, b=None):
        super().__init__()
        self.op = op
        self.a = a or conv_bn(8, 8, 3)
        self.b = b or conv_bn(8, 8, 1)
        self.p_chan = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.p_full = nn.Parameter(torch.randn(1, 8, 16, 16))
        self.register_buffer("s", torch.randn(1, 8, 1, 1))

    def forward(self, x):
        a, b, op = self.a, self.b, self.op
        if op == "inplace":
            y = a(x)
            y += b(x)
            return F.relu_(y)
        if op == "sub":
            return F.relu(a(x) - b(x) - x)
        if op == "div_param":
            return F.relu(a(x) / self.p_chan + b(x) * self.s)
        if op == "x_times_x":
            y = a(x)
            return F.relu(y * y + b(x))
        if op == "branch_product":
            return F.relu(a(x) * b(x))
        if op == "spatial_param":
            return F.relu(a(x) * self.p_full + b(x))
        if op == "param_over_x":
            return F.relu(self.p_chan / (a(x) + 5.0) + b(x))
        if op == "cat_h":
            return torch.cat([a(x), b(x)], 2)
        if op == "cat_c":
            return F.relu(torch.cat([a(x), b(x), x], 1))
        return F.relu(a(x) + b(x))


class SharedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.n1, self.n2 = bn(8), bn(8)

    def forward(self, x):
        return F.relu(self.n1(self.a(x)) + self.n2(self.b(x)))


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.cb = conv_bn(8, 8, 3)

    def forward(self, x):
        return self.cb(x) + self.cb(F.relu(self.cb(x)))


class FunctionalConv(nn.Module):
    """``computed``: "params" scales the kernel by a constant in forward (folded, the proofs
    differentiate through it), "input" by a statistic of the input (not a constant)."""

    def __init__(self, computed=""):
        super().__init__()
        self.computed = computed
        self.w3 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w1 = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.2)
        self.n = bn(8)

    def forward(self, x):
        w3 = self.w3
        if self.computed == "params":
            w3 = w3 * 2
        elif self.computed == "input":
            w3 = w3 * x.mean()
        return F.relu(self.n(F.conv2d(x, w3, None, 1, 1) + F.conv2d(x, self.w1)))


class NoStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.i = conv_bn(8, 8, 3), conv_bn(8, 8, 1), bn(8,
                                                                     track_running_stats=False)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x) + self.i(x))


def run(model, *, fused_at_least=1, skip_reason=None, verify=False):
    torch.manual_seed(1)
    model = model.to(D).eval()
    x = torch.randn(X, dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = repfuse.fuse(model, x, verify=verify)
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-10 * (1 + ref.abs().max())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(result.report.fused) >= fused_at_least
    if skip_reason is not None:
        assert any(skip_reason in r.reason for r in result.report.skipped), \
            [r.reason for r in result.report.skipped]
    return result


def n_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("op", ["sum", "inplace", "sub", "div_param", "cat_c"])
def test_linear_patterns_fuse_to_one_conv(op):
    torch.manual_seed(0)
    result = run(TwoBranch(op))
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and n_bn(result.model) == 0


@pytest.mark.parametrize("op", ["x_times_x", "branch_product", "spatial_param",
                                "param_over_x", "cat_h"])
def test_nonlinear_patterns_keep_their_nonlinear_node(op):
    torch.manual_seed(0)
    result = run(TwoBranch(op))
    # the two branches cannot become one conv: two convs stay (each with its BN folded)
    assert sum(isinstance(m, nn.Conv2d) for m in result.model.modules()) == 2


@pytest.mark.parametrize("make, reason", [
    (lambda: TwoBranch("sum", conv_bn(8, 8, 3, mode="circular"), conv_bn(8, 8, 3)),
     "pad their input differently"),
    (lambda: TwoBranch("sum", conv_bn(8, 8, 2, 2, 0), conv_bn(8, 8, 1, 2, 0)),
     "different output grids"),
    (UsedTwice, "used 3 times"),
    (NoStats, "no running statistics"),
    (lambda: FunctionalConv(computed="input"), "computed in forward from values other than"),
])
def test_unfusable_patterns_are_left_alone_with_a_reason(make, reason):
    torch.manual_seed(0)
    run(make(), fused_at_least=0, skip_reason=reason)


@pytest.mark.parametrize("make", [
    lambda: TwoBranch("sum", conv_bn(8, 8, 3, mode="circular"), conv_bn(8, 8, 1)),
    lambda: TwoBranch("sum", conv_bn(8, 8, 3, 2, 1), conv_bn(8, 8, 1, 2, 0)),  # s2, no id
    lambda: TwoBranch("sum", conv_bn(8, 8, 5), conv_bn(8, 8, 3, d=2)),  # dilation aligns
    lambda: TwoBranch("sum", conv_bn(8, 8, 3, g=4), conv_bn(8, 8, 1, p=0, g=2)),  # groups
    SharedWeights,
    FunctionalConv,
    lambda: FunctionalConv(computed="params"),
])
def test_geometry_mixes_fuse_exactly(make):
    torch.manual_seed(0)
    result = run(make(), verify=True)
    assert result.report.ok
    assert n_bn(result.model) == 0


def test_training_mode_bn_with_cumulative_average_is_fused_as_eval():
    torch.manual_seed(0)
    model = TwoBranch("sum")
    model.a[1].momentum = None
    model = model.to(D).train()
    x = torch.randn(X, dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = repfuse.fuse(model, x, verify=False)
    assert model.training  # the input model is not switched to eval
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any("training mode" in n for n in result.report.notes)
    with torch.no_grad():
        ref = model.eval()(x)
        assert (result.model(x) - ref).abs().max() < 1e-10


# ---------------------------------------------------------------------- open problems
class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(8, 8, 3), conv_bn(8, 8, 1)
        self.a[0].register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


def test_forward_hook_blocks_fusion():
    torch.manual_seed(0)
    run(Hooked(), fused_at_least=0)


class InplaceOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(8, 8, 3), conv_bn(8, 8, 1)

    def forward(self, x):
        x = torch.relu(x + 0.0)
        y = self.a(x)
        x.mul_(2.0)  # the training form cannot be differentiated any more
        return y + self.b(x)


class FloorDiv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(8, 8, 3), conv_bn(8, 8, 1)

    def forward(self, x):
        return F.relu(self.a(x) // 2.0 + self.b(x))


@pytest.mark.parametrize("make", [InplaceOnInput, FloorDiv])
def test_non_differentiable_models_are_fused_and_verified(make):
    torch.manual_seed(0)
    result = run(make(), fused_at_least=2, verify=True)
    assert result.report.ok


class TrainingBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.n = nn.Conv2d(8, 8, 3, padding=1), bn(8)

    def forward(self, x):
        y = F.batch_norm(self.c(x), self.n.running_mean, self.n.running_var, self.n.weight,
                         self.n.bias, True, 0.1, 1e-5)
        return F.relu(y + x)


def test_fuse_does_not_update_the_input_models_buffers():
    """The model's forward updates running statistics (F.batch_norm, training=True): fusing
    runs it on the example inputs, which must not reach the input model's buffers."""
    torch.manual_seed(0)
    model = TrainingBatchNorm().to(D).eval()
    x = torch.randn(X, dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = repfuse.fuse(model, x, verify=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # batch statistics: the output does not read the running buffers
        assert (result.model(x) - model(x)).abs().max() <= 1e-10


def test_float16_relu_block_is_reported_ok():
    """Gradients through ReLU kinks flip under float16 rounding: still reported ok, and the
    fused model is as close to the float64 training form as the float16 training form."""
    torch.manual_seed(0)
    model = TwoBranch("sum", conv_bn(8, 8, 3), nn.AvgPool2d(3, 1, 1)).eval()
    x = torch.randn(X)
    ref64 = model.double()(x.double())
    model = model.half()
    result = repfuse.fuse(model, x.half())
    with torch.no_grad():
        err_fused = (result.model(x.half()).double() - ref64).abs().max()
        err_train = (model(x.half()).double() - ref64).abs().max()
    assert err_fused <= 2 * err_train
    assert result.report.ok


class MutatedThroughView(nn.Module):
    """The region input is changed in place through a view between its two reads."""

    def __init__(self, alias="slice"):
        super().__init__()
        self.alias = alias
        self.a, self.b = conv_bn(8, 8, 3), conv_bn(8, 8, 1)

    def forward(self, x):
        x = F.relu(x)
        y = self.a(x)
        view = x[:, :4] if self.alias == "slice" else x.view(x.shape)
        view.mul_(3.0)
        return y + self.b(x)


@pytest.mark.parametrize("alias", ["slice", "view"])
def test_mutation_through_a_view_splits_the_region(alias):
    torch.manual_seed(0)
    run(MutatedThroughView(alias), fused_at_least=0)


class PreHooked(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.a, self.b = conv_bn(8, 8, 3), conv_bn(8, 8, 1)
        if where == "pre":
            self.b.register_forward_pre_hook(lambda m, i: (i[0] * 3,))
        else:
            self.a.register_forward_hook(lambda m, i, o: o + 1)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


@pytest.mark.parametrize("where", ["pre", "block"])
def test_hooks_on_blocks_block_fusion(where):
    torch.manual_seed(0)
    run(PreHooked(where), fused_at_least=0)


# ---------------------------------------------------------------------- YOLO style
class RepConvN(nn.Module):
    """ultralytics-style RepConv: SiLU(conv3x3+BN + conv1x1+BN [+ BN identity])."""

    def __init__(self, c1, c2, bn_identity=True):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c1, c2, 3), conv_bn(c1, c2, 1)
        self.bn = bn(c1) if bn_identity and c1 == c2 else None
        self.act = nn.SiLU()

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class ConvSiLU(nn.Module):
    def __init__(self, c1, c2, k=1):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False), bn(c2), \
            nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = RepConvN(c, c, bn_identity=False), ConvSiLU(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class RepCSP(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = ConvSiLU(c1, c_), ConvSiLU(c1, c_), ConvSiLU(2 * c_, c2)
        self.m = nn.Sequential(RepBottleneck(c_))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    def __init__(self, c1=8, c2=16, c3=8, c4=4):
        super().__init__()
        self.cv1 = ConvSiLU(c1, c3)
        self.cv2 = nn.Sequential(RepCSP(c3 // 2, c4), ConvSiLU(c4, c4, 3))
        self.cv3 = nn.Sequential(RepCSP(c4, c4), ConvSiLU(c4, c4, 3))
        self.cv4 = ConvSiLU(c3 + 2 * c4, c2)
        self.rep = RepConvN(c2, c2)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in (self.cv2, self.cv3))
        return self.rep(self.cv4(torch.cat(y, 1)))


def test_yolo_repncspelan4_nesting_fuses_every_branch():
    torch.manual_seed(0)
    result = run(RepNCSPELAN4(), fused_at_least=10, verify=True)
    assert result.report.ok
    assert n_bn(result.model) == 0
    kernels = [m.kernel_size for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    # cv1, cv4 (1x1) and two ConvSiLU 3x3 outside the CSPs; per CSP three 1x1 and the
    # bottleneck's RepConv (one 3x3) and ConvSiLU 3x3; the final RepConv as one 3x3
    assert len(kernels) == 2 + 2 + 2 * (3 + 2) + 1
    assert kernels.count((3, 3)) == 2 + 2 * 2 + 1
