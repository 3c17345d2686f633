"""Published re-parameterization designs, built from torch modules as their papers train
them, expressed as region expressions, reduced, and checked against the modules' output.

BatchNorms get non-trivial running statistics and affine parameters (default ones hide
bugs). Every design is checked with the fused AffineConv and with its nn.Conv2d."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.algebra import TOL, D, max_diff, rand_bn, rand_conv

from repfuse import region as R
from repfuse.core.spec import ConvSpec
from repfuse.region.reference import evaluate

GEN = torch.Generator().manual_seed(1234)


def randomize(module: nn.Module) -> nn.Module:
    """float64, random conv weights, random BN statistics and affine parameters, eval mode."""
    module = module.to(D)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=GEN, dtype=D) * 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=GEN, dtype=D))
            elif isinstance(m, nn.BatchNorm2d):
                fresh = rand_bn(m.num_features, GEN, m.affine)
                m.load_state_dict(fresh.state_dict())
    return module.eval()


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: batch norm, then pad with the BN's value for a zero input."""

    def __init__(self, pad, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pad = pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad:
            bn = self.bn
            values = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
            p = self.pad
            out = F.pad(out, [p] * 4)
            v = values.view(1, -1, 1, 1)
            out[:, :, :p, :] = v
            out[:, :, -p:, :] = v
            out[:, :, :, :p] = v
            out[:, :, :, -p:] = v
        return out


# ------------------------------------------------------------------ expression builders
def conv_node(inp, conv, name=""):
    return R.Conv(inp, conv.weight, conv.bias, ConvSpec.from_module(conv), name)


def bn_node(inp, bn, name=""):
    return R.BatchNorm(inp, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name)


def convbn_node(inp, cb):
    return bn_node(conv_node(inp, cb.conv), cb.bn)


def check(block, expr, x, *, kernel=None, groups=None):
    ref = block(x)
    fused = R.reduce(expr)
    assert max_diff(evaluate(expr, x), ref) < TOL
    assert max_diff(fused.forward(x), ref) < TOL
    module = fused.to_module()
    assert max_diff(module(x), ref) < TOL
    if kernel is not None:
        assert fused.spec.kernel_size == kernel
    if groups is not None:
        assert fused.spec.groups == groups
    return fused


# ------------------------------------------------------------------ RepVGG
class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups=groups)
        self.one = ConvBN(cin, cout, 1, stride, 0, groups=groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        return y if self.identity is None else y + self.identity(x)

    def expr(self, inp):
        branches = [convbn_node(inp, self.dense), convbn_node(inp, self.one)]
        if self.identity is not None:
            branches.append(bn_node(inp, self.identity))
        return R.Add(tuple(branches))


@pytest.mark.parametrize("cin,cout,stride,groups", [(8, 8, 1, 1), (8, 8, 1, 2), (8, 8, 1, 4),
                                                    (8, 16, 2, 1), (8, 16, 2, 4), (8, 8, 2, 2)])
def test_repvgg(cin, cout, stride, groups):
    block = randomize(RepVGGBlock(cin, cout, stride, groups))
    inp = R.Input(cin)
    x = torch.randn(2, cin, 9, 10, generator=GEN, dtype=D)
    check(block, block.expr(inp), x, kernel=(3, 3), groups=groups)


# ------------------------------------------------------------------ DBB
class DBB(nn.Module):
    """Diverse Branch Block: kxk, 1x1, 1x1 -> avg, 1x1 -> kxk (transforms I, II, III, V, VI
    on top of the conv-BN fold)."""

    def __init__(self, c, k=3, stride=1, groups=1):
        super().__init__()
        p = k // 2
        self.origin = ConvBN(c, c, k, stride, p, groups=groups)
        self.one = ConvBN(c, c, 1, stride, 0, groups=groups)
        self.avg_conv = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.avg_bnpad = BNAndPad(p, c)
        self.avg = nn.AvgPool2d(k, stride, 0)
        self.avg_bn = nn.BatchNorm2d(c)
        self.idconv = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.kxk_bnpad = BNAndPad(p, c)
        self.kxk = ConvBN(c, c, k, stride, 0, groups=groups)

    def forward(self, x):
        out = self.origin(x) + self.one(x)
        out = out + self.avg_bn(self.avg(self.avg_bnpad(self.avg_conv(x))))
        return out + self.kxk(self.kxk_bnpad(self.idconv(x)))

    def expr(self, inp):
        k = self.origin.conv.kernel_size[0]
        p = k // 2
        avg = R.Pad(bn_node(conv_node(inp, self.avg_conv), self.avg_bnpad.bn), (p,) * 4,
                    zero_response=True)
        avg = bn_node(R.AvgPool(avg, (k, k), self.avg.stride, 0), self.avg_bn)
        seq = R.Pad(bn_node(conv_node(inp, self.idconv), self.kxk_bnpad.bn), (p,) * 4,
                    zero_response=True)
        seq = convbn_node(seq, self.kxk)
        return R.Add((convbn_node(inp, self.origin), convbn_node(inp, self.one), avg, seq))


@pytest.mark.parametrize("k,stride,groups", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 1, 4)])
def test_dbb(k, stride, groups):
    block = randomize(DBB(8, k, stride, groups))
    x = torch.randn(2, 8, 9, 11, generator=GEN, dtype=D)
    check(block, block.expr(R.Input(8)), x, kernel=(k, k), groups=groups)


