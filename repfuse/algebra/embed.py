"""Embedding a kernel into a larger (or differently dilated) one, and regrouping.

A branch can be rewritten with another kernel geometry exactly when both produce the
same output grid (``ConvSpec.aligned_with``) and every tap of the branch reads an input
offset that is also a tap of the target geometry (``ConvSpec.tap_offsets``); the other
taps of the target get zero weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from repfuse.algebra.affine import AffineConv, shapes_only
from repfuse.algebra.transposed import common_padding
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


def reads_padding(spec: ConvSpec) -> bool:
    """Whether some output position of ``spec`` reads the padded border."""
    return max(spec.padding) > 0


def merged_padding_mode(specs: list[ConvSpec]) -> str:
    """The padding mode of a sum of branches: the mode of the branches that read padding."""
    modes = {s.padding_mode for s in specs if reads_padding(s)}
    if len(modes) > 1:
        raise NotFusable("branches pad their input differently (padding_mode "
                         + ", ".join(sorted(modes)) + "); the sum is not one convolution")
    return modes.pop() if modes else "zeros"


def check_aligned(specs: list[ConvSpec], what: str = "branches") -> None:
    """Refuse unless all specs have the same input channels and output grid."""
    first = specs[0]
    for other in specs[1:]:
        if other.in_channels != first.in_channels:
            raise NotFusable(f"{what} read different channel counts ({first.in_channels} for "
                             f"{first.describe()}, {other.in_channels} for {other.describe()})")
        if not first.aligned_with(other):
            raise NotFusable(
                f"{what} {first.describe()} (padding {first.padding}) and {other.describe()} "
                f"(padding {other.padding}) produce different output grids (stride or "
                "centre offset differ); they cannot be summed into one convolution")


def common_geometry(specs: list[ConvSpec]) -> ConvSpec:
    """The smallest geometry every spec embeds into (same stride and output grid).

    Per axis: dilation is the gcd of the branch dilations, and the taps span from the
    lowest to the highest input offset read by any branch."""
    check_aligned(specs)
    first = specs[0]
    kernel, dilation, padding, output_padding = [], [], [], []
    for axis in range(2):
        offsets = [s.tap_offsets(axis) for s in specs]
        lo = min(o[0] for o in offsets)
        hi = max(o[-1] for o in offsets)
        d = 0
        for s, offs in zip(specs, offsets):
            d = math.gcd(d, offs[0] - lo)
            if len(offs) > 1:
                d = math.gcd(d, s.dilation[axis])
        d = d or 1
        for s, offs in zip(specs, offsets):
            if any((o - lo) % d for o in offs):  # cannot happen by construction of d
                raise NotFusable(f"{s.describe()} taps {list(offs)} off the common grid")
        kernel.append((hi - lo) // d + 1)
        dilation.append(d)
        if first.transposed:
            pad_hi, extra = common_padding(specs, axis)
        else:
            pad_hi, extra = max(s.padding_pairs[axis][1] for s in specs), 0
        padding += [-lo, pad_hi]
        output_padding.append(extra)
    try:
        return first.replace(kernel_size=tuple(kernel), dilation=tuple(dilation),
                             padding=tuple(padding), padding_mode=merged_padding_mode(specs),
                             output_padding=tuple(output_padding))
    except ValueError as err:
        raise NotFusable(f"the branches {', '.join(s.describe() for s in specs)} have no "
                         f"common geometry ({err})") from err


def embed_kernel(conv: AffineConv, target: ConvSpec) -> AffineConv:
    """``conv`` rewritten with the kernel size, dilation and padding of ``target``.

    Exact: refused unless ``target`` produces the same output grid and every tap of
    ``conv`` is a tap of ``target``."""
    src = conv.spec
    if target.stride != src.stride:
        check_embeddable(src, target)
    target = src.replace(kernel_size=target.kernel_size, dilation=target.dilation,
                         padding=target.padding, padding_mode=target.padding_mode,
                         output_padding=target.output_padding)
    if target == src:
        return conv
    check_embeddable(src, target)
    index = [tap_index(src, target, axis) for axis in range(2)]
    th, tw = target.kernel_size
    w = conv.weight
    if shapes_only(w):
        return conv.replace(weight=w.new_empty(target.weight_shape), spec=target)
    for axis, (idx, size) in enumerate(zip(index, (th, tw))):
        start = idx[0]
        if idx == list(range(start, start + len(idx))):  # contiguous: a plain zero pad
            pad = [0, 0, 0, 0]
            pad[2 * (1 - axis)] = start
            pad[2 * (1 - axis) + 1] = size - start - len(idx)
            w = F.pad(w, pad)
        else:
            shape = list(w.shape)
            shape[2 + axis] = size
            w = w.new_zeros(shape).index_copy(2 + axis, torch.tensor(idx, device=w.device), w)
    return conv.replace(weight=w, spec=target)


def tap_index(src: ConvSpec, target: ConvSpec, axis: int) -> list[int]:
    """For each tap of ``src`` along ``axis``, the tap of ``target`` reading the same input
    offset (``ConvSpec.tap_offsets``); refused when ``target`` lacks one."""
    pos = {o: i for i, o in enumerate(target.tap_offsets(axis))}
    missing = [o for o in src.tap_offsets(axis) if o not in pos]
    if missing:
        raise NotFusable(
            f"{src.describe()} reads input offsets {missing} on axis {'HW'[axis]} that "
            f"{target.describe()} (padding {target.padding}) has no tap for")
    return [pos[o] for o in src.tap_offsets(axis)]


def check_embeddable(src: ConvSpec, target: ConvSpec) -> None:
    """Refuse unless ``src`` can be rewritten with ``target``'s geometry exactly."""
    if target.stride != src.stride:
        raise NotFusable(f"{src.describe()} has stride {src.stride}, the target geometry "
                         f"{target.stride}: different output grids")
    check_aligned([src, target], "kernel and target")
    if reads_padding(src) and src.padding_mode != target.padding_mode:
        raise NotFusable(f"{src.describe()} pads with {src.padding_mode!r}, the target "
                         f"geometry with {target.padding_mode!r}")


