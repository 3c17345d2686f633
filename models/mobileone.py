"""MobileOne (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone",
CVPR 2023).

Training form only. Each block sums ``k`` over-parameterized kxk conv+BN branches
(``rbr_conv``), a 1x1 conv+BN scale branch (``rbr_scale``, kxk blocks only) and a BN
skip branch (``rbr_skip``, when shapes allow), then applies the optional
squeeze-and-excitation ``se`` (nonlinear: it stays after fusion) and ReLU
``activation``. A stage block is a depthwise 3x3 block followed by a pointwise 1x1
block. Names follow the reference implementation (apple/ml-mobileone), so its
training checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.layers import SEBlock, StagedClassifier, conv_bn
from repfuse.models.registry import register_variants


class MobileOneBlock(nn.Module):
    """Sum of ``num_conv_branches`` kxk conv+BN, a 1x1 conv+BN (k > 1) and a BN skip
    (``in == out``, stride 1); then ``se`` and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, groups: int = 1, use_se: bool = False,
                 num_conv_branches: int = 1):
        super().__init__()
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = (nn.BatchNorm2d(in_channels)
                         if in_channels == out_channels and stride == 1 else None)
        self.rbr_conv = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
            for _ in range(num_conv_branches))
        self.rbr_scale = (conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
                          if kernel_size > 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rbr_conv[0](x)
        for branch in self.rbr_conv[1:]:
            out = out + branch(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(self.se(out))


class MobileOne(StagedClassifier):
    """MobileOne backbone and classifier: ``stage0`` (3x3 stride-2 block), four stages of
    (depthwise 3x3, pointwise 1x1) block pairs, ``gap``, head ``linear``."""

    def __init__(self, num_blocks_per_stage: tuple[int, ...] = (2, 8, 10, 1),
                 width_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
                 num_classes: int = 1000, use_se: bool = False, num_conv_branches: int = 1):
        super().__init__()
        if len(num_blocks_per_stage) != 4 or len(width_multipliers) != 4:
            raise ValueError("MobileOne needs 4 stage depths and 4 width multipliers")
        self.in_planes = min(64, int(64 * width_multipliers[0]))
        self.stage0 = MobileOneBlock(3, self.in_planes, 3, stride=2, padding=1)
        depths = num_blocks_per_stage
        se_blocks = (0, 0, depths[2] // 2 if use_se else 0, depths[3] if use_se else 0)
        stages = []
        for base, depth, width, n_se in zip((64, 128, 256, 512), depths, width_multipliers,
                                            se_blocks):
            stages.append(self._make_stage(int(base * width), depth, n_se, num_conv_branches))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multipliers[3]), num_classes)

    def _make_stage(self, planes: int, depth: int, num_se_blocks: int,
                    num_conv_branches: int) -> nn.Sequential:
        blocks = []
        for i in range(depth):
            use_se = i >= depth - num_se_blocks
            c = self.in_planes
            blocks.append(MobileOneBlock(c, c, 3, stride=2 if i == 0 else 1, padding=1,
                                         groups=c, use_se=use_se,
                                         num_conv_branches=num_conv_branches))
            blocks.append(MobileOneBlock(c, planes, 1, stride=1, padding=0, groups=1,
                                         use_se=use_se, num_conv_branches=num_conv_branches))
            self.in_planes = planes
        return nn.Sequential(*blocks)



# name: (width multipliers, over-parameterization k, squeeze-and-excitation)
VARIANTS: dict[str, tuple[tuple[float, ...], int, bool]] = {
    "mobileone_s0": ((0.75, 1.0, 1.0, 2.0), 4, False),
    "mobileone_s1": ((1.5, 1.5, 2.0, 2.5), 1, False),
    "mobileone_s2": ((1.5, 2.0, 2.5, 4.0), 1, False),
    "mobileone_s3": ((2.0, 2.5, 3.0, 4.0), 1, False),
    "mobileone_s4": ((3.0, 3.5, 3.5, 4.0), 1, True),
}


def mobileone(variant: str, num_classes: int = 1000) -> MobileOne:
    """Build a MobileOne variant by its registered name (e.g. ``"mobileone_s0"``)."""
    widths, k, use_se = VARIANTS[variant]
    return MobileOne(width_multipliers=widths, num_classes=num_classes, use_se=use_se,
                     num_conv_branches=k)


register_variants(mobileone, VARIANTS, "MobileOne-{} (training form).")
