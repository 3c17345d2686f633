"""Finding maximal linear regions (one input value, one output value) in an fx graph.

A region is a set of linear-op nodes (``fx.ops.classify``) whose values are used
only inside the region, except for one output node; every activation input from
outside is one and the same node (the region input; an identity branch is that
input feeding the sum). Regions are grown backwards from their output in reverse
graph order, so each is maximal: a node joins when all of its users already belong
to the region. An output whose region would need two inputs is not linear for this
purpose: the region then starts at the last join (a member reading several outside
values) it passes through, whose output is its input; the join's own inputs start
smaller regions.

Shape reads (``x.ndim``, ``x.shape``) that only feed ``torch._assert`` do not count
as uses; the rewrite drops them with the region.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from repfuse import region as rg
from repfuse.fx.ops import LinearOp, inplace_target, tensor_meta
from repfuse.fx.trace import META
from repfuse.region.op import OpKind, is_region_value

_PURE = {getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
         operator.ge, operator.not_, operator.and_, operator.or_, operator.getitem, len,
         isinstance}


def is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is torch._assert
        or getattr(node.target, "__name__", "") in ("_assert", "_assert_is_none"))


def ignorable_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Asserts and the shape reads that only feed them."""
    ign: set[fx.Node] = set()
    for n in reversed(graph.nodes):
        if n.op in ("output", "placeholder", "get_attr") or META in n.meta:
            continue
        if is_assert(n):
            ign.add(n)
            continue
        pure = (n.op == "call_function" and n.target in _PURE) or (
            n.op == "call_method" and n.target in ("size", "dim", "numel"))
        if pure and all(u in ign for u in n.users):
            ign.add(n)
    return ign


@dataclass(eq=False)
class Region:
    """A linear region of one graph: member nodes in graph order, input and output."""

    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    ops: dict[fx.Node, LinearOp]

    @property
    def blocked(self) -> str:
        return next((self.ops[n].blocked for n in self.nodes if self.ops[n].blocked), "")

    def build(self, x: rg.Node) -> rg.Node:
        """The region's expression with ``x`` as its input."""
        env: dict[fx.Node, rg.Node] = {self.input: x}
        for n in self.nodes:
            op = self.ops[n]
            env[n] = op.build([env[i] for i in op.inputs])
        return env[self.output]

    def expr(self) -> rg.Node:
        """The expression on an ``Input`` in the layout its ops read (``rg.with_input``)."""
        return rg.with_input(tensor_meta(self.input)[0], self.build)

    @property
    def is_passthrough(self) -> bool:
        return all(self.ops[n].kind is OpKind.PASS for n in self.nodes)


#: Ops whose result may share memory with their first argument.
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select",
    "squeeze", "unsqueeze", "flatten", "unflatten", "expand", "expand_as", "as_strided",
    "t", "T", "mT", "detach", "contiguous", "split", "chunk", "unbind", "movedim",
    "swapaxes", "swapdims", "diagonal", "unfold", "view_as_real", "real", "imag",
    "__getitem__"})


def view_base(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` may be a view of (conservatively), or None."""
    if node.op not in ("call_method", "call_function") or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.args[0] if name in _VIEW_METHODS or name == "getitem" else None


def real_users(node: fx.Node, ign: set[fx.Node]) -> list[fx.Node]:
    return [u for u in node.users if u not in ign]


def find_regions(graph: fx.Graph, ops: dict[fx.Node, LinearOp], barriers: set[fx.Node],
                 ign: set[fx.Node], module, cuts=frozenset()) -> list[Region]:
    """Maximal regions of ``graph`` whose members are ``ops`` minus ``barriers``; a node
    in ``cuts`` stays linear but ends its region (it is the output of one region and
    the input of the regions that read it)."""
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    mutators: dict[fx.Node, list[fx.Node]] = {}
    linear = set()
    for n in order:
        target = inplace_target(n, module)
        base = target
        while base is not None:  # writing through a view writes its base too
            mutators.setdefault(base, []).append(n)
            base = view_base(base)
        if n in ops and n not in barriers:
            if target is not None and (target.op == "placeholder"
                                       or len(real_users(target, ign)) != 1):
                continue
            linear.add(n)
    assigned: set[fx.Node] = set()
    regions: list[Region] = []
    for v in reversed(order):
        if v not in linear or v in assigned:
            continue
        members = {v}
        heap = [(-index[i], i.name, i) for i in ops[v].inputs]
        heapq.heapify(heap)
        seen = set()
        while heap:
            _, _, u = heapq.heappop(heap)
            if u in seen or u in members:
                continue
            seen.add(u)
            if u in linear and u not in assigned and u not in cuts and all(
                    w in members for w in real_users(u, ign)):
                members.add(u)
                for i in ops[u].inputs:
                    heapq.heappush(heap, (-index[i], i.name, i))
        external = {i for m in members for i in ops[m].inputs if i not in members}
        if len(external) != 1:
            members = _from_join(v, members, ops, ign, index)
            if members is None:
                linear.discard(v)
                continue
            external = {i for m in members for i in ops[m].inputs if i not in members}
        x = next(iter(external))
        if tensor_meta(x) is None or not is_region_value(*tensor_meta(x)):
            linear.discard(v)
            continue
        last = max(index[m] for m in members)
        if any(index[w] < last and w not in members for w in mutators.get(x, [])):
            linear.discard(v)
            continue
        nodes = sorted(members, key=index.__getitem__)
        regions.append(Region(nodes, x, v, {n: ops[n] for n in nodes}))
        assigned |= members
    regions.sort(key=lambda r: index[r.output])
    return regions


def _from_join(v: fx.Node, members: set, ops: dict, ign: set,
               index: dict) -> set | None:
    """The largest part of ``members`` (grown back from ``v``) that reads one value: the
    region after a join (an add, concat or other op of several outside inputs) starts at
    the join's output. None when no member is such a start."""
    for d in sorted(members - {v}, key=index.__getitem__):
        part, stack = {v}, [v]
        while stack:
            for i in ops[stack.pop()].inputs:
                if i is not d and i in members and i not in part:
                    part.add(i)
                    stack.append(i)
        if all(i is d or i in part for m in part for i in ops[m].inputs) and all(
                w in part for m in part if m is not v for w in real_users(m, ign)):
            return part
    return None


def dominators(region: Region) -> list[fx.Node]:
    """Members other than the output that every path from the region's input to its
    output passes through, in graph order: where the region can be cut in two (the
    part up to the node, and the part reading only that node)."""
    out = []
    for m in region.nodes:
        if m is region.output:
            continue
        stack, seen, reached = [region.output], set(), False
        while stack and not reached:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for i in region.ops[n].inputs:
                if i is region.input:
                    reached = True
                elif i is not m and i in region.ops:
                    stack.append(i)
        if not reached:
            out.append(m)
    return out
