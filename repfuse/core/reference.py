"""Reference convolution kernels: im2col (NCHW) and im2row (NHWC) in plain tensor ops.

``unfold`` is a strided view of the zero-padded input that holds, for every output
position and tap, the input value the tap reads; every kernel is one GEMM against it
(or its adjoint ``fold``, which scatters per tap with strided slices). Exact in float64
(only sums of products), every variant: groups, stride, per-side padding, dilation,
both layouts, transposed convolutions.

Tensors are in ``spec.layout`` (activations NCHW or NHWC, weights as
``ConvSpec.weight_shape``) and in the compute dtype. Grouped unfold shapes:

* NCHW: (N, g, C/g, KH, KW, OH, OW)
* NHWC: (N, OH, OW, KH, KW, g, C/g)
"""

from __future__ import annotations

import torch

from repfuse.core.layout import (
    fit_transposed_input,
    pad_spatial,
    spatial_size,
    transposed_as_conv,
    weight_from_torch,
    weight_to_torch,
)
from repfuse.core.spec import ConvSpec


def unfold(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The grouped unfold view of ``x`` (a forward convolution's input in ``spec.layout``):
    ``u[..., i, j, oh, ow]`` (NCHW) / ``u[n, oh, ow, i, j, ...]`` (NHWC) is the value tap
    (i, j) reads for output (oh, ow), zero where it reads padding. A view of the padded
    input (no copy beyond the padding)."""
    oh, ow = spec.output_size(spatial_size(x, spec.layout))
    xp = pad_spatial(x, spec.padding, spec.layout)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    kh, kw = spec.kernel_size
    g, cg = spec.groups, spec.in_per_group
    if spec.layout == "NCHW":
        n, c, _, _ = xp.shape
        s_n, s_c, s_h, s_w = xp.stride()
        return xp.as_strided((n, g, cg, kh, kw, oh, ow),
                             (s_n, cg * s_c, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w),
                             xp.storage_offset())
    n, _, _, c = xp.shape
    s_n, s_h, s_w, s_c = xp.stride()
    return xp.as_strided((n, oh, ow, kh, kw, g, cg),
                         (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, cg * s_c, s_c),
                         xp.storage_offset())


def fold(cols: torch.Tensor, spec: ConvSpec, input_hw) -> torch.Tensor:
    """Adjoint of ``unfold``: sums the grouped unfold-shaped ``cols`` into an input of
    spatial size ``input_hw`` (in ``spec.layout``), dropping what lands in the padding."""
    h, w = input_hw
    t, b, l, r = spec.padding
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    kh, kw = spec.kernel_size
    nchw = spec.layout == "NCHW"
    if nchw:
        n, _, _, _, _, oh, ow = cols.shape
        buf = cols.new_zeros(n, spec.in_channels, h + t + b, w + l + r)
    else:
        n, oh, ow = cols.shape[:3]
        buf = cols.new_zeros(n, h + t + b, w + l + r, spec.in_channels)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
        for j in range(kw):
            cs = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            if nchw:
                buf[:, :, rows, cs] += cols[:, :, :, i, j].reshape(n, -1, oh, ow)
            else:
                buf[:, rows, cs, :] += cols[:, :, :, i, j].reshape(n, oh, ow, -1)
    if nchw:
        return buf[:, :, t:t + h, l:l + w]
    return buf[:, t:t + h, l:l + w, :]


def _k(spec: ConvSpec) -> int:
    return spec.in_per_group * spec.kernel_size[0] * spec.kernel_size[1]


def _rows(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The materialised im2col (N, g, K, L) / im2row (g, N*L, K) matrix of ``x``."""
    u = unfold(x, spec)
    if spec.layout == "NCHW":
        n, g = u.shape[:2]
        return u.reshape(n, g, _k(spec), -1)
    return u.permute(5, 0, 1, 2, 3, 4, 6).reshape(spec.groups, -1, _k(spec))


def _go(grad_output: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The output gradient as (N, g, O/g, L) (NCHW) / (g, N*L, O/g) (NHWC)."""
    g, og = spec.groups, spec.out_per_group
    if spec.layout == "NCHW":
        return grad_output.reshape(grad_output.shape[0], g, og, -1)
    return grad_output.reshape(-1, g, og).permute(1, 0, 2)


# ------------------------------------------------------------------ convolution
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           spec: ConvSpec) -> torch.Tensor:
    """Forward convolution in ``spec.layout``."""
    n, _, h, w = spec.check_input(x.shape)
    oh, ow = spec.output_size((h, w))
    g, og, o = spec.groups, spec.out_per_group, spec.out_channels
    wm = weight.reshape(g, og, _k(spec))
    if spec.layout == "NCHW":
        y = torch.matmul(wm, _rows(x, spec)).reshape(n, o, oh, ow)
        return y if bias is None else y + bias.view(1, o, 1, 1)
    y = torch.matmul(_rows(x, spec), wm.transpose(1, 2))
    y = y.permute(1, 0, 2).reshape(n, oh, ow, o)
    return y if bias is None else y + bias


def conv2d_input(input_size, weight: torch.Tensor, grad_output: torch.Tensor,
                 spec: ConvSpec) -> torch.Tensor:
    """Gradient of the forward convolution with respect to its input (col2im / row2im)."""
    n, _, h, w = spec.split_activation_shape(input_size, "input_size")
    oh, ow = spec.output_size((h, w))
    g, og = spec.groups, spec.out_per_group
    kh, kw = spec.kernel_size
    wm = weight.reshape(g, og, _k(spec))
    if spec.layout == "NCHW":
        cols = torch.matmul(wm.transpose(1, 2), _go(grad_output, spec))
        cols = cols.reshape(n, g, spec.in_per_group, kh, kw, oh, ow)
    else:
        cols = torch.matmul(_go(grad_output, spec), wm)
        cols = cols.reshape(g, n, oh, ow, kh, kw, -1).permute(1, 2, 3, 4, 5, 0, 6)
    return fold(cols, spec, (h, w))


def conv2d_weight(x: torch.Tensor, weight_size, grad_output: torch.Tensor,
                  spec: ConvSpec) -> torch.Tensor:
    """Gradient of the forward convolution with respect to its weight (``spec.layout``)."""
    go = _go(grad_output, spec)
    if spec.layout == "NCHW":
        gw = torch.einsum("ngol,ngkl->gok", go, _rows(x, spec))
    else:
        gw = torch.matmul(go.transpose(1, 2), _rows(x, spec))
    return gw.reshape(tuple(weight_size))


# ------------------------------------------------------------------ transposed
def _assoc(spec: ConvSpec, weight: torch.Tensor | None):
    """The convolution whose input gradient is the transposed convolution ``spec``, in
    ``spec.layout``, and ``weight`` re-laid out as that convolution's weight."""
    conv = transposed_as_conv(spec).replace(layout=spec.layout)
    if weight is None:
        return conv, None
    return conv, weight_from_torch(weight_to_torch(weight, spec), conv)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     spec: ConvSpec) -> torch.Tensor:
    """Transposed convolution in ``spec.layout`` (weight as ``spec.weight_shape``)."""
    n, _, h, w = spec.check_input(x.shape)
    oh, ow = spec.output_size((h, w))
    conv, wc = _assoc(spec, weight)
    y = conv2d_input(conv.activation_shape(n, spec.out_channels, oh, ow), wc,
                     fit_transposed_input(x, conv, (oh, ow), spec.layout), conv)
    if bias is None:
        return y
    return y + (bias.view(1, -1, 1, 1) if spec.layout == "NCHW" else bias)


def conv_transpose2d_input(input_size, weight: torch.Tensor, grad_output: torch.Tensor,
                           spec: ConvSpec) -> torch.Tensor:
    """Gradient of the transposed convolution with respect to its input."""
    _, _, h, w = spec.split_activation_shape(input_size, "input_size")
    conv, wc = _assoc(spec, weight)
    gx = conv2d(grad_output, wc, None, conv)
    return gx[:, :, :h, :w] if spec.layout == "NCHW" else gx[:, :h, :w, :]


def conv_transpose2d_weight(x: torch.Tensor, weight_size, grad_output: torch.Tensor,
                            spec: ConvSpec) -> torch.Tensor:
    """Gradient of the transposed convolution with respect to its weight (``spec.layout``)."""
    conv, _ = _assoc(spec, None)
    out_hw = spatial_size(grad_output, spec.layout)
    xf = fit_transposed_input(x, conv, out_hw, spec.layout)
    gw = conv2d_weight(grad_output, conv.weight_shape, xf, conv)
    return weight_from_torch(weight_to_torch(gw, conv), spec)
