"""Value layouts: how a region value's tensor maps to the canonical (N, C, H, W) view.

A region computes one affine convolution on the *canonical view* of its values; the
model's tensors may be laid out otherwise. Every layout has a rank and a channel axis:

======= ============== ===================== ====================================
layout  tensor         canonical view        used by
======= ============== ===================== ====================================
NCHW    (N, C, H, W)   itself                Conv2d, ConvTranspose2d, BatchNorm2d
NHWC    (N, H, W, C)   permute(0, 3, 1, 2)   Linear on channels-last maps
NCL     (N, C, L)      (N, C, 1, L)          Conv1d, BatchNorm1d on sequences
NLC     (N, L, C)      (N, C, 1, L)          Linear on tokens
NC      (N, C)         (N, C, 1, 1)          Linear, BatchNorm1d on vectors
======= ============== ===================== ====================================

A 1-D sequence is one row (H = 1): a Conv1d is a conv with kernel (1, K), a Linear a 1x1
conv. Swapping the channel axis (NCL <-> NLC, NCHW <-> NHWC) is the identity on the
canonical view. The region input's layout is recorded in its ``Input`` node; every other
value's layout follows from the node types' facts (``Node.out_layout``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from repfuse.algebra.modules import LAYOUT_PERMUTES

#: layout -> (rank, channel axis)
LAYOUTS: dict[str, tuple[int, int]] = {
    "NCHW": (4, 1), "NHWC": (4, 3), "NCL": (3, 1), "NLC": (3, 2), "NC": (2, 1),
}
ALL = frozenset(LAYOUTS)
CHANNEL_FIRST = frozenset({"NCHW", "NCL", "NC"})
CHANNEL_LAST = frozenset({"NHWC", "NLC", "NC"})
#: layouts whose canonical view has one row (H = 1) or no spatial extent at all
ROWS = frozenset({"NCL", "NLC"})
VECTORS = frozenset({"NC"})

#: (layout read, layout given) pairs of a move of the channel axis (a region may end in
#: another layout than it starts with: the fused layer then keeps the permute)
MOVES = frozenset(LAYOUT_PERMUTES)
#: (layout, permutation) -> the layout of the permuted value
PERMUTATIONS: dict[tuple[str, tuple[int, ...]], str] = {
    (a, perm): b for (a, b), perm in LAYOUT_PERMUTES.items()}


def rank(layout: str) -> int:
    return LAYOUTS[layout][0]


def channel_axis(layout: str) -> int:
    return LAYOUTS[layout][1]


def candidates(shape) -> list[tuple[str, int]]:
    """``(layout, channels)`` for every layout a value of ``shape`` may have, the
    channel-first one first."""
    shape = tuple(int(s) for s in shape)
    return [(name, shape[axis]) for name, (r, axis) in LAYOUTS.items() if r == len(shape)]


def normalized_axis(dim: int, layout: str) -> int:
    """``dim`` (negative counts from the end) as an axis of a ``layout`` tensor."""
    return dim % rank(layout)


def to_canonical(t: Tensor, layout: str) -> Tensor:
    """A ``layout`` tensor as its (N, C, H, W) view."""
    if layout == "NCHW":
        return t
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NCL":
        return t.unsqueeze(2)
    if layout == "NLC":
        return t.transpose(1, 2).unsqueeze(2)
    if layout == "NC":
        return t[:, :, None, None]
    raise ValueError(f"unknown layout {layout!r}")


def from_canonical(t: Tensor, layout: str) -> Tensor:
    """Inverse of ``to_canonical`` (``t`` has H = 1 for rows, H = W = 1 for vectors)."""
    if layout == "NCHW":
        return t
    if layout == "NHWC":
        return t.permute(0, 2, 3, 1)
    if layout in ROWS | VECTORS:
        if t.shape[2] != 1 or (layout in VECTORS and t.shape[3] != 1):
            raise ValueError(f"a canonical view of shape {list(t.shape)} has no {layout} "
                             "tensor (rows have H = 1, vectors H = W = 1)")
        if layout == "NCL":
            return t[:, :, 0]
        if layout == "NLC":
            return t[:, :, 0].transpose(1, 2)
        return t[:, :, 0, 0]
    raise ValueError(f"unknown layout {layout!r}")


def probe_size(layout: str, extent: tuple[int, int],
               jump: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(batch, H, W) of a random probe for a region in ``layout`` that reads ``extent``
    input positions per output position, neighbouring outputs ``jump`` apart
    (``region.read_window``, widened to the fused kernel's): extent plus jump on each
    axis, and one more on W where W would have the parity of H. Every tap reads a real
    value at some output position, the outer output positions read the padding (with a
    stride, on at least one axis), and H and W differ in size and parity (both stride
    remainders; a transposed axis cannot pass). Rows have one row (extent plus jump plus
    one), vectors none (several samples instead). Without ``jump`` (a transposed conv,
    whose window is in output positions; a depthwise kernel, ``proofs.region.probe_shape``
    says why): twice the extent, plus one on W.
    """
    if layout in VECTORS:
        return 6, 1, 1
    (eh, ew) = extent
    if jump is None:
        h, w = 2 * eh, 2 * ew + 1
    else:
        h, w = eh + jump[0], ew + jump[1]
        if layout in ROWS or (w - h) % 2 == 0:
            w += 1
    if layout in ROWS:
        return 2, 1, w
    return 1, h, w


def zeros_like_layout(layout: str, channels: int, dtype=torch.float64) -> Tensor:
    """A small zero tensor of ``layout`` (used to ask a branch for its zero response)."""
    shape = [1] * rank(layout)
    shape[channel_axis(layout)] = channels
    return torch.zeros(shape, dtype=dtype)
