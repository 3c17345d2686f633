"""Per-channel affine maps on the output: scale, shift, negate."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from repfuse.algebra.affine import WORK_DTYPE, AffineConv, shapes_only
from repfuse.core.layout import memory_order_flat
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
        weight = scale_rows(conv.weight, scale)
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


def scale_rows(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` (O, ...) times ``scale`` (O,) per output channel, a new tensor in the
    promoted dtype. Differentiable; the gradient of ``scale`` is a row-wise dot product of
    the incoming gradient with ``weight``, where autograd's product would first make their
    kernel-sized elementwise product (for the proofs' adjoints of repvgg_b3's folds, one
    such temporary of up to 141 MB per region)."""
    return _ScaleRows.apply(weight, scale)


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale):
        ctx.save_for_backward(weight, scale)
        return weight * scale.reshape(-1, *(1,) * (weight.dim() - 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        g_weight = g_scale = None
        if ctx.needs_input_grad[0]:
            g_weight = (grad * scale.reshape(-1, *(1,) * (weight.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            g_scale = _row_dots(grad, weight).to(scale.dtype)
        return g_weight, g_scale


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).flatten(1).sum(1)`` as one batched product of the rows, where the two lie
    alike with each row in one block of memory (contiguous, channels-last): no temporary
    of their size."""
    rows = a.shape[0]
    if a.dtype == b.dtype and a.stride() == b.stride() and rows and \
            a.stride(0) == max(a.stride()):
        fa, fb = memory_order_flat(a), memory_order_flat(b)
        if fa._base is not None and fb._base is not None:   # views in memory order
            fa, fb = fa.view(rows, 1, -1), fb.view(rows, -1, 1)
            return torch.bmm(fa, fb).view(rows)
    return (a * b).flatten(1).sum(1)
