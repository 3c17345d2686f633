"""A small UniRepLKNet-style network written the way its repository writes it (own code
reproducing the idiom): the pointwise FFN runs on channels-last maps between two layout
modules, the second Linear is followed by the transpose back, a BatchNorm2d and a layer
scale; blocks sit in a ModuleList per stage.

``MirrorBlock`` is the other order: BatchNorm2d, then the transpose to channels-last, then
the Linear (a ConvNeXt block with a batch norm in place of the layer norm).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NCHWtoNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class NHWCtoNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class GRNwithNHWC(nn.Module):
    """Global response normalization on (N, H, W, C)."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        if self.use_bias:
            return (self.gamma * nx + 1) * x + self.beta
        return (self.gamma * nx + 1) * x


class SEBlock(nn.Module):
    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)
        self.channels = channels
        self.nonlinear = nn.ReLU(inplace=True)

    def forward(self, inputs):
        x = F.adaptive_avg_pool2d(inputs, output_size=(1, 1))
        x = self.up(self.nonlinear(self.down(x)))
        return inputs * torch.sigmoid(x).view(-1, self.channels, 1, 1)


class UniRepLKBlock(nn.Module):
    """dwconv + BN, SE, then the channels-last FFN: permute, Linear, GELU + GRN, Linear,
    permute back, BN; a layer scale and the residual."""

    def __init__(self, dim: int, kernel_size: int = 3, ffn_factor: int = 4,
                 layer_scale: float | None = 1e-6, bias: bool = False):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim,
                                bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, max(dim // 4, 1))
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(NCHWtoNHWC(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRNwithNHWC(ffn_dim))
        self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=bias), NHWCtoNCHW(),
                                     nn.BatchNorm2d(dim))
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) \
            if layer_scale is not None and layer_scale > 0 else None
        self.drop_path = nn.Identity()

    def compute_residual(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return self.drop_path(y)

    def forward(self, inputs):
        return inputs + self.compute_residual(inputs)


class UniRepLKNetSmall(nn.Module):
    """A stem, two stages of blocks (a ModuleList each) with a downsampling conv between,
    a pooled head."""

    def __init__(self, dims=(8, 12), depths=(2, 1), classes: int = 5, **block):
        super().__init__()
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]), nn.GELU()),
            nn.Sequential(nn.Conv2d(dims[0], dims[1], 3, 2, 1), nn.BatchNorm2d(dims[1]))])
        self.stages = nn.ModuleList([
            nn.Sequential(*[UniRepLKBlock(d, **block) for _ in range(n)])
            for d, n in zip(dims, depths)])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(x.mean((2, 3)))


class MirrorBlock(nn.Module):
    """dwconv, BatchNorm2d, permute to channels-last, Linear, GELU, Linear, permute back,
    residual (BN before a Linear folds into it)."""

    def __init__(self, dim: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim, bias=bias)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class MirrorNet(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 2, **block):
        super().__init__()
        self.blocks = nn.ModuleList([MirrorBlock(dim, **block) for _ in range(depth)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class FFNTail(nn.Module):
    """The region alone: Linear on (N, H, W, C), permute to NCHW, BatchNorm2d, layer scale
    (the value the training form gives is a permuted view: channels_last strides)."""

    def __init__(self, ffn_dim: int, dim: int, bias: bool, layer_scale: bool):
        super().__init__()
        self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=bias), NHWCtoNCHW(),
                                     nn.BatchNorm2d(dim))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5) if layer_scale else None

    def forward(self, x):
        y = self.pwconv2(x)
        return y if self.gamma is None else self.gamma.view(1, -1, 1, 1) * y


class MirrorHead(nn.Module):
    """BatchNorm2d, permute to channels-last, Linear (the mirror region alone)."""

    def __init__(self, dim: int, out: int, bias: bool):
        super().__init__()
        self.norm, self.fc = nn.BatchNorm2d(dim), nn.Linear(dim, out, bias=bias)

    def forward(self, x):
        return self.fc(self.norm(x).permute(0, 2, 3, 1))
