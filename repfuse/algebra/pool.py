"""Average pooling as a depthwise convolution with constant taps."""

from __future__ import annotations

import torch

from repfuse.algebra.affine import WORK_DTYPE, AffineConv
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def avg_pool_conv(channels: int, kernel_size, stride=None, padding=0, *,
                  count_include_pad: bool = True, ceil_mode: bool = False,
                  divisor_override: int | None = None, dtype: torch.dtype = torch.float32,
                  device=None, name: str = "AvgPool2d") -> AffineConv:
    """``avg_pool2d`` over ``channels`` channels as a depthwise conv.

    Exact when every window is divided by the same number: always with
    ``count_include_pad=True`` (or ``divisor_override``), and with
    ``count_include_pad=False`` only without padding. ``ceil_mode`` is accepted where it
    cannot change the output size (stride 1)."""
    spec = ConvSpec(channels, channels, kernel_size, kernel_size if stride is None else stride,
                    padding, 1, channels)
    if ceil_mode and spec.stride != (1, 1):
        raise NotFusable(f"{name}(ceil_mode=True, stride={spec.stride}): the extra partial "
                         "window depends on the input size and has its own divisor; use "
                         "ceil_mode=False or leave the pool unfused")
    if not count_include_pad and divisor_override is None and max(spec.padding) > 0:
        raise NotFusable(f"{name}(count_include_pad=False, padding={spec.padding}): windows "
                         "touching the padding are divided by fewer taps, which no single "
                         "convolution computes; use count_include_pad=True or padding=0")
    kh, kw = spec.kernel_size
    for axis, k in enumerate(spec.kernel_size):
        lo, hi = spec.padding_pairs[axis]
        if max(lo, hi) > k // 2:
            raise NotFusable(f"{name}: padding {spec.padding} exceeds half the kernel "
                             f"{spec.kernel_size}; torch rejects such a pool")
    divisor = divisor_override if divisor_override else kh * kw
    weight = torch.full(spec.weight_shape, 1.0 / divisor, dtype=WORK_DTYPE, device=device)
    bias = torch.zeros(channels, dtype=WORK_DTYPE, device=device)
    return AffineConv(weight, bias, spec, dtype, device)
