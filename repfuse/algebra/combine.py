"""Parallel combinations of branches that read the same input: sum, difference, concat."""

from __future__ import annotations

import torch

from repfuse.algebra.affine import AffineConv, promote_dtypes
from repfuse.algebra.embed import align
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
    if len(outs) > 1:
        raise NotFusable("branches have different output channels "
                         f"({', '.join(f'{c.out_channels} for {c.describe()}' for c in convs)})"
                         "; they cannot be summed")
    parts = align(list(convs))
    weight = parts[0].weight
    bias = parts[0].bias
    for p in parts[1:]:
        weight = weight + p.weight
        bias = bias + p.bias
    return parts[0].replace(weight=weight, bias=bias,
                            dtype=promote_dtypes(*(c.dtype for c in convs)))


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
    parts = align(list(convs), groups=1)
    weight = torch.cat([p.weight for p in parts], 0)
    bias = torch.cat([p.bias for p in parts], 0)
    spec = parts[0].spec.replace(out_channels=int(weight.shape[0]))
    return parts[0].replace(weight=weight, bias=bias, spec=spec,
                            dtype=promote_dtypes(*(c.dtype for c in convs)))
