"""Convolution kernels on torch's native (aten) operators.

Inputs are NCHW tensors (an NHWC activation arrives as a channels_last NCHW view, so
aten's channels_last kernels run without copies), torch weight layout, and a ``ConvSpec``
with layout NCHW. Padding that torch's operators cannot express (different on opposite
sides) is split into a symmetric part passed to the operator and an explicit rest:
padded input for the forward and weight gradient, cropped result for the input gradient;
for transposed convolutions the roles swap (the padding crops the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repfuse.core.layout import split_padding
from repfuse.core.spec import ConvSpec

_aten_backward = torch.ops.aten.convolution_backward


def _pad_extra(x: torch.Tensor, extra) -> torch.Tensor:
    t, b, l, r = extra
    if t == b == l == r == 0:
        return x
    return F.pad(x, (l, r, t, b))


def _crop(y: torch.Tensor, extra) -> torch.Tensor:
    t, b, l, r = extra
    if t == b == l == r == 0:
        return y
    return y[:, :, t:y.shape[2] - b, l:y.shape[3] - r]


def _dummy(like: torch.Tensor, size, channels_last: bool) -> torch.Tensor:
    """A tensor of ``size`` whose values are never read (only shape and memory format)."""
    if channels_last:
        return torch.empty(size, dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last)
    return like.new_empty(1).expand(size)


def _is_cl(x: torch.Tensor) -> bool:
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ convolution
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           spec: ConvSpec) -> torch.Tensor:
    """Forward convolution: (N, C, H, W) -> (N, O, OH, OW)."""
    sym, extra = split_padding(spec)
    x = _pad_extra(x, extra)
    if bias is not None and not x.is_contiguous():
        # oneDNN's channels_last convolution with a bias can crash (segfault) on CPU when
        # an output window lies entirely in the padding; add the bias separately.
        y = F.conv2d(x, weight, None, spec.stride, sym, spec.dilation, spec.groups)
        return y.add_(bias.view(1, -1, 1, 1))
    return F.conv2d(x, weight, bias, spec.stride, sym, spec.dilation, spec.groups)


def conv2d_input(input_size, weight: torch.Tensor, grad_output: torch.Tensor,
                 spec: ConvSpec) -> torch.Tensor:
    """Gradient of the forward convolution with respect to its input of ``input_size``
    (N, C, H, W)."""
    sym, extra = split_padding(spec)
    n, c, h, w = input_size
    t, b, l, r = extra
    size = (n, c, h + t + b, w + l + r)
    dummy = _dummy(grad_output, size, _is_cl(grad_output))
    gi = _aten_backward(grad_output, dummy, weight, None, spec.stride, sym, spec.dilation,
                        False, (0, 0), spec.groups, (True, False, False))[0]
    return _crop(gi, extra)


def conv2d_weight(x: torch.Tensor, weight_size, grad_output: torch.Tensor,
                  spec: ConvSpec) -> torch.Tensor:
    """Gradient of the forward convolution with respect to its weight of ``weight_size``
    (torch layout)."""
    sym, extra = split_padding(spec)
    dummy = grad_output.new_empty(1).expand(tuple(weight_size))
    return _aten_backward(grad_output, _pad_extra(x, extra), dummy, None, spec.stride, sym,
                          spec.dilation, False, (0, 0), spec.groups,
                          (False, True, False))[1]


# ------------------------------------------------------------------ transposed
def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     spec: ConvSpec) -> torch.Tensor:
    """Transposed convolution: (N, I, H, W) -> (N, O, OH, OW); ``weight`` (I, O/g, KH, KW)."""
    sym, extra = split_padding(spec)
    split_bias = bias is not None and not x.is_contiguous()  # see conv2d
    y = F.conv_transpose2d(x, weight, None if split_bias else bias, spec.stride, sym,
                           spec.output_padding, spec.groups, spec.dilation)
    if split_bias:
        y = y.add_(bias.view(1, -1, 1, 1))
    return _crop(y, extra)


def _grad_full(grad_output: torch.Tensor, spec: ConvSpec):
    """The transposed convolution's output gradient before its extra per-side crop."""
    sym, extra = split_padding(spec)
    return _pad_extra(grad_output, extra), sym


def conv_transpose2d_input(input_size, weight: torch.Tensor, grad_output: torch.Tensor,
                           spec: ConvSpec) -> torch.Tensor:
    """Gradient of the transposed convolution with respect to its input of ``input_size``."""
    go, sym = _grad_full(grad_output, spec)
    dummy = _dummy(go, tuple(input_size), _is_cl(go))
    return _aten_backward(go, dummy, weight, None, spec.stride, sym, spec.dilation, True,
                          spec.output_padding, spec.groups, (True, False, False))[0]


def conv_transpose2d_weight(x: torch.Tensor, weight_size, grad_output: torch.Tensor,
                            spec: ConvSpec) -> torch.Tensor:
    """Gradient of the transposed convolution with respect to its weight (I, O/g, KH, KW)."""
    go, sym = _grad_full(grad_output, spec)
    dummy = go.new_empty(1).expand(tuple(weight_size))
    return _aten_backward(go, x, dummy, None, spec.stride, sym, spec.dilation, True,
                          spec.output_padding, spec.groups, (False, True, False))[1]
