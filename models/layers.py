"""Building blocks shared by the reference architectures.

Every block here is a plain training-form module: it computes its branches and sums
them, and has no fuse / deploy method. Attribute names follow the official
repositories so their training checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
            dilation=1, groups: int = 1) -> nn.Sequential:
    """``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)``, the RepVGG / MobileOne /
    DBB branch (state-dict keys ``conv.weight``, ``bn.weight``, ``bn.running_mean``, ...)."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=padding, dilation=dilation, groups=groups,
                                     bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels))
    return seq


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional nonlinearity, as the DBB repository's
    ``ConvBN`` (keys ``conv.weight``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, nonlinear: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.bn(self.conv(x)))


class BNAndPad(nn.Module):
    """Batch norm whose output is padded by ``pad_pixels`` on every side with the norm's
    bias-equivalent value ``beta - mean * gamma / sqrt(var + eps)`` (the value the norm
    gives to a zero input), so that a following conv can be padding-free.

    Keys as the DBB repository's ``BNAndPadLayer``: ``bn.weight``, ``bn.bias``,
    ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``.

    In eval mode this is ``bn(pad(x, 0))``: a zero pixel normalised is exactly the
    bias-equivalent value. In training mode the norm's statistics come from the unpadded
    input and the border gets the value computed from the running statistics, as in the
    reference implementation.
    """

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
        self.pad_pixels = pad_pixels

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad_pixels
        if p <= 0:
            return self.bn(x)
        if not self.training:
            return self.bn(F.pad(x, [p, p, p, p]))
        out = self.bn(x)
        value = pad_value(self.bn).detach().view(1, -1, 1, 1)
        return F.pad(out - value, [p, p, p, p]) + value


def pad_value(bn: nn.BatchNorm2d) -> Tensor:
    """The output of an eval-mode batch norm for a zero input, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        return bn.bias - bn.running_mean * bn.weight * scale
    return -bn.running_mean * scale


class IdentityBasedConv1x1(nn.Module):
    """1x1 conv whose kernel is ``weight + identity`` (DBB's ``IdentityBasedConv1x1``):
    computed as ``conv1x1(x, weight) + x``, the same function. Key: ``weight``
    (shape (C, C/groups, 1, 1), zero-initialised as in the reference)."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels={channels} is not divisible by groups={groups}")
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, None, 1, 0, 1, self.groups) + x


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in MobileOne (``reduce`` / ``expand`` 1x1 convs with
    bias, ReLU, sigmoid gate). Nonlinear: it stays a separate module after fusion."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        hidden = int(in_channels * rd_ratio)
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class StagedClassifier(nn.Module):
    """The layout RepVGG, MobileOne and the ResNets share: ``stage0`` .. ``stage4``, a
    global average pool ``gap`` and a linear head ``linear`` (subclasses build them)."""

    def forward(self, x: Tensor) -> Tensor:
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.linear(self.gap(x).flatten(1))
