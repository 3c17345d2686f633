"""Where to cut a refused linear region of an fx graph so that its parts fuse.

A region refused as a whole (a bias would cross a zero padding, the fused kernel would
grow past ``region.GROWTH_LIMIT``) is cut at dominators: interior nodes every path from
its input to its output passes through (``fx.match.dominators``). In graph order a
dominator's ancestors come before it and its descendants after it, so the nodes between
two consecutive dominators are a slice of the region's node list, and every candidate
part is a run of consecutive slices. ``cut_points`` chooses the cuts in one pass from the
output, trying each part once (``region.Attempts``), so its work is bounded by twice the
number of slices.
"""

from __future__ import annotations

import torch.fx as fx

from repfuse import region as rg
from repfuse.fx.match import Region, dominators
from repfuse.fx.ops import tensor_meta
from repfuse.region.op import is_region_value
from repfuse.region.worth import worthwhile


def _part(r: Region, start: int, stop: int) -> Region | None:
    """The part of ``r`` made of ``r.nodes[start:stop]`` (a slice between dominators:
    graph order puts a dominator's ancestors before it and its descendants after it),
    reading the node before the slice (the region's input for ``start`` 0); None when
    that value is not one a region may read."""
    nodes = r.nodes[start:stop]
    x = r.nodes[start - 1] if start else r.input
    meta = tensor_meta(x)
    if meta is None or not is_region_value(*meta):
        return None
    return Region(nodes, x, nodes[-1], {n: r.ops[n] for n in nodes})


def _fuses(part: Region | None, attempt: rg.Attempts) -> bool | None:
    """True: ``part`` fuses; False: it is refused; None: nothing to decide (no part, or
    one not worth fusing)."""
    if part is None:
        return None
    expr = part.expr()
    if not worthwhile(expr):
        return None
    if part.blocked:
        return False
    return not isinstance(attempt(frozenset(part.nodes), expr), Exception)


def cut_points(r: Region, attempt: rg.Attempts) -> list[fx.Node]:
    """Where to cut refused region ``r`` so that parts of it fuse, or [] when no cut lets
    any. From the output back: the part ending at ``end`` (at first the output) grows by
    one dominator-to-dominator slice at a time while it fuses (parts not worth fusing on
    their own grow on); at its first refusal the longest part that fused is kept, its
    first dominator becomes the next ``end`` and a cut. When no part ending at ``end``
    fuses, the last slice is left alone and the next ``end`` is its first dominator. Each
    round tries one refused part and grows the kept one by a slice per fusing attempt, so
    the attempts are bounded by twice the number of slices (dominators plus one)."""
    pos = {n: i for i, n in enumerate(r.nodes)}
    starts = [0] + [pos[d] + 1 for d in dominators(r)]   # each slice's first index
    cuts: list[fx.Node] = []
    fused_any = False
    end, j = len(r.nodes), len(starts) - 1               # the part is r.nodes[start:end]
    while j >= 0:
        best, k = None, j
        while k >= 0:
            whole = starts[k] == 0 and end == len(r.nodes)  # known to be refused
            outcome = False if whole else _fuses(_part(r, starts[k], end), attempt)
            if outcome:
                best = k
            elif outcome is False:
                break
            k -= 1
        nxt = best if best is not None else j             # the next part ends before it
        fused_any = fused_any or best is not None
        if nxt <= 0:
            break
        cuts.append(r.nodes[starts[nxt] - 1])
        end, j = starts[nxt], nxt - 1
    return cuts if fused_any else []
