"""ResNet skeleton whose 3x3 conv units are pluggable (plain conv+BN, DBB, ACB).

Layout as in the DBB / ACNet reference repositories (DingXiaoH/DiverseBranchBlock,
``resnet.py`` with ``convnet_utils``): ``stage0.conv1`` (7x7 conv+BN+ReLU) and
``stage0.maxpool``, ``stage1`` ... ``stage4`` of basic blocks with ``conv1``, ``conv2``
and ``shortcut`` (1x1 conv+BN or identity), ``gap``, head ``linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from repfuse.models.layers import ConvBN, StagedClassifier

# (in_channels, out_channels, stride, nonlinear) -> 3x3 conv unit with padding 1
Conv3x3Factory = Callable[[int, int, int, "nn.Module | None"], nn.Module]


class BasicBlock(nn.Module):
    """``relu(conv2(conv1(x)) + shortcut(x))`` with ``conv1`` ending in ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, conv3x3: Conv3x3Factory):
        super().__init__()
        if stride != 1 or in_planes != planes:
            self.shortcut = ConvBN(in_planes, planes, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = conv3x3(in_planes, planes, stride, nn.ReLU())
        self.conv2 = conv3x3(planes, planes, 1, None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return F.relu(out + self.shortcut(x))


class ResNet(StagedClassifier):
    """ResNet with basic blocks; ``conv3x3`` builds every 3x3 conv unit."""

    def __init__(self, num_blocks: tuple[int, ...], conv3x3: Conv3x3Factory,
                 num_classes: int = 1000, width_multiplier: float = 1.0):
        super().__init__()
        self.in_planes = int(64 * width_multiplier)
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", ConvBN(3, self.in_planes, 7, stride=2, padding=3,
                                               nonlinear=nn.ReLU()))
        self.stage0.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        stages = []
        for i, (base, depth) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            planes = int(base * width_multiplier)
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(self.in_planes, planes, stride, conv3x3))
                self.in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(self.in_planes, num_classes)



def plain_conv3x3(in_channels: int, out_channels: int, stride: int,
                  nonlinear: nn.Module | None) -> nn.Module:
    """The plain ResNet unit: 3x3 conv+BN (+ nonlinearity)."""
    return ConvBN(in_channels, out_channels, 3, stride=stride, padding=1, nonlinear=nonlinear)
