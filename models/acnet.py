"""Asymmetric Convolution Block (Ding et al., "ACNet: Strengthening the Kernel
Skeletons for Powerful CNN via Asymmetric Convolution Blocks", ICCV 2019) and
``acnet_resnet18``.

Training form only: a kxk conv+BN, a kx1 conv+BN and a 1xk conv+BN summed. Names follow
the reference implementation (DingXiaoH/ACNet): ``square_conv`` / ``square_bn``,
``ver_conv`` / ``ver_bn``, ``hor_conv`` / ``hor_bn``.
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.registry import register_model
from repfuse.models.resnet import ResNet


class ACBlock(nn.Module):
    """Square kxk, vertical kx1 and horizontal 1xk conv+BN branches summed, then
    ``nonlinear`` (identity by default). Needs ``padding >= kernel_size // 2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, nonlinear: nn.Module | None = None):
        super().__init__()
        offset = padding - kernel_size // 2
        if offset < 0:
            raise ValueError(f"ACBlock needs padding >= kernel_size // 2, got padding={padding}, "
                             f"kernel_size={kernel_size}")
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        self.square_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=padding, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride=stride,
                                  padding=(padding, offset), groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride=stride,
                                  padding=(offset, padding), groups=groups, bias=False)
        self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.square_bn(self.square_conv(x))
        out = out + self.ver_bn(self.ver_conv(x))
        out = out + self.hor_bn(self.hor_conv(x))
        return self.nonlinear(out)


def acb_conv3x3(in_channels: int, out_channels: int, stride: int,
                nonlinear: nn.Module | None) -> ACBlock:
    """A 3x3 ACB unit for the ResNet skeleton."""
    return ACBlock(in_channels, out_channels, 3, stride=stride, padding=1, nonlinear=nonlinear)


@register_model
def acnet_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 whose 3x3 convs are asymmetric conv blocks (training form)."""
    return ResNet((2, 2, 2, 2), acb_conv3x3, num_classes=num_classes)
