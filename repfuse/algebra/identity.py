"""The identity as an affine convolution, for any groups, kernel size and dilation."""

from __future__ import annotations

import torch

from repfuse.algebra.affine import WORK_DTYPE, AffineConv, shapes_only
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def identity_conv(channels: int, kernel_size=1, *, groups: int | None = None, dilation=1,
                  padding_mode: str = "zeros", dtype: torch.dtype = torch.float32,
                  device=None) -> AffineConv:
    """y = x as a convolution with ``kernel_size``, ``dilation`` and ``groups``
    (default: depthwise, ``groups=channels``).

    The single non-zero tap is the kernel's centre, ``(k - 1) // 2`` on each axis; the
    padding puts that tap on the output position, so even kernels get asymmetric
    padding (one more on the far side)."""
    groups = channels if groups is None else groups
    if channels % groups:
        raise NotFusable(f"identity: groups={groups} does not divide channels={channels}")
    probe = ConvSpec(channels, channels, kernel_size, 1, 0, dilation, groups, padding_mode)
    centre = [(k - 1) // 2 for k in probe.kernel_size]
    padding = []
    for axis in range(2):
        lo = probe.tap_offsets(axis)[centre[axis]]  # unpadded: offset of the centre tap
        padding += [lo, probe.effective_kernel[axis] - 1 - lo]
    spec = probe.replace(padding=(padding[0], padding[1], padding[2], padding[3]))
    ipg = spec.in_per_group
    weight = torch.zeros(spec.weight_shape, dtype=WORK_DTYPE, device=device)
    if not shapes_only(weight):
        index = torch.arange(channels, device=device)
        weight[index, index % ipg, centre[0], centre[1]] = 1.0
    bias = torch.zeros(channels, dtype=WORK_DTYPE, device=device)
    return AffineConv(weight, bias, spec, dtype, device)
