"""The shared rules on whether a region is worth fusing and whether its result is.

``worthwhile`` (before reducing: does fusing replace anything?), ``check_growth``
(after reducing: would the fused conv cost more than its branches?) and ``shape_refusal``
(both, and every other refusal the shapes decide, before any kernel is computed) are used
by both front ends.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable

from repfuse.errors import NotFusable
from repfuse.region.kinds import OpKind
from repfuse.region.nodes import Add, Concat, Conv, Node, Sub
from repfuse.region.reducers import reduce_shapes
from repfuse.region.tree import children, count_params, walk

log = logging.getLogger(__name__)


def worth_fusing(kinds: Iterable[OpKind]) -> bool:
    """Whether fusing ops of these kinds gains anything: a conv with something to fold
    into it, or a batch norm with other linear ops (merged branches, a second norm, a
    scale: one per-channel conv then replaces several ops). A lone batch norm stays one,
    and so do constant scales and shifts without a norm; pass-throughs do not count."""
    ks = [k for k in kinds if k is not OpKind.PASS]
    if OpKind.CONV in ks or OpKind.NORM in ks:
        return len(ks) >= 2
    return False


def kind_of(node: Node) -> OpKind:
    """The node's operation kind (a sum or concat of one branch passes it through)."""
    if isinstance(node, (Add, Concat)) and len(node.inputs) < 2:
        return OpKind.PASS
    return node.kind


def worthwhile(expr: Node) -> bool:
    """``worth_fusing`` over the nodes of a region expression."""
    return worth_fusing(kind_of(n) for n in walk(expr))


#: A region whose fused conv would have more than this many times the parameters of its
#: branches (a depthwise kxk followed by a dense 1x1, say) is left as it is.
GROWTH_LIMIT = 4


def check_growth(expr: Node, fused) -> None:
    """Raise ``NotFusable`` when the fused conv (``AffineConv``) would have more than
    ``GROWTH_LIMIT`` times the parameters of the region: exact, but more compute."""
    before = count_params(expr)
    after = fused.weight.numel() + (fused.bias.numel() if fused.bias is not None else 0)
    if after > GROWTH_LIMIT * max(before, 1):
        raise NotFusable(f"fusing would multiply the parameters by {after / max(before, 1):.1f} "
                         f"({before} -> {after}): more compute than the training form")


def shape_refusal(expr: Node) -> Exception | None:
    """The ``NotFusable`` (or geometry ``ValueError``) that ``reduce`` followed by
    ``check_growth`` would raise for a reason the shapes and the structure decide, found
    by a shape-only run (``reduce_shapes``: no kernel is computed); None when the shapes
    allow the region (its values may still refuse it: ``reduce`` decides)."""
    return shapes_or_refusal(expr)[1]


def shapes_or_refusal(expr: Node):
    """(the shape-only reduction or None, ``shape_refusal``'s refusal or None): what
    ``Attempts`` asks before it reduces a part with values."""
    try:
        shapes = reduce_shapes(expr)
        check_growth(expr, shapes)
    except (NotFusable, ValueError) as err:
        return None, err
    except Exception as err:  # noqa: BLE001 - an op without a meta kernel: reduce decides
        log.debug("shape-only run of a region failed (%s: %s); reducing it with values",
                  type(err).__name__, err)
        return None, None
    return shapes, None


#: A part with at most this many parameter elements (``direct``) is reduced with values
#: without a shape-only run first when it is one conv with norms, constant scales and
#: shifts and pass-throughs (its fused kernel is its conv's, or a per-channel one: it
#: cannot grow), or a sum or difference of such branches on one input whose convs have one
#: group count and one of which reads a window that holds the others' (RepVGG's,
#: MobileOne's and ACNet's blocks: the fused kernel is that conv's size; ``check_growth``
#: still judges it after the reduction). Refusing such a part with values costs about
#: what the shape-only run costs (8 MB in float64; yolov8n's 57 conv-and-norm parts spent
#: 30 ms of 0.81 s in shape-only runs, timm mobileone_s0's 43 six-branch blocks 0.11 of
#: 1.29 s)
DIRECT_LIMIT = 1 << 20
_DIRECT_KINDS = frozenset({OpKind.CONV, OpKind.NORM, OpKind.AFFINE, OpKind.PASS})
_BRANCH_KINDS = _DIRECT_KINDS | {OpKind.COMBINE}


def direct(expr: Node) -> bool:
    """Whether ``Attempts`` reduces ``expr`` with values at once (``DIRECT_LIMIT``)."""
    order = walk(expr)
    kinds = [kind_of(n) for n in order]
    if not set(kinds) <= _BRANCH_KINDS:
        return False
    if kinds.count(OpKind.CONV) > 1 or OpKind.COMBINE in kinds:
        if not _parallel_branches(order):
            return False
    return count_params(expr) <= DIRECT_LIMIT


def _parallel_branches(order: list[Node]) -> bool:
    """Whether the nodes (in post-order) are branches summed (``Add``, ``Sub``) whose convs
    (``Conv``: no transposed conv, no Linear) all have one group count, none of which
    reads another conv's output, and one of which reads a window of the input that holds
    the others' (3x3 with 1x1, 1x3 and 3x1): the fused kernel is then that conv's size."""
    below: dict[int, bool] = {}       # a conv at or below the node
    groups, windows = set(), []
    for node in order:
        under = any(below[id(c)] for c in children(node))
        if node.kind is OpKind.CONV:
            if type(node) is not Conv or under:
                return False
            groups.add(node.spec.groups)
            rows, cols = node.spec.tap_offsets(0), node.spec.tap_offsets(1)
            windows.append((rows[0], cols[0], rows[-1], cols[-1]))   # first and last read
        elif kind_of(node) is OpKind.COMBINE and not isinstance(node, (Add, Sub)):
            return False
        below[id(node)] = under or node.kind is OpKind.CONV
    return len(groups) <= 1 and (not windows or any(
        all(w[0] <= o[0] and w[1] <= o[1] and o[2] <= w[2] and o[3] <= w[3] for o in windows)
        for w in windows))


class Attempts:
    """The outcome of each region part a front end tries, by key (its member set): the
    result of ``reduce_fn(expr, shapes)`` or the ``NotFusable`` / ``ValueError`` saying why
    not. A part is tried once: first on its shapes (``shape_refusal``: no kernel is
    computed; about 2 ms a part), then, if the shapes allow it, with ``reduce_fn``, which
    also receives that shape-only reduction (``reduce_shapes``: the fused spec and dtype;
    None where the shapes could not be run, or where the part is ``direct`` and is reduced
    with values at once). ``counts``: parts tried ("attempts"), parts reduced with values
    ("reductions")."""

    def __init__(self, reduce_fn: Callable[[Node, object], object],
                 counts: Counter | None = None):
        self.reduce_fn = reduce_fn
        self.outcomes: dict[Hashable, object] = {}
        self.counts = counts if counts is not None else Counter()

    def __call__(self, key: Hashable, expr: Node):
        if key not in self.outcomes:
            self.counts["attempts"] += 1
            self.outcomes[key] = self._try(expr)
        return self.outcomes[key]

    def _try(self, expr: Node):
        shapes, refusal = (None, None) if direct(expr) else shapes_or_refusal(expr)
        if refusal is not None:
            return refusal
        self.counts["reductions"] += 1
        try:
            return self.reduce_fn(expr, shapes)
        except (NotFusable, ValueError) as err:
            return err
