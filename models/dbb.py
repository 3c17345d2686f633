"""Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as
an Inception-like Unit", CVPR 2021) and ``dbb_resnet18``.

Training form only. A DBB sums four branches that all reduce to one kxk conv:

* ``dbb_origin``: kxk conv+BN;
* ``dbb_1x1``: 1x1 conv+BN;
* ``dbb_avg``: 1x1 conv -> BN-and-pad -> kxk average pool -> BN (``avgbn``);
* ``dbb_1x1_kxk``: 1x1 conv (identity-based when channels allow) -> BN-and-pad ->
  kxk conv -> BN.

Names follow the reference implementation (DingXiaoH/DiverseBranchBlock), so its
training checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.layers import BNAndPad, IdentityBasedConv1x1, conv_bn
from repfuse.models.registry import register_model
from repfuse.models.resnet import ResNet


class DiverseBranchBlock(nn.Module):
    """Sum of the four DBB branches, then ``nonlinear`` (identity by default)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, internal_channels_1x1_3x3: int | None = None,
                 nonlinear: nn.Module | None = None):
        super().__init__()
        if padding != kernel_size // 2:
            raise ValueError(f"DiverseBranchBlock needs padding == kernel_size // 2, got "
                             f"padding={padding}, kernel_size={kernel_size}")
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                  groups=groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1,
                                                      groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(padding, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride=stride,
                                                        padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1,
                                                           groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, kernel_size,
                                                       stride=stride, padding=0, groups=groups,
                                                       bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        out = out + self.dbb_1x1_kxk(x)
        return self.nonlinear(out)


def dbb_conv3x3(in_channels: int, out_channels: int, stride: int,
                nonlinear: nn.Module | None) -> DiverseBranchBlock:
    """A 3x3 DBB unit for the ResNet skeleton."""
    return DiverseBranchBlock(in_channels, out_channels, 3, stride=stride, padding=1,
                              nonlinear=nonlinear)


@register_model
def dbb_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 whose 3x3 convs are Diverse Branch Blocks (training form)."""
    return ResNet((2, 2, 2, 2), dbb_conv3x3, num_classes=num_classes)
