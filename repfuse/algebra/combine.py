"""Parallel combinations of branches that read the same input: sum, difference, concat."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

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


def add(*convs: AffineConv, writable=None) -> AffineConv:
    """The sum of branches: kernels embedded into a common geometry (when their output grids
    align), groups reduced to the largest common one (grouped + dense is dense).

    ``writable(tensor) -> bool`` says whether the caller lets the sum be written into a
    branch's kernel (one nothing else reads; a reducer's intermediate): the base branch's
    kernel is then not copied (a kernel-sized copy fewer per sum; with autograd, the
    kernel's history moves to the sum). By default nothing is written."""
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
    meta = shapes_only(first.weight)    # shapes only: the same checks, no arithmetic
    bias, placed, scattered = first.bias, [], []
    for k, c in enumerate(convs):
        if k == base:
            continue
        taps = _tap_slices(c.spec, target) if c.spec.groups == groups else None
        if taps is not None:    # same groups, taps on a regular grid: added on a slice
            placed.append((c.weight, taps))
        else:
            scattered.append(c)
        bias = bias if meta else bias + c.bias
    weight, into = first.weight, False
    if not meta:
        into = writable is not None and writable(weight) and not _shares_memory(
            weight, [t for c in convs for t in (c.weight, c.bias) if t is not weight])
        weight = _AddOnTaps.apply(weight, into, [t for _, t in placed],
                                  *(w for w, _ in placed))
    for c in scattered:
        if c.spec.transposed:
            embedded = regroup(embed_kernel(c, target), groups).weight
            weight = weight if meta else weight + embedded
        elif not meta:
            index = tuple(t.to(c.weight.device) for t in scatter_index(c.spec, target))
            weight = weight.clone() if weight is first.weight and not into else weight
            weight.index_put_(index, c.weight, accumulate=True)
    return first.replace(weight=weight, bias=bias,
                         dtype=promote_dtypes(*(c.dtype for c in convs)))


def _shares_memory(t: torch.Tensor, others) -> bool:
    memory = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == memory for o in others)


class _AddOnTaps(torch.autograd.Function):
    """``big`` with each small kernel added on its taps (slices of the kernel axes), in one
    copy of ``big`` (its memory format kept), or in ``big`` itself where ``into`` says the
    caller gave it up (``add``'s ``writable``). The backward gives ``big`` the incoming
    gradient itself and each small kernel its slice of it: no kernel-sized work. Autograd
    through the same sum written with ``F.pad`` (a padded copy of each small kernel, then an
    out-of-place add) or with slice adds into a clone copies and zero-fills the whole
    kernel several times: for the proofs' adjoints of repvgg_b3's 28 regions, 0.65 s of
    forward alone (cProfile, 64x64, two threads)."""

    @staticmethod
    def forward(ctx, big, into, taps, *smalls):
        ctx.taps = taps
        out = big if into else big.clone()
        for small, (rows, cols) in zip(smalls, taps):
            out[:, :, rows, cols] += small
        if into:
            ctx.mark_dirty(big)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        smalls = [grad[:, :, rows, cols].clone() if need else None
                  for (rows, cols), need in zip(ctx.taps, ctx.needs_input_grad[3:])]
        return (grad if ctx.needs_input_grad[0] else None), None, None, *smalls


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
