"""Batch normalisation (eval mode, running statistics) as affine-conv operations."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from repfuse.algebra.affine import WORK_DTYPE, AffineConv, shapes_only
from repfuse.algebra.identity import identity_conv
from repfuse.algebra.scaling import affine_channels
from repfuse.errors import NotFusable


def bn_scale_shift(running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None, bias: Tensor | None, eps: float,
                   name: str = "BatchNorm") -> tuple[Tensor, Tensor]:
    """(scale, shift) in float64 such that bn(x) = scale * x + shift per channel."""
    if running_mean is None or running_var is None:
        raise NotFusable(f"{name} has no running statistics (track_running_stats=False): its "
                         "output depends on the batch, so it cannot be folded; keep it")
    if shapes_only(running_mean):
        empty = running_mean.new_empty(running_mean.shape, dtype=WORK_DTYPE)
        return empty, empty
    mean = running_mean.to(WORK_DTYPE)
    inv_std = torch.rsqrt(running_var.to(WORK_DTYPE) + float(eps))
    scale = inv_std if weight is None else weight.to(WORK_DTYPE) * inv_std
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(WORK_DTYPE)
    return scale, shift


def _bn_args(bn: nn.Module) -> tuple:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise NotFusable(f"{type(bn).__name__} is not a batch norm")
    if not bn.track_running_stats or bn.running_mean is None:
        raise NotFusable(f"{type(bn).__name__}(track_running_stats=False) has no running "
                         "statistics: it cannot be folded; keep it")
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


def fold_bn(conv: AffineConv, running_mean: Tensor | None, running_var: Tensor | None,
            weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
            name: str = "BatchNorm") -> AffineConv:
    """bn(conv(x)): fold a following eval-mode batch norm (affine or not) into ``conv``."""
    scale, shift = bn_scale_shift(running_mean, running_var, weight, bias, eps, name)
    if scale.numel() != conv.out_channels:
        raise NotFusable(f"{name} has {scale.numel()} channels but follows "
                         f"{conv.describe()} with {conv.out_channels} output channels")
    return affine_channels(conv, scale, shift)


def fold_bn_module(conv: AffineConv, bn: nn.Module) -> AffineConv:
    """bn(conv(x)) for an ``nn.BatchNorm2d`` module ``bn`` (eval statistics)."""
    return fold_bn(conv, *_bn_args(bn), name=type(bn).__name__)


def bn_conv(running_mean: Tensor | None, running_var: Tensor | None,
            weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
            kernel_size=1, groups: int | None = None, dilation=1,
            dtype: torch.dtype | None = None, name: str = "BatchNorm") -> AffineConv:
    """A batch norm on its own as an (identity) conv with the given geometry."""
    if running_mean is None:
        raise NotFusable(f"{name} has no running statistics (track_running_stats=False): its "
                         "output depends on the batch, so it cannot be folded; keep it")
    channels = running_mean.numel()
    if dtype is None:
        ref = weight if weight is not None else running_mean
        dtype = ref.dtype
    ident = identity_conv(channels, kernel_size, groups=groups, dilation=dilation, dtype=dtype,
                          device=running_mean.device)
    return fold_bn(ident, running_mean, running_var, weight, bias, eps, name)


def bn_module_conv(bn: nn.Module, **geometry) -> AffineConv:
    """An ``nn.BatchNorm2d`` module on its own as an identity conv (see ``bn_conv``)."""
    return bn_conv(*_bn_args(bn), name=type(bn).__name__, **geometry)


def fold_preceding_bn(conv: AffineConv, running_mean: Tensor | None,
                      running_var: Tensor | None, weight: Tensor | None = None,
                      bias: Tensor | None = None, eps: float = 1e-5,
                      name: str = "BatchNorm") -> AffineConv:
    """conv(bn(x)): fold a preceding batch norm into ``conv``.

    Exact only when the conv reads no zero padding (the BN's shift would have to pass
    through the padded border, where the conv sees zeros, not the shift); refused otherwise.
    """
    from repfuse.algebra.sequential import compose

    first = bn_conv(running_mean, running_var, weight, bias, eps, dtype=conv.dtype, name=name)
    return compose(first, conv)