def scatter_index(src: ConvSpec, target: ConvSpec) -> tuple[Tensor, ...]:
    """Index tensors (o, i, h, w), broadcastable to ``src``'s weight shape, of the entries
    of a ``target``-geometry weight (with ``target.groups``, which must divide
    ``src.groups``) that each weight entry of ``src`` lands on (see ``regroup``)."""
    check_embeddable(src, target)
    g, gt = src.groups, target.groups
    if g % gt:
        raise NotFusable(f"{src.describe()} with groups={g} cannot be written with "
                         f"groups={gt} (it must divide {g})")
    r = g // gt
    o = torch.arange(src.out_channels)
    block = (o // src.out_per_group) % r  # position of the source group in the target group
    col = block[:, None] * src.in_per_group + torch.arange(src.in_per_group)[None, :]
    h = torch.tensor(tap_index(src, target, 0))
    w = torch.tensor(tap_index(src, target, 1))
    return (o[:, None, None, None], col[:, :, None, None], h[None, None, :, None],
            w[None, None, None, :])


def regroup(conv: AffineConv, groups: int) -> AffineConv:
    """``conv`` as a convolution with fewer groups (``groups`` must divide its groups):
    each new group's weight is block diagonal in the old groups. The same for a transposed
    conv: its (I, O/g) weight is grouped by rows as a forward conv's (O, I/g) is."""
    g = conv.spec.groups
    if groups == g:
        return conv
    if groups < 1 or g % groups:
        raise NotFusable(f"{conv.describe()} with groups={g} cannot be written with "
                         f"groups={groups} (it must divide {g})")
    r = g // groups
    o, ipg, kh, kw = conv.weight.shape
    opg = o // g
    if shapes_only(conv.weight):
        w = conv.weight.new_empty((o, r * ipg, kh, kw))
    else:
        w = conv.weight.reshape(groups, r, opg, ipg, kh, kw)
        eye = torch.eye(r, dtype=w.dtype, device=w.device)
        w = torch.einsum("gaoikl,ab->gaobikl", w, eye).reshape(o, r * ipg, kh, kw)
    return conv.replace(weight=w, spec=conv.spec.replace(groups=groups))


def align(convs: list[AffineConv], groups: int | None = None) -> list[AffineConv]:
    """All ``convs`` rewritten with one common geometry and (unless given) the largest
    common number of groups."""
    target = common_geometry([c.spec for c in convs])
    if groups is None:
        groups = 0
        for c in convs:
            groups = math.gcd(groups, c.spec.groups)
        groups = math.gcd(groups, target.out_channels)
        for c in convs:
            groups = math.gcd(groups, c.out_channels)
    return [regroup(embed_kernel(c, target), groups) for c in convs]
