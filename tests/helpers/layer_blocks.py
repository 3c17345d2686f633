"""Blocks with Linear / BatchNorm1d, Conv1d and ConvTranspose2d regions, written the way
real repositories write them (own modules reproducing the idioms, not copied code).

``BLOCKS[name] = (factory, input shape, fused layer type, regions)``: what each block
becomes when fused (every region one layer of that type, no norm left).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, random layer scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


class LinearBN(nn.Module):
    """LeViT's token projection: Linear, then BatchNorm1d over (N * L, C) and back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenMlp(nn.Module):
    """Two LinearBN with an activation between, residual around."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.ln1, self.act, self.ln2 = LinearBN(c, 2 * c), nn.Hardswish(), LinearBN(2 * c, c)

    def forward(self, x):
        return x + self.ln2(self.act(self.ln1(x)))


class BNLinear(nn.Sequential):
    """A classifier head: BatchNorm1d, dropout, Linear."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(cin))
        self.add_module("drop", nn.Dropout(0.1))
        self.add_module("l", nn.Linear(cin, cout))


class DistilledHead(nn.Module):
    """Global pool, then a head and a distillation head averaged (RepViT, LeViT)."""

    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.head, self.head_dist = BNLinear(c, classes), BNLinear(c, classes)

    def forward(self, x):
        x = x.mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


class PooledHead(nn.Module):
    """BN2d -> global pool -> flatten -> BN1d -> Linear (a ClassifierHead after a norm)."""

    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
        self.head = BNLinear(c, classes)

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.norm(x))))


class TransposedNormTokens(nn.Module):
    """Tokens (N, L, C): BatchNorm1d through transposes, a Linear, a layer scale."""

    def __init__(self, c: int = 8, out: int = 6):
        super().__init__()
        self.norm, self.proj = nn.BatchNorm1d(c), nn.Linear(c, out)
        self.gamma = nn.Parameter(torch.ones(out))

    def forward(self, x):
        y = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(self.proj(y) * self.gamma)


class LinearThenBN(nn.Module):
    """(N, C) features: Linear then BatchNorm1d, and a BN1d before a second Linear."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc, self.bn = nn.Linear(c, 12), nn.BatchNorm1d(12)
        self.bn2, self.fc2 = nn.BatchNorm1d(12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(self.bn2(torch.relu(self.bn(self.fc(x)))))


class DeconvBN(nn.Module):
    """A decoder upsampler: grouped, dilated ConvTranspose2d with output padding, BN."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 6, 3, 2, 1, 1, groups=2, dilation=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.ConvTranspose2d(6, 6, 3, 1, 2, groups=6, dilation=2)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.dw(torch.relu(self.bn(self.up(x)))))


class RepDeconv(nn.Module):
    """Parallel transposed branches: 4x4/s2 p1 + BN and 2x2/s2 + BN (embedded)."""

    def __init__(self, c: int = 4, out: int = 6):
        super().__init__()
        self.big = nn.Sequential(nn.ConvTranspose2d(c, out, 4, 2, 1, bias=False),
                                 nn.BatchNorm2d(out))
        self.small = nn.Sequential(nn.ConvTranspose2d(c, out, 2, 2, bias=False),
                                   nn.BatchNorm2d(out))

    def forward(self, x):
        return torch.relu(self.big(x) + self.small(x))


class BNBeforeDeconv(nn.Module):
    """BN before a stride-1 transposed conv whose every output reads every tap (exact)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.deconv = nn.ConvTranspose2d(c, c, 3, 1, 2)

    def forward(self, x):
        return self.deconv(self.bn(x))


class RepConv1d(nn.Module):
    """A RepVGG block for sequences: Conv1d 3 + BN, Conv1d 1 + BN, BN identity."""

    def __init__(self, c: int = 6, stride: int = 1):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv1d(c, c, 3, stride, 1, bias=False), nn.BatchNorm1d(c))
        self.k1 = nn.Sequential(nn.Conv1d(c, c, 1, stride, bias=False), nn.BatchNorm1d(c))
        self.id = nn.BatchNorm1d(c) if stride == 1 else None

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        return F.relu(y + self.id(x) if self.id is not None else y)


class Conv1dStack(nn.Module):
    """Two RepConv1d blocks, the second strided."""

    def __init__(self):
        super().__init__()
        self.a, self.b = RepConv1d(6), RepConv1d(6, stride=2)

    def forward(self, x):
        return self.b(self.a(x))


BLOCKS = {
    "token_mlp": (TokenMlp, (2, 5, 8), nn.Linear, 2),
    "distilled_head": (DistilledHead, (3, 8, 4, 4), nn.Linear, 1),
    "pooled_head": (PooledHead, (3, 8, 5, 4), nn.Linear, 1),
    "transposed_norm_tokens": (TransposedNormTokens, (2, 7, 8), nn.Linear, 1),
    "linear_bn": (LinearThenBN, (4, 8), nn.Linear, 2),
    "deconv_bn": (DeconvBN, (1, 8, 5, 6), nn.ConvTranspose2d, 2),
    "rep_deconv": (RepDeconv, (2, 4, 5, 6), nn.ConvTranspose2d, 1),
    "bn_before_deconv": (BNBeforeDeconv, (1, 4, 6, 7), nn.ConvTranspose2d, 1),
    "rep_conv1d": (Conv1dStack, (2, 6, 17), nn.Conv1d, 2),
}


def build(name: str, seed: int = 0):
    factory, shape, layer, regions = BLOCKS[name]
    torch.manual_seed(seed)
    model = randomize(factory(), seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, layer, regions
