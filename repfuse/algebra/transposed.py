"""Transposed convolutions in the algebra: the operations whose weight layout differs.

A transposed ``AffineConv`` holds torch's weight (I, O/g, KH, KW): input channel ``i``
of group ``i // (I/g)`` writes output channel ``(i // (I/g)) * O/g + o`` through
``weight[i, o]``. Input ``x[h]`` reaches output ``h * stride - pad_lo + k * dilation``
through tap ``k``: the same tap offsets as a forward conv (``ConvSpec.tap_offsets``), so
embedding a kernel into a larger one (a 2x2/s2 deconv into a 4x4/s2 p1 one) and the
common geometry of a sum are the forward conv's (``algebra.embed``); output padding only
lengthens the output, and two branches produce the same output grid when their strides
and ``pad_lo + pad_hi - output_padding - effective kernel`` agree (``ConvSpec.grid_key``).

What differs is done here: scaling output channels (a following BN; regrouping is the
forward conv's, the weight being grouped by rows in both layouts), and a per-channel
affine map *before* the transposed conv (a preceding BN): its scale folds
into the input rows of the weight; its shift is a bias only when every output position
receives every tap (stride 1, padding >= dilation * (kernel - 1) on each side), since
otherwise the outputs of different stride phases and the borders are reached through
different taps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repfuse.algebra.affine import holds, promote_dtypes
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def scale_outputs(conv, scale: Tensor) -> Tensor:
    """The weight of ``conv`` (transposed) with output channel ``o`` multiplied by
    ``scale[o]``."""
    g = conv.spec.groups
    i, opg, kh, kw = conv.weight.shape
    w = conv.weight.reshape(g, i // g, opg, kh, kw) * scale.reshape(g, 1, opg, 1, 1)
    return w.reshape(i, opg, kh, kw)


def shift_passes(spec: ConvSpec) -> bool:
    """Whether a per-channel constant input gives a per-channel constant output: every
    output position receives every tap (stride 1, and per axis ``pad_lo`` and
    ``pad_hi - output_padding`` at least ``dilation * (kernel - 1)``)."""
    if spec.stride != (1, 1):
        return False
    for axis in range(2):
        lo, hi = spec.padding_pairs[axis]
        reach = spec.dilation[axis] * (spec.kernel_size[axis] - 1)
        if lo < reach or hi - spec.output_padding[axis] < reach:
            return False
    return True


def _channelwise(conv) -> bool:
    """A per-channel affine map: 1x1, stride 1, unpadded, one output per input channel."""
    s = conv.spec
    return (not s.transposed and s.kernel_size == (1, 1) and s.stride == (1, 1)
            and max(s.padding) == 0 and s.groups == s.in_channels == s.out_channels)


def compose_channelwise(first, then):
    """then(first(x)) for a per-channel affine ``first`` (a BN, a scale) and a transposed
    ``then`` (see the module docstring for when the shift is exact)."""
    if first.out_channels != then.in_channels:
        raise NotFusable(f"{then.describe()} expects {then.in_channels} channels but "
                         f"{first.describe()} produces {first.out_channels}")
    if not _channelwise(first):
        raise NotFusable(f"{then.describe()} after {first.describe()}: only per-channel "
                         "scales and shifts fold into a transposed convolution")
    scale, shift = first.weight[:, 0, 0, 0], first.bias
    if not shift_passes(then.spec) and not holds(shift.detach() == 0):
        raise NotFusable(
            f"{then.describe()} (padding {then.spec.padding}) after a per-channel shift: "
            "the shift reaches the outputs through a number of taps that differs between "
            "stride phases and at the borders, so it is not a bias (exact only for stride 1 "
            "and padding >= dilation * (kernel - 1))")
    g = then.spec.groups
    i, opg, kh, kw = then.weight.shape
    weight = then.weight * scale.reshape(-1, 1, 1, 1)
    sums = then.weight.reshape(g, i // g, opg, kh * kw).sum(-1)
    bias = then.bias + torch.einsum("gio,gi->go", sums, shift.reshape(g, i // g)).reshape(-1)
    return then.replace(weight=weight, bias=bias,
                        dtype=promote_dtypes(first.dtype, then.dtype))


def common_padding(specs: list[ConvSpec], axis: int) -> tuple[int, int]:
    """(pad_hi, output_padding) of the branches' common geometry on ``axis``: their common
    ``pad_hi - output_padding`` (which fixes the output size), as output padding where it
    is negative."""
    hi = max(s.padding_pairs[axis][1] - s.output_padding[axis] for s in specs)
    return (hi, 0) if hi >= 0 else (0, -hi)
