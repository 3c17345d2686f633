"""A zoo of hand-built training-form blocks (ordinary nn.Modules) and model helpers."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def seeded_bn(c: int, seed: int, cls=nn.BatchNorm2d) -> nn.Module:
    """A batch norm (``cls``) of ``c`` channels with statistics and affine parameters
    drawn from ``seed`` away from the identity."""
    g = torch.Generator().manual_seed(seed)
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return bn


def conv_bn(cin, cout, k, stride=1, padding=None, groups=1, dilation=1):
    if padding is None:
        padding = dilation * (k // 2) if isinstance(k, int) else (k[0] // 2, k[1] // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False),
                         nn.BatchNorm2d(cout))


class RepVGG(nn.Module):
    def __init__(self, c=8, cout=8, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(c, cout, 3, stride, groups=groups)
        self.pw = conv_bn(c, cout, 1, stride, 0, groups=groups)
        self.identity = nn.BatchNorm2d(c) if c == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.pw(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class ACB(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.square = conv_bn(c, c, 3)
        self.hor = conv_bn(c, c, (1, 3), padding=(0, 1))
        self.ver = conv_bn(c, c, (3, 1), padding=(1, 0))

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


class DBB(nn.Module):
    """Diverse branches: kxk, 1x1, 1x1 -> avg pool -> BN, 1x1 -> kxk -> BN."""

    def __init__(self, c=8):
        super().__init__()
        self.origin = conv_bn(c, c, 3)
        self.one = conv_bn(c, c, 1, padding=0)
        self.avg_conv = nn.Conv2d(c, c, 1, bias=False)
        self.avg = nn.AvgPool2d(3, 1, 1)
        self.avg_bn = nn.BatchNorm2d(c)
        self.idconv = nn.Conv2d(c, c, 1, bias=False)
        self.kxk = conv_bn(c, c, 3)

    def forward(self, x):
        out = self.origin(x) + self.one(x)
        out = out + self.avg_bn(self.avg(self.avg_conv(x)))
        out = out + self.kxk(self.idconv(x))
        return torch.relu(out)


class MobileOne(nn.Module):
    def __init__(self, c=8, cout=8, k=3, branches=2, depthwise=True):
        super().__init__()
        groups = c if depthwise else 1
        self.kxk = nn.ModuleList(conv_bn(c, cout, k, groups=groups) for _ in range(branches))
        self.scale = conv_bn(c, cout, 1, padding=0, groups=groups) if k > 1 else None
        self.skip = nn.BatchNorm2d(c) if c == cout else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.scale(x) if self.scale is not None else 0
        for branch in self.kxk:
            out = out + branch(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)


class RepLK(nn.Module):
    """A large depthwise kernel with dilated small kernels (UniRepLK style)."""

    def __init__(self, c=8):
        super().__init__()
        self.large = conv_bn(c, c, 7, groups=c)
        self.small = nn.ModuleList([conv_bn(c, c, 5, groups=c), conv_bn(c, c, 3, groups=c,
                                                                          dilation=2),
                                    conv_bn(c, c, 3, groups=c, dilation=3)])

    def forward(self, x):
        out = self.large(x)
        for s in self.small:
            out = out + s(x)
        return F.gelu(out)


class QARepVGG(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dense = conv_bn(c, c, 3)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.dense(x) + self.pw(x) + x))


class RepConvSiLU(nn.Module):
    def __init__(self, c=8, cout=16):
        super().__init__()
        self.conv1 = conv_bn(c, cout, 3)
        self.conv2 = conv_bn(c, cout, 1, padding=0)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


class RepVGGDW(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = conv_bn(c, c, 7, groups=c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.gelu(self.bn(self.conv(x) + self.conv1(x) + x))


class RepMixer(nn.Module):
    """FastViT's token mixer: x + layer_scale * (mixer(x) - norm(x))."""

    def __init__(self, c=8):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.mixer = conv_bn(c, c, 3, groups=c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        x = x + self.layer_scale * (self.mixer(x) - self.norm(x))
        return F.hardswish(x)


class Mixed(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.b5, self.b3, self.b1 = conv_bn(c, c, 5), conv_bn(c, c, 3), conv_bn(c, c, 1)

    def forward(self, x):
        return torch.tanh(self.b5(x) + self.b3(x) + self.b1(x))


class BasicBlock(nn.Module):
    def __init__(self, c=8, cout=16, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = conv_bn(c, cout, 1, stride, 0)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Concat(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, 6, 3), conv_bn(c, 4, 1, padding=0)
        self.c = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(torch.cat([self.a(x), self.b(x), self.c(x)], dim=1))


class Functional(nn.Module):
    """F.conv2d with parameter weights, F.batch_norm, scalar mul/div, sub, neg, F.pad."""

    def __init__(self, c=8):
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.2)
        self.w1 = nn.Parameter(torch.randn(c, c, 1, 1) * 0.2)
        self.b1 = nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("mean", torch.randn(c) * 0.3)
        self.register_buffer("var", torch.rand(c) + 0.5)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.beta = nn.Parameter(torch.randn(c) * 0.3)
        self.register_buffer("scale", torch.rand(1, c, 1, 1) + 0.5)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        a = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.w3)
        a = F.batch_norm(a, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        b = F.conv2d(x, self.w1, self.b1) / 4.0
        out = self.drop(a - b) * self.scale + (-x) * 0.5 + 2.0
        return F.relu(out)


class Nested(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)),
                                  nn.Identity(), nn.Dropout(0.2), nn.BatchNorm2d(c))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x))


class Net(nn.Module):
    """A block between a stem and a head, as in a real network."""

    def __init__(self, block, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = block
        self.head = nn.Linear(block_out(block, c), 5)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def block_out(block, c):
    x = torch.zeros(1, c, 8, 8)
    with torch.no_grad():
        return block.eval()(x).shape[1]


# design -> (factory, number of fused convs expected in the block)
ZOO = {
    "repvgg": (lambda: RepVGG(), 1),
    "repvgg_groups": (lambda: RepVGG(8, 8, 1, groups=4), 1),
    "repvgg_stride2": (lambda: RepVGG(8, 16, 2), 1),
    "acb": (ACB, 1),
    "dbb": (DBB, 1),
    "mobileone_dw": (lambda: MobileOne(8, 8, 3, 3, True), 1),
    "mobileone_pw": (lambda: MobileOne(8, 8, 1, 3, False), 1),
    "replk": (RepLK, 1),
    "qarepvgg": (QARepVGG, 1),
    "repconv_silu": (RepConvSiLU, 1),
    "repvggdw": (RepVGGDW, 1),
    "repmixer": (RepMixer, 1),
    "mixed_5_3_1": (Mixed, 1),
    "resnet_basic": (BasicBlock, 3),
    "concat": (Concat, 1),
    "functional": (Functional, 1),
    "nested_sequential": (Nested, 1),
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    factory, _ = ZOO[name]
    return randomize_bn(Net(factory())).double().eval()


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def batch_norms_left(model: nn.Module) -> int:
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for m in model.modules():
        if isinstance(m, fx.GraphModule):
            n += sum(node.target is F.batch_norm for node in m.graph.nodes)
    return n
