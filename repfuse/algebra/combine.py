"""Parallel combinations of branches that read the same input: sum, difference, concat."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repfuse.algebra.affine import AffineConv, promote_dtypes, shapes_only
from repfuse.algebra.embed import (
    align,
    check_embeddable,
    common_geometry,
    embed_kernel,
    regroup,
    scatter_index,
    tap_index,
)
from repfuse.algebra.scaling import negate
from repfuse.errors import NotFusable


def add(*convs: AffineConv) -> AffineConv:
    """The sum of branches: kernels embedded into a common geometry (when their output grids
    align), groups reduced to the largest common one (grouped + dense is dense)."""
    if not convs:
        raise NotFusable("add: no branches")
    if len(convs) == 1:
        return convs[0]
    outs = {c.out_channels for c in convs}
    _same_kind(convs)
    if len(outs) > 1:
        raise NotFusable("branches have different output channels "
                         f"({', '.join(f'{c.out_channels} for {c.describe()}' for c in convs)})"
                         "; they cannot be summed")
    target = common_geometry([c.spec for c in convs])
    groups = 0
    for c in convs:
        groups = math.gcd(groups, c.spec.groups)
    target = target.replace(groups=groups)
    # the base branch already has the target geometry (or is rewritten to it); the others
    # are scatter-added onto the entries they occupy (no dense intermediate per branch)
    base = max(range(len(convs)), key=lambda k: (convs[k].spec.kernel_size == target
                                                  .kernel_size and convs[k].spec.groups
                                                  == groups, convs[k].weight.numel()))
    first = regroup(embed_kernel(convs[base], target), groups)
    weight, bias = None, first.bias
    meta = shapes_only(first.weight)    # shapes only: the same checks, no arithmetic
    for k, c in enumerate(convs):
        if k == base:
            continue
        taps = _tap_slices(c.spec, target) if c.spec.groups == groups else None
        pads = None if meta else _padding_to(taps, first.weight, c.weight)
        if pads is not None:    # differentiated: an out-of-place padded add
            weight = (first.weight if weight is None else weight) + F.pad(c.weight, pads)
        else:
            if weight is None:
                weight = first.weight.clone()
            if taps is not None:  # same groups, taps on a regular grid: a strided slice add
                if not meta:
                    weight[:, :, taps[0], taps[1]] += c.weight
            elif c.spec.transposed:
                embedded = regroup(embed_kernel(c, target), groups).weight
                weight = weight if meta else weight + embedded
            else:
                index = tuple(t.to(c.weight.device) for t in scatter_index(c.spec, target))
                if not meta:
                    weight.index_put_(index, c.weight, accumulate=True)
        bias = bias if meta else bias + c.bias
    return first.replace(weight=weight, bias=bias,
                         dtype=promote_dtypes(*(c.dtype for c in convs)))


def _padding_to(taps, weight: torch.Tensor, small: torch.Tensor) -> tuple | None:
    """``F.pad`` widths that place ``small`` on ``taps`` (unit-step slices) of a kernel
    shaped like ``weight``, where autograd records the sum (grad enabled and a tensor
    requiring grad, both of one dtype); else None. Differentiated, a slice added in place
    costs a backward that copies and zero-fills the whole kernel several times (the
    proofs' adjoint of a 2560x768x3x3 region: 0.27 s of its 0.72 s); the padded sum's
    backward is a slice of the gradient."""
    if taps is None or any(t.step != 1 for t in taps) or weight.dtype != small.dtype or \
            not (torch.is_grad_enabled() and (weight.requires_grad or small.requires_grad)):
        return None
    (top, left), (kh, kw) = (taps[0].start, taps[1].start), weight.shape[2:]
    return (left, kw - taps[1].stop, top, kh - taps[0].stop)


def _tap_slices(src, target) -> tuple[slice, slice] | None:
    """Slices of ``target``'s kernel axes holding ``src``'s taps, when they lie on a regular
    grid (always for one tap, or a dilated kernel embedded into a finer one)."""
    check_embeddable(src, target)
    out = []
    for axis in range(2):
        idx = tap_index(src, target, axis)
        step = idx[1] - idx[0] if len(idx) > 1 else 1
        if step < 1 or idx != list(range(idx[0], idx[0] + step * len(idx), step)):
            return None
        out.append(slice(idx[0], idx[-1] + 1, step))
    return out[0], out[1]


def _same_kind(convs) -> None:
    kinds = {c.spec.transposed for c in convs}
    if len(kinds) > 1:
        raise NotFusable("a transposed convolution combined with a forward one ("
                         + ", ".join(c.describe() for c in convs) + "): different output "
                         "grids; they are not one convolution")


def subtract(left: AffineConv, right: AffineConv) -> AffineConv:
    """left(x) - right(x)."""
    return add(left, negate(right))


def concat(*convs: AffineConv) -> AffineConv:
    """Channel concatenation of branches reading the same input (the result is dense unless
    there is one branch)."""
    if not convs:
        raise NotFusable("concat: no branches")
    if len(convs) == 1:
        return convs[0]
    _same_kind(convs)
    parts = align(list(convs), groups=1)
    weight = torch.cat([p.weight for p in parts], 1 if parts[0].spec.transposed else 0)
    bias = torch.cat([p.bias for p in parts], 0)
    spec = parts[0].spec.replace(out_channels=int(bias.shape[0]))
    return parts[0].replace(weight=weight, bias=bias, spec=spec,
                            dtype=promote_dtypes(*(c.dtype for c in convs)))
