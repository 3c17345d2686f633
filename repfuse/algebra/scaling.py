"""Per-channel affine maps on the output: scale, shift, negate."""

from __future__ import annotations

from torch import Tensor

from repfuse.algebra.affine import WORK_DTYPE, AffineConv, shapes_only
from repfuse.errors import NotFusable


def _channel_vector(value, channels: int, what: str, device) -> Tensor | float:
    """A python number, or a float64 (C,) tensor from a scalar / per-channel tensor."""
    if not isinstance(value, Tensor):
        return float(value)
    if not value.is_floating_point():
        value = value.to(WORK_DTYPE)
    flat = value.to(WORK_DTYPE).reshape(-1)
    if flat.numel() == 1:
        return flat.reshape(()).expand(channels)
    if flat.numel() != channels or sum(s != 1 for s in value.shape) > 1:
        raise NotFusable(f"{what} of shape {list(value.shape)} is neither a scalar nor "
                         f"per-channel for {channels} channels")
    return flat.to(device)


def affine_channels(conv: AffineConv, scale, shift=0.0) -> AffineConv:
    """y -> scale * y + shift per output channel (scalars or (C,) tensors)."""
    o = conv.out_channels
    scale = _channel_vector(scale, o, "scale", conv.device)
    shift = _channel_vector(shift, o, "shift", conv.device)
    if shapes_only(conv.weight):
        return conv         # the same shapes
    if isinstance(scale, Tensor) and conv.spec.transposed:
        from repfuse.algebra.transposed import scale_outputs

        weight = scale_outputs(conv, scale)
    elif isinstance(scale, Tensor):
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    else:
        weight = conv.weight * scale
    bias = conv.bias * scale + shift
    return conv.replace(weight=weight, bias=bias)


def scale(conv: AffineConv, factor) -> AffineConv:
    """factor * conv(x) with a scalar or a per-channel factor (LayerScale, gamma)."""
    return affine_channels(conv, factor, 0.0)


def shift(conv: AffineConv, value) -> AffineConv:
    """conv(x) + value with a scalar or a per-channel value."""
    return affine_channels(conv, 1.0, value)


def negate(conv: AffineConv) -> AffineConv:
    """-conv(x)."""
    return conv.replace(weight=-conv.weight, bias=-conv.bias)
