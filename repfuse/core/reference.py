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


def fold_taps(tap, spec: ConvSpec, n: int, out_hw, input_hw) -> torch.Tensor:
    """Adjoint of ``unfold`` with the columns given per tap: ``tap(i, j, out)`` adds what
    tap (i, j) contributes for every output position into ``out``, a strided view of the
    padded input, (N, C, OH, OW) (NCHW) or (N, OH, OW, C) (NHWC); ``tap(i, j)`` returns
    any tensor of the result's dtype and device. Returns the sum, an input of spatial
    size ``input_hw`` (what lands in the padding is dropped)."""
    (h, w), (oh, ow) = input_hw, out_hw
    t, b, l, r = spec.padding
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    kh, kw = spec.kernel_size
    nchw = spec.layout == "NCHW"
    c = spec.in_channels
    shape = (n, c, h + t + b, w + l + r) if nchw else (n, h + t + b, w + l + r, c)
    buf = None
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
        for j in range(kw):
            cs = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            if buf is None:
                buf = tap(i, j).new_zeros(shape)
            tap(i, j, buf[:, :, rows, cs] if nchw else buf[:, rows, cs, :])
    if nchw:
        return buf[:, :, t:t + h, l:l + w]
    return buf[:, t:t + h, l:l + w, :]


def fold(cols: torch.Tensor, spec: ConvSpec, input_hw) -> torch.Tensor:
    """Adjoint of ``unfold``: sums the grouped unfold-shaped ``cols`` into an input of
    spatial size ``input_hw`` (in ``spec.layout``), dropping what lands in the padding."""
    nchw = spec.layout == "NCHW"
    n = cols.shape[0]
    oh, ow = (cols.shape[5], cols.shape[6]) if nchw else (cols.shape[1], cols.shape[2])

    def tap(i, j, out=None):
        c = cols[:, :, :, i, j]
        c = c.reshape(n, -1, oh, ow) if nchw else c.reshape(n, oh, ow, -1)
        return c if out is None else out.add_(c)

    return fold_taps(tap, spec, n, (oh, ow), input_hw)


# ------------------------------------------------------------------ depthwise
# With one input channel per group the GEMMs degenerate into batches of tiny products;
# the depthwise forms below apply the same unfold view tap by tap instead.
def _dw_tap(u: torch.Tensor, spec: ConvSpec, i: int, j: int) -> torch.Tensor:
    """Tap (i, j) of the unfold view, shaped to broadcast against the grouped output
    (N, g, 1, OH, OW) (NCHW) / (N, OH, OW, g, 1) (NHWC)."""
    if spec.layout == "NCHW":
        return u[:, :, :, i, j]
    return u[:, :, :, i, j, :, :]


def _dw_weight(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """(g, O/g, KH, KW) view of a depthwise weight; its tap (i, j) is reshaped to
    broadcast against the grouped output."""
    return weight.reshape(spec.groups, spec.out_per_group, *spec.kernel_size)


def _dw_w(w4: torch.Tensor, spec: ConvSpec, i: int, j: int) -> torch.Tensor:
    wt = w4[:, :, i, j]
    return wt.reshape(1, *wt.shape, 1, 1) if spec.layout == "NCHW" else wt


def _grouped_out(t: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """An output-shaped tensor as (N, g, O/g, OH, OW) / (N, OH, OW, g, O/g)."""
    g, og = spec.groups, spec.out_per_group
    if spec.layout == "NCHW":
        return t.reshape(t.shape[0], g, og, t.shape[2], t.shape[3])
    return t.reshape(*t.shape[:3], g, og)


def _dw_conv2d(x, weight, spec: ConvSpec) -> torch.Tensor:
    u, w4 = unfold(x, spec), _dw_weight(weight, spec)
    y = None
    for i in range(spec.kernel_size[0]):
        for j in range(spec.kernel_size[1]):
            ut, wt = _dw_tap(u, spec, i, j), _dw_w(w4, spec, i, j)
            y = ut * wt if y is None else y.addcmul_(ut, wt)
    if spec.layout == "NCHW":
        return y.reshape(y.shape[0], -1, y.shape[3], y.shape[4])
    return y.reshape(*y.shape[:3], -1)


def _dw_conv2d_input(n, hw, weight, grad_output, spec: ConvSpec) -> torch.Tensor:
    go, w4 = _grouped_out(grad_output, spec), _dw_weight(weight, spec)
    red = 2 if spec.layout == "NCHW" else 4
    out_hw = spatial_size(grad_output, spec.layout)

    def tap(i, j, out=None):
        wt = _dw_w(w4, spec, i, j)
        if out is None:
            return wt
        if spec.out_per_group == 1:
            return out.addcmul_(go.select(red, 0), wt.select(2 if red == 2 else 1, 0))
        return out.add_((go * wt).sum(red))

    return fold_taps(tap, spec, n, out_hw, hw)


def _dw_conv2d_weight(x, weight_size, grad_output, spec: ConvSpec) -> torch.Tensor:
    u, go = unfold(x, spec), _grouped_out(grad_output, spec)
    dims = (0, 3, 4) if spec.layout == "NCHW" else (0, 1, 2)
    kh, kw = spec.kernel_size
    taps = [(go * _dw_tap(u, spec, i, j)).sum(dims) for i in range(kh) for j in range(kw)]
    gw = torch.stack(taps, -1).reshape(spec.groups, spec.out_per_group, kh, kw)
    return gw.reshape(tuple(weight_size))


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
    if spec.in_per_group == 1 and g > 1:
        y = _dw_conv2d(x, weight, spec)
        return y if bias is None else y + (bias.view(1, o, 1, 1) if spec.layout == "NCHW"
                                           else bias)
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
    if spec.in_per_group == 1 and g > 1:
        return _dw_conv2d_input(n, (h, w), weight, grad_output, spec)
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
    if spec.in_per_group == 1 and spec.groups > 1:
        return _dw_conv2d_weight(x, weight_size, grad_output, spec)
    go = _go(grad_output, spec)
    if spec.layout == "NCHW":
        # one GEMM per (sample, group), summed over the batch
        gw = torch.matmul(go, _rows(x, spec).transpose(-1, -2)).sum(0)
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
