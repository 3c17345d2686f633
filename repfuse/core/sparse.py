"""Sparse weight update: the weight gradient of a subset of input channels only.

``conv2d_weight(..., in_channels=sel)`` computes only the part of the weight gradient
that touches the selected input channels, reading only those channels of the input
(``index_select`` first), so time and memory are proportional to ``k = len(sel)``.

Shapes of the result (Cg = C / groups input channels and Og = O / groups output
channels per group; channel ``c`` lies in group ``c // Cg`` at position ``c % Cg``):

* groups=1: the gradient of ``weight[:, sel]``, shape (O, k, KH, KW).
* depthwise (groups = C > 1, channel multiplier m = O / C): the output channels of
  input channel ``c`` are ``c*m .. c*m + m - 1``, so the selected weight rows are
  ``weight[(sel[:, None] * m + arange(m)).flatten()]`` and the result is their
  gradient, shape (k*m, 1, KH, KW) (``weight[sel]`` when m = 1).
* other groups: shape (Og, k, KH, KW); entry ``[:, t]`` is the gradient of
  ``weight[grp*Og:(grp+1)*Og, c % Cg]`` with ``c = sel[t]`` and ``grp = c // Cg``
  (this reduces to the groups=1 case when groups=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from repfuse.core.grouped import conv2d_weight_grouped
from repfuse.core.layout import compute_dtype
from repfuse.core.masked import gather_patches, patch_taps
from repfuse.core.native import conv2d_weight as native_conv2d_weight
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError

ALGORITHMS = ("auto", "native", "grouped", "reference")


def channel_index(in_channels, c: int, device=None) -> torch.Tensor:
    """``in_channels`` (slice, int sequence, integer or bool tensor) as a 1-D int64
    index tensor into ``c`` channels; raises ``GeometryError`` naming ``in_channels``."""
    if isinstance(in_channels, slice):
        return torch.arange(c, device=device)[in_channels]
    if isinstance(in_channels, torch.Tensor):
        idx = in_channels
    elif isinstance(in_channels, Sequence) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in in_channels):
        idx = torch.tensor(list(in_channels), dtype=torch.long)
    else:
        raise GeometryError(f"in_channels={in_channels!r} must be a slice, a sequence of "
                            "ints or an index tensor")
    if idx.dtype == torch.bool:
        if idx.shape != (c,):
            raise GeometryError(
                f"in_channels is a bool mask of shape {list(idx.shape)}, expected [{c}]")
        idx = idx.nonzero().flatten()
    if idx.is_floating_point() or idx.is_complex() or idx.dim() != 1:
        raise GeometryError(
            f"in_channels must be a 1-D integer index tensor or a slice, got dtype "
            f"{idx.dtype} and shape {list(idx.shape)}")
    idx = idx.to(device=device, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
        raise GeometryError(
            f"in_channels holds {int(idx.min())}..{int(idx.max())}, outside the input's "
            f"channels 0..{c - 1}")
    return idx


def _reference_weight(x, weight_size, grad_output, spec: ConvSpec) -> torch.Tensor:
    """im2col weight gradient (plain tensor ops, exact in float64)."""
    n, _, h, w = x.shape
    _, _, oh, ow = grad_output.shape
    taps = patch_taps(spec, (h, w), (oh, ow), x.device)
    xp = gather_patches(x, taps)
    xp = torch.where(taps.valid.unsqueeze(1), xp, xp.new_zeros(()))
    g, cg, og = spec.groups, spec.in_per_group, spec.out_per_group
    kh, kw = spec.kernel_size
    dw = torch.einsum("ngopq,ngcpiqj->gocij", grad_output.reshape(n, g, og, oh, ow),
                      xp.reshape(n, g, cg, oh, kh, ow, kw))
    return dw.reshape(tuple(weight_size))


def _native_weight(x, weight_size, grad_output, spec):
    return native_conv2d_weight(x, weight_size, grad_output, spec)


_INNER = {"auto": _native_weight, "native": _native_weight,
          "grouped": conv2d_weight_grouped, "reference": _reference_weight}


def _groups_block(x, grad_output, spec: ConvSpec, sel, groups_sel, inner):
    """Weight gradient (Og, len(sel), KH, KW) of channels ``sel`` that lie in the
    distinct groups ``groups_sel``, the same number of them in each group and ordered
    by group: one call with ``groups = len(groups_sel)``."""
    n, _, oh, ow = grad_output.shape
    kh, kw = spec.kernel_size
    og, u = spec.out_per_group, groups_sel.numel()
    k = sel.numel()
    cd = compute_dtype(x.dtype)
    xs = x.index_select(1, sel).to(cd)
    if u == spec.groups:
        dys = grad_output.to(cd)
    else:
        dys = grad_output.reshape(n, spec.groups, og, oh, ow).index_select(1, groups_sel)
        dys = dys.reshape(n, u * og, oh, ow).to(cd)
    sub = spec.replace(in_channels=k, out_channels=u * og, groups=u)
    dw = inner(xs, (u * og, k // u, kh, kw), dys, sub)
    return dw.reshape(u, og, k // u, kh, kw).transpose(0, 1).reshape(og, k, kh, kw)


def conv2d_weight_sparse(x: torch.Tensor, weight_size, grad_output: torch.Tensor,
                         spec: ConvSpec, in_channels, algorithm: str = "auto") -> torch.Tensor:
    """Weight gradient restricted to the input channels ``in_channels``.

    The selection happens before any conversion: ``x`` and ``grad_output`` come in
    ``spec.layout`` and in their own dtype (float16/bfloat16 accumulate in float32), and
    only the selected slices are permuted/cast.

    Args:
        x: input, (N, C, H, W) or (N, H, W, C) as ``spec.layout`` says; only the selected
            channels are read.
        weight_size: the full weight shape in ``spec.layout`` ((O, C / groups, KH, KW) for
            NCHW, (O, KH, KW, C / groups) for NHWC).
        grad_output: the output gradient, same layout and dtype as ``x``.
        spec: the forward ``ConvSpec`` (zero padding, any geometry and groups).
        in_channels: a slice, an int sequence, or an integer / bool index tensor into C.
        algorithm: "auto" / "native" (aten), "grouped" (the grouped-convolution trick)
            or "reference" (im2col).

    Returns:
        In ``x``'s dtype, torch weight layout: groups=1: (O, k, KH, KW); depthwise:
        (k*m, 1, KH, KW); other groups: (Og, k, KH, KW) (see the module docstring). For
        NHWC the same with the channel axis last: (O, KH, KW, k), (k*m, KH, KW, 1), ...
    """
    if algorithm not in _INNER:
        raise GeometryError(f"algorithm={algorithm!r} is not available for the sparse weight "
                            f"gradient; use one of {', '.join(ALGORITHMS)}")
    inner = _INNER[algorithm]
    spec.check_weight(tuple(weight_size), "weight_size")
    spec.check_grad_output(tuple(x.shape), tuple(grad_output.shape))
    if spec.layout == "NHWC":
        nchw = spec.replace(layout="NCHW")
        gw = conv2d_weight_sparse(x.permute(0, 3, 1, 2), nchw.weight_shape,
                                  grad_output.permute(0, 3, 1, 2), nchw, in_channels,
                                  algorithm)
        return gw.permute(0, 2, 3, 1)
    if spec.padding_mode != "zeros":
        raise GeometryError(f"padding_mode={spec.padding_mode!r}: the sparse weight gradient "
                            "supports only 'zeros'")
    sel = channel_index(in_channels, spec.in_channels, x.device)
    cg, og = spec.in_per_group, spec.out_per_group
    kh, kw = spec.kernel_size
    k = sel.numel()
    if k == 0:
        out = x.new_zeros(og, 0, kh, kw, dtype=compute_dtype(x.dtype))
    else:
        order = torch.argsort(sel // cg, stable=True)
        sorted_sel = sel[order]
        grp, counts = torch.unique_consecutive(sorted_sel // cg, return_counts=True)
        if bool((counts == counts[0]).all()):
            blocks = [_groups_block(x, grad_output, spec, sorted_sel, grp, inner)]
        else:
            starts = torch.cumsum(counts, 0) - counts
            blocks = [_groups_block(x, grad_output, spec, sorted_sel[s:s + m], grp[i:i + 1],
                                    inner)
                      for i, (s, m) in enumerate(zip(starts.tolist(), counts.tolist()))]
        out = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]
        if not bool((order == torch.arange(k, device=order.device)).all()):
            out = out.index_select(1, torch.argsort(order))
    if spec.is_depthwise:
        out = out.transpose(0, 1).reshape(k * og, 1, kh, kw)
    return out.to(x.dtype)
