"""Sequential composition (this conv, then that conv) and constant padding of an output.

then(first(x)) reads ``x`` at ``o * s1 * s2 + j * d2 * s1 + t * d1 - (p2 * s1 + p1)`` for
taps t of ``first`` and j of ``then``: one convolution with stride ``s1 * s2``, whose
kernel is the (strided, dilated) full correlation of the two kernels. It is exact when
``then`` reads no padding, or when the padding ``then`` adds commutes with ``first``:
``first`` has a 1x1 kernel and either maps a zero input to zero (no bias) under zero
padding (its own padding, if any, zero padding too), or is unpadded with stride 1 and
``then`` pads by replication (reflect, replicate, circular).
The padded-with-bias case of DBB (pad with the value ``first`` gives a zero input) is
``pad_output(first, padding, value=first's bias)``, which is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repfuse.algebra.affine import AffineConv, holds, promote_dtypes, shapes_only
from repfuse.algebra.embed import reads_padding, regroup
from repfuse.algebra.scaling import _channel_vector
from repfuse.algebra.transposed import compose_channelwise
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def is_pointwise(spec: ConvSpec) -> bool:
    """Each output reads exactly one input position, with no padding."""
    return spec.kernel_size == (1, 1) and not reads_padding(spec)


def zero_padding_commutes(spec: ConvSpec) -> bool:
    """Zero-padding the output of this conv is zero-padding its input (up to the bias):
    a 1x1 kernel whose own padding, if any, is zero padding."""
    return spec.kernel_size == (1, 1) and (spec.padding_mode == "zeros"
                                           or not reads_padding(spec))


def _bias_is_zero(conv: AffineConv) -> bool:
    return holds(conv.bias.detach() == 0)


def _is_channelwise(spec: ConvSpec) -> bool:
    """Depthwise with one output per input channel (a per-channel filter)."""
    return spec.groups == spec.in_channels == spec.out_channels


def _compose_kernels(first: AffineConv, then: AffineConv, groups: int, rate_a, rate_b):
    """W[o, i, t * ra + j * rb] = sum_m B[o, m, j] A[m, i, t] and the composed bias."""
    wa, wb = first.weight, then.weight
    kh = (wa.shape[2] - 1) * rate_a[0] + (wb.shape[2] - 1) * rate_b[0] + 1
    kw = (wa.shape[3] - 1) * rate_a[1] + (wb.shape[3] - 1) * rate_b[1] + 1
    # bias: b_B + sum_{m, j} B[o, m, j] b_A[m], per group of then
    gb = then.spec.groups
    o, mpg_b = wb.shape[:2]
    bsum = wb.sum((2, 3)).reshape(gb, o // gb, mpg_b)
    bias = then.bias + torch.einsum("gom,gm->go", bsum,
                                    first.bias.reshape(gb, mpg_b)).reshape(o)
    if wa.shape[2:] == (1, 1) and _is_channelwise(first.spec):
        # a per-channel scale (a BN as a conv) first: W[o, m, j] = B[o, m, j] A[m]
        scale = wa.reshape(gb, 1, mpg_b, 1, 1)
        return (wb.reshape(gb, o // gb, mpg_b, *wb.shape[2:]) * scale).reshape(wb.shape), bias
    if wb.shape[2:] == (1, 1):
        # a 1x1 after any conv: W[o, i, t] = sum_m B[o, m] A[m, i, t] within each group
        if gb == 1 and _is_channelwise(first.spec):
            return wb * wa.reshape(1, wa.shape[0], *wa.shape[2:]), bias
        wa, wb = regroup(first, groups).weight, regroup(then, groups).weight
        mpg, ipg = wa.shape[0] // groups, wa.shape[1]
        w = torch.einsum("gom,gmihw->goihw", wb.reshape(groups, o // groups, mpg),
                         wa.reshape(groups, mpg, ipg, *wa.shape[2:]))
        return w.reshape(o, ipg, *wa.shape[2:]), bias
    # the grouped transposed convolutions below are slow for these (a batch of one
    # 1x1 image per output channel in float64), exact for every case
    if _is_channelwise(then.spec):
        # per output channel: W[o, i] = B[o, 0] (*) A[o, i]; keeps first's groups
        w = F.conv_transpose2d(wb.reshape(1, o, *wb.shape[2:]), wa, stride=rate_b,
                               dilation=rate_a, groups=o)
        return w.reshape(o, wa.shape[1], kh, kw), bias
    if _is_channelwise(first.spec) and then.spec.groups == 1:
        # per input channel: W[o, m] = B[o, m] (*) A[m, 0]
        w = F.conv_transpose2d(wb, wa, stride=rate_b, dilation=rate_a, groups=wa.shape[0])
        return w, bias
    # general case, per group, as one grouped transposed convolution of B (batch = outputs
    # per group) with A
    wa, wb = regroup(first, groups).weight, regroup(then, groups).weight
    mpg = wb.shape[1]
    opg = o // groups
    inp = wb.reshape(groups, opg, mpg, *wb.shape[2:]).transpose(0, 1)
    inp = inp.reshape(opg, groups * mpg, *wb.shape[2:])
    w = F.conv_transpose2d(inp, wa, stride=rate_b, dilation=rate_a, groups=groups)
    ipg = wa.shape[1]
    w = w.reshape(opg, groups, ipg, kh, kw).transpose(0, 1).reshape(o, ipg, kh, kw)
    return w, bias


def compose(first: AffineConv, then: AffineConv) -> AffineConv:
    """then(first(x)) as one affine convolution (refused where it would not be exact)."""
    a, b = first.spec, then.spec
    if b.transposed:
        return compose_channelwise(first, then)
    if a.transposed:
        raise NotFusable(f"{then.describe()} after the transposed {first.describe()}: only "
                         "per-channel maps and sums follow a transposed convolution in one "
                         "region")
    if first.out_channels != then.in_channels:
        raise NotFusable(f"{then.describe()} expects {then.in_channels} channels but "
                         f"{first.describe()} produces {first.out_channels}")
    if reads_padding(b):
        if b.padding_mode == "zeros":
            if not zero_padding_commutes(a):
                raise NotFusable(
                    f"{then.describe()} pads (padding {b.padding}) the output of "
                    f"{first.describe()} (padding {a.padding}, {a.padding_mode}), which is "
                    "not pointwise: the padded border is not the first conv applied to a "
                    "padded input; leave these convs unfused")
            if not _bias_is_zero(first):
                raise NotFusable(
                    f"{then.describe()} zero-pads the output of {first.describe()}, which "
                    "has a bias: the bias would pass through the zero padding (exact only in "
                    "the interior); pad with the bias value (BN-and-pad) or drop the padding")
            mode = "zeros"
        else:
            if not is_pointwise(a) or a.stride != (1, 1):
                raise NotFusable(
                    f"{then.describe()} pads by {b.padding_mode!r} the output of "
                    f"{first.describe()} (padding {a.padding}, stride {a.stride}), which is "
                    "not an unpadded pointwise stride-1 conv: not a padding of the input")
            mode = b.padding_mode
    else:
        mode = a.padding_mode
    groups = math.gcd(a.groups, b.groups)
    kernel, stride, dilation, padding, rate_a, rate_b = [], [], [], [], [], []
    for axis in range(2):
        sa, sb = a.stride[axis], b.stride[axis]
        da, db = a.dilation[axis], b.dilation[axis]
        ka, kb = a.kernel_size[axis], b.kernel_size[axis]
        (alo, ahi), (blo, bhi) = a.padding_pairs[axis], b.padding_pairs[axis]
        d = math.gcd(da if ka > 1 else 0, db * sa if kb > 1 else 0) or 1
        rate_a.append(da // d if ka > 1 else 1)
        rate_b.append(db * sa // d if kb > 1 else 1)
        kernel.append((ka - 1) * rate_a[-1] + (kb - 1) * rate_b[-1] + 1)
        stride.append(sa * sb)
        dilation.append(d)
        padding += [blo * sa + alo, bhi * sa + ahi]
    spec = ConvSpec(a.in_channels, b.out_channels, tuple(kernel), tuple(stride),
                    tuple(padding), tuple(dilation), groups, mode)
    if shapes_only(first.weight) or shapes_only(then.weight):
        w, bias = then.weight.new_empty(spec.weight_shape), then.bias.new_empty(spec.out_channels)
    else:
        w, bias = _compose_kernels(first, then, groups, tuple(rate_a), tuple(rate_b))
    return AffineConv(w, bias, spec, promote_dtypes(first.dtype, then.dtype), first.device)


def pad_output(conv: AffineConv, padding, value=0.0, name: str = "pad") -> AffineConv:
    """F.pad(conv(x), padding, value) with a scalar or per-channel ``value``.

    Exact when ``conv`` has a 1x1 kernel (zero-padded if padded) and ``value`` equals its
    bias (the value a zero input gives, DBB's BN-and-pad): the result pads the input with
    zeros instead. ``padding`` is (top, bottom, left, right)."""
    spec = conv.spec
    pad = ConvSpec(1, 1, 1, padding=padding).padding
    if spec.transposed or not zero_padding_commutes(spec):
        raise NotFusable(f"{name}: padding the output of {conv.describe()} (padding "
                         f"{spec.padding}, {spec.padding_mode}) is not a padding of its "
                         "input; leave it unfused")
    v = _channel_vector(value, conv.out_channels, f"{name} value", conv.device)
    vt = v if isinstance(v, torch.Tensor) else torch.full_like(conv.bias, v)
    tol = 64 * torch.finfo(conv.dtype).eps * (1.0 + conv.bias.detach().abs())
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        tol = torch.maximum(tol, 64 * torch.finfo(value.dtype).eps * (1.0 + vt.detach().abs()))
    if not holds((vt.detach() - conv.bias.detach()).abs() <= tol):
        raise NotFusable(f"{name}: pads the output of {conv.describe()} with a value that is "
                         "not the value it gives for a zero input (its bias); the border would "
                         "differ from a padded input, so this is not one convolution")
    sh, sw = spec.stride
    t, b, l, r = pad
    pt, pb, pl, pr = spec.padding
    new = spec.replace(padding=(pt + t * sh, pb + b * sh, pl + l * sw, pr + r * sw),
                       padding_mode="zeros")
    return conv.replace(spec=new)


def crop_output(conv: AffineConv, crop, name: str = "crop") -> AffineConv:
    """``conv(x)[..., t:H-b, l:W-r]`` for ``crop`` = (top, bottom, left, right) >= 0.

    Each output row or column removed moves the first (last) read of the input inward by
    one stride: the padding on that side shrinks by ``stride`` per removed row (exact for
    every padding mode: the rows still read see the same padded values). Where it would
    become negative the reads start inside the input: the kernel gets zero taps on that
    side instead (a whole number of dilation steps, else ``NotFusable``)."""
    spec = conv.spec
    cut = ConvSpec(1, 1, 1, padding=crop).padding   # (GeometryError if negative)
    pads, grow = list(spec.padding), [0, 0, 0, 0]
    for side, (removed, axis) in enumerate(zip(cut, (0, 0, 1, 1))):
        pads[side] -= removed * spec.stride[axis]
        if pads[side] < 0:
            steps, rest = divmod(-pads[side], spec.dilation[axis])
            if rest:
                raise NotFusable(f"{name}: cropping {conv.describe()} starts its reads between "
                                 "two dilated taps; not one convolution")
            grow[side], pads[side] = steps, 0
    weight = conv.weight
    if any(grow):
        weight = F.pad(weight, (grow[2], grow[3], grow[0], grow[1]))
    new = spec.replace(padding=tuple(pads), kernel_size=tuple(weight.shape[2:]))
    return conv.replace(weight=weight, spec=new)
