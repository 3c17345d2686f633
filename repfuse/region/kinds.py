"""The one vocabulary of linear operation kinds, shared by the node types and both front
ends."""

from __future__ import annotations

import enum


class OpKind(str, enum.Enum):
    """The kind of a linear op (the value is the name used in logs and reports)."""

    CONV = "conv"          # a convolution with constant weights
    NORM = "bn"            # an inference-mode normalization with constant statistics
    POOL = "avgpool"       # average pooling
    PAD = "pad"            # constant padding
    CROP = "crop"          # cropping the spatial dimensions (slicing)
    AFFINE = "affine"      # scale, shift or negation by constants
    COMBINE = "combine"    # sum, difference or channel concatenation of branches
    PASS = "pass"          # identity, inference dropout, contiguous / clone
    MODULE = "module"      # (fx) a call of a module whose whole forward is one region

    def __str__(self) -> str:
        return self.value


#: Kinds whose operation is defined by its geometry (a cut there cannot make a refused
#: region exact by splitting the branches: the front ends end the region at such a node).
GEOMETRIC = frozenset({OpKind.POOL, OpKind.PAD, OpKind.CROP})
