"""RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).

Training form only: each block sums a 3x3 conv+BN, a 1x1 conv+BN and, where shapes
allow, a BN identity branch, then applies ReLU. Module and parameter names follow the
reference implementation (DingXiaoH/RepVGG): ``stage0`` ... ``stage4``, blocks with
``rbr_dense`` / ``rbr_1x1`` (each ``.conv``, ``.bn``) and ``rbr_identity``, head
``linear``; its training checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.layers import StagedClassifier, conv_bn
from repfuse.models.registry import register_variants

# Layers (counted from 1 = first block of stage1) that the g2 / g4 variants make grouped.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ BN identity when ``in == out`` and stride 1), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, groups: int = 1):
        super().__init__()
        if padding != kernel_size // 2:
            raise ValueError(f"RepVGGBlock needs padding == kernel_size // 2, got "
                             f"padding={padding}, kernel_size={kernel_size}")
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = (nn.BatchNorm2d(in_channels)
                             if in_channels == out_channels and stride == 1 else None)
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                 groups=groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


class RepVGG(StagedClassifier):
    """RepVGG backbone and classifier: ``stage0`` (one stride-2 block), four stages whose
    first block has stride 2, global average pool ``gap``, head ``linear``."""

    def __init__(self, num_blocks: tuple[int, ...], width_multiplier: tuple[float, ...],
                 num_classes: int = 1000, groups_map: dict[int, int] | None = None):
        super().__init__()
        if len(num_blocks) != 4 or len(width_multiplier) != 4:
            raise ValueError("RepVGG needs 4 stage depths and 4 width multipliers")
        groups_map = dict(groups_map or {})
        if 0 in groups_map:
            raise ValueError("RepVGG stage0 (layer 0) cannot be grouped")
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(3, self.in_planes, 3, stride=2, padding=1)
        layer = 1
        stages = []
        for base, depth, width in zip((64, 128, 256, 512), num_blocks, width_multiplier):
            planes = int(base * width)
            blocks = []
            for i in range(depth):
                blocks.append(RepVGGBlock(self.in_planes, planes, 3, stride=2 if i == 0 else 1,
                                          padding=1, groups=groups_map.get(layer, 1)))
                self.in_planes = planes
                layer += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)



_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)

# name: (blocks per stage, width multipliers, groups of the GROUPWISE_LAYERS)
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[float, ...], int]] = {
    "repvgg_a0": (_A, (0.75, 0.75, 0.75, 2.5), 1),
    "repvgg_a1": (_A, (1, 1, 1, 2.5), 1),
    "repvgg_a2": (_A, (1.5, 1.5, 1.5, 2.75), 1),
    "repvgg_b0": (_B, (1, 1, 1, 2.5), 1),
    "repvgg_b1": (_B, (2, 2, 2, 4), 1),
    "repvgg_b1g2": (_B, (2, 2, 2, 4), 2),
    "repvgg_b1g4": (_B, (2, 2, 2, 4), 4),
    "repvgg_b2": (_B, (2.5, 2.5, 2.5, 5), 1),
    "repvgg_b2g4": (_B, (2.5, 2.5, 2.5, 5), 4),
    "repvgg_b3": (_B, (3, 3, 3, 5), 1),
    "repvgg_b3g4": (_B, (3, 3, 3, 5), 4),
}


def repvgg(variant: str, num_classes: int = 1000) -> RepVGG:
    """Build a RepVGG variant by its registered name (e.g. ``"repvgg_b1g4"``)."""
    num_blocks, widths, groups = VARIANTS[variant]
    groups_map = {layer: groups for layer in GROUPWISE_LAYERS} if groups > 1 else None
    return RepVGG(num_blocks, widths, num_classes=num_classes, groups_map=groups_map)


register_variants(repvgg, VARIANTS, "RepVGG {} (training form).")