def test_dbb_pad_value_from_tensor():
    """The BN-and-pad value given as a tensor (as DBB computes it) instead of symbolically."""
    block = randomize(DBB(4, 3))
    bn = block.kxk_bnpad.bn
    value = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    inp = R.Input(4)
    seq = R.Pad(bn_node(conv_node(inp, block.idconv), bn), (1, 1, 1, 1), value)
    expr = convbn_node(seq, block.kxk)
    x = torch.randn(1, 4, 6, 6, generator=GEN, dtype=D)
    check(lambda t: block.kxk(block.kxk_bnpad(block.idconv(t))), expr, x, kernel=(3, 3))


def test_dbb_depth_concat():
    """DBB transform IV: channel concatenation of branches."""
    a, b = randomize(ConvBN(4, 6, 3, 1, 1)), randomize(ConvBN(4, 2, 1))
    inp = R.Input(4)
    expr = R.Concat((convbn_node(inp, a), convbn_node(inp, b)))
    x = torch.randn(2, 4, 7, 7, generator=GEN, dtype=D)
    fused = check(lambda t: torch.cat([a(t), b(t)], 1), expr, x, kernel=(3, 3))
    assert fused.out_channels == 8


# ------------------------------------------------------------------ ACNet
class ACB(nn.Module):
    def __init__(self, c, k=3):
        super().__init__()
        p = k // 2
        self.square = ConvBN(c, c, k, 1, p)
        self.hor = ConvBN(c, c, (1, k), 1, (0, p))
        self.ver = ConvBN(c, c, (k, 1), 1, (p, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


@pytest.mark.parametrize("k", [3, 5])
def test_acnet(k):
    block = randomize(ACB(6, k))
    inp = R.Input(6)
    expr = R.Add(tuple(convbn_node(inp, m) for m in (block.square, block.hor, block.ver)))
    x = torch.randn(2, 6, 8, 9, generator=GEN, dtype=D)
    check(block, expr, x, kernel=(k, k))


# ------------------------------------------------------------------ MobileOne
class MobileOneBlock(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, branches=3, scale=True,
                 skip=True):
        super().__init__()
        self.convs = nn.ModuleList(ConvBN(cin, cout, k, stride, k // 2, groups=groups)
                                   for _ in range(branches))
        self.scale = ConvBN(cin, cout, 1, stride, 0, groups=groups) if scale and k > 1 else None
        self.skip = nn.BatchNorm2d(cin) if skip and cin == cout and stride == 1 else None

    def forward(self, x):
        out = 0
        if self.skip is not None:
            out = self.skip(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for m in self.convs:
            out = out + m(x)
        return out

    def expr(self, inp):
        branches = [convbn_node(inp, m) for m in self.convs]
        if self.scale is not None:
            branches.append(convbn_node(inp, self.scale))
        if self.skip is not None:
            branches.append(bn_node(inp, self.skip))
        return R.Add(tuple(branches))


@pytest.mark.parametrize("stride", [1, 2])
def test_mobileone_depthwise(stride):
    block = randomize(MobileOneBlock(8, 8, 3, stride, groups=8, branches=4))
    x = torch.randn(2, 8, 9, 9, generator=GEN, dtype=D)
    check(block, block.expr(R.Input(8)), x, kernel=(3, 3), groups=8)


def test_mobileone_pointwise():
    block = randomize(MobileOneBlock(8, 8, 1, 1, groups=1, branches=4))
    x = torch.randn(2, 8, 6, 7, generator=GEN, dtype=D)
    check(block, block.expr(R.Input(8)), x, kernel=(1, 1), groups=1)


# ------------------------------------------------------------------ RepLKNet / UniRepLKNet
class LargeKernel(nn.Module):
    """RepLKNet (large + small kernel) and UniRepLKNet (large + dilated small kernels)."""

    def __init__(self, c, k, smalls):
        super().__init__()
        self.large = ConvBN(c, c, k, 1, k // 2, groups=c)
        self.smalls = nn.ModuleList(ConvBN(c, c, ks, 1, d * (ks - 1) // 2, d, groups=c)
                                    for ks, d in smalls)

    def forward(self, x):
        out = self.large(x)
        for m in self.smalls:
            out = out + m(x)
        return out


@pytest.mark.parametrize("k,smalls", [(13, [(5, 1)]),  # RepLKNet
                                      (9, [(7, 1), (5, 1), (3, 2), (3, 3)]),  # UniRepLK k=9
                                      (13, [(5, 1), (7, 2), (3, 3), (3, 4), (3, 5)])])
def test_large_kernel(k, smalls):
    block = randomize(LargeKernel(4, k, smalls))
    inp = R.Input(4)
    expr = R.Add((convbn_node(inp, block.large),) + tuple(convbn_node(inp, m)
                                                          for m in block.smalls))
    x = torch.randn(1, 4, 15, 16, generator=GEN, dtype=D)
    check(block, expr, x, kernel=(k, k), groups=4)


# ------------------------------------------------------------------ QARepVGG
class QARepVGGBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = ConvBN(c, c, 3, 1, 1)
        self.one = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.dense(x) + self.one(x) + x)


def test_qarepvgg():
    block = randomize(QARepVGGBlock(8))
    inp = R.Input(8)
    expr = bn_node(R.Add((convbn_node(inp, block.dense), conv_node(inp, block.one), inp)),
                   block.bn)
    x = torch.randn(2, 8, 7, 9, generator=GEN, dtype=D)
    check(block, expr, x, kernel=(3, 3))
    assert R.describe(expr) == ["(conv3x3+bn, conv1x1, identity)+bn"]


# ------------------------------------------------------------------ YOLO RepConv
class RepConv(nn.Module):
    """ultralytics RepConv: conv3x3-BN + conv1x1-BN (+ BN identity), then SiLU."""

    def __init__(self, c1, c2, bn_identity):
        super().__init__()
        self.conv1 = ConvBN(c1, c2, 3, 1, 1)
        self.conv2 = ConvBN(c1, c2, 1, 1, 0)
        self.bn = nn.BatchNorm2d(c1) if bn_identity and c1 == c2 else None
        self.act = nn.SiLU()

    def linear(self, x):
        y = self.conv1(x) + self.conv2(x)
        return y if self.bn is None else y + self.bn(x)

    def forward(self, x):
        return self.act(self.linear(x))


@pytest.mark.parametrize("c1,c2,identity", [(8, 8, True), (8, 8, False), (4, 8, True)])
def test_yolo_repconv(c1, c2, identity):
    block = randomize(RepConv(c1, c2, identity))
    inp = R.Input(c1)
    branches = [convbn_node(inp, block.conv1), convbn_node(inp, block.conv2)]
    if block.bn is not None:
        branches.append(bn_node(inp, block.bn))
    expr = R.Add(tuple(branches))
    x = torch.randn(2, c1, 8, 8, generator=GEN, dtype=D)
    fused = check(block.linear, expr, x, kernel=(3, 3))
    assert max_diff(block.act(fused.to_module()(x)), block(x)) < TOL


# ------------------------------------------------------------------ RepVGGDW (YOLOv10)
class RepVGGDW(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = ConvBN(c, c, 7, 1, 3, groups=c)
        self.conv1 = ConvBN(c, c, 3, 1, 1, groups=c)

    def forward(self, x):
        return self.conv(x) + self.conv1(x)


def test_repvggdw():
    block = randomize(RepVGGDW(8))
    inp = R.Input(8)
    expr = R.Add((convbn_node(inp, block.conv), convbn_node(inp, block.conv1)))
    x = torch.randn(2, 8, 10, 9, generator=GEN, dtype=D)
    check(block, expr, x, kernel=(7, 7), groups=8)


# ------------------------------------------------------------------ RepMixer (FastViT)
class RepMixer(nn.Module):
    """x + gamma * (mixer(x) - norm(x)); mixer: MobileOne dw block (kxk + 1x1 scale + BN
    skip), norm: BN skip only."""

    def __init__(self, c, k=3):
        super().__init__()
        self.norm = MobileOneBlock(c, c, k, 1, groups=c, branches=0, scale=False)
        self.mixer = MobileOneBlock(c, c, k, 1, groups=c, branches=1)
        self.layer_scale = nn.Parameter(torch.randn(c, 1, 1, generator=GEN, dtype=D))

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


@pytest.mark.parametrize("k", [3, 5])
def test_repmixer(k):
    block = randomize(RepMixer(8, k))
    inp = R.Input(8)
    expr = R.Add((inp, R.Scale(R.Sub(block.mixer.expr(inp), block.norm.expr(inp)),
                               block.layer_scale)))
    x = torch.randn(2, 8, 7, 7, generator=GEN, dtype=D)
    check(block, expr, x, kernel=(k, k), groups=8)
    assert "layer_scale" not in R.parameters(expr)
    assert any(t is block.layer_scale for t in R.parameters(expr).values())


# ------------------------------------------------------------------ the map is differentiable
def test_design_parameter_gradients_match_training_form():
    """d<fused(x), g>/d(branch params) equals the training form's gradient (DBB)."""
    block = randomize(DBB(4, 3))
    expr = block.expr(R.Input(4))
    x = torch.randn(1, 4, 6, 6, generator=GEN, dtype=D)
    gy = torch.randn(1, 4, 6, 6, generator=GEN, dtype=D)
    params = list(R.parameters(expr).values())
    g_fused = torch.autograd.grad((R.reduce(expr).forward(x) * gy).sum(), params)
    g_ref = torch.autograd.grad((block(x) * gy).sum(), params)
    for name, a, b in zip(R.parameters(expr), g_fused, g_ref):
        assert max_diff(a, b) < TOL, name


def test_conv_then_pool_and_scale_regions():
    """Mixed: 5x5 + 3x3 + 1x1 + avgpool3x3 + scaled identity."""
    gen = torch.Generator().manual_seed(5)
    c5, c3, c1 = (rand_conv(4, 4, k, gen, padding=k // 2) for k in (5, 3, 1))
    inp = R.Input(4)
    expr = R.Add((conv_node(inp, c5), conv_node(inp, c3), conv_node(inp, c1),
                  R.AvgPool(inp, (3, 3), (1, 1), 1), R.Scale(inp, 0.5)))
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=D)
    ref = c5(x) + c3(x) + c1(x) + F.avg_pool2d(x, 3, 1, 1) + 0.5 * x
    check(lambda t: ref, expr, x, kernel=(5, 5))
