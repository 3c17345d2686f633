"""The one set of utilities that walk a region expression (a DAG of ``region.nodes``).

Everything here reads the facts the node types declare (``links``, ``tensors``,
``dtype_fields``), so a new node type needs nothing added here. A field may hold a
``Computed`` value (``region.computed``) in place of a tensor: its parameter sources are
the node's parameters, its sources are the node's tensors, and ``materialized`` evaluates
it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from repfuse.core.spec import Pair, window_after
from repfuse.errors import NotFusable
from repfuse.region import layout as L
from repfuse.region.computed import Computed, parameter_sources
from repfuse.region.nodes import AvgPool, Conv, ConvTranspose, Input, Node


def children(node: Node) -> tuple[Node, ...]:
    """Direct inputs of ``node``, in the order of its ``links``."""
    out: list[Node] = []
    for name in node.links:
        value = getattr(node, name)
        if isinstance(value, (tuple, list)):
            out.extend(value)
        else:
            out.append(value)
    return tuple(out)


def label(node: Node) -> str:
    """``Conv 'stage1.conv'`` (the node's kind and name) for messages."""
    name = getattr(node, "name", "")
    kind = type(node).__name__
    return f"{kind} {name!r}" if name else kind


def walk(expr: Node) -> list[Node]:
    """Nodes in post-order (children first), each once (the expression may be a DAG)."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(expr, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for child in reversed(children(node)):
            stack.append((child, False))
    return order


def input_channels(expr: Node) -> int:
    """Channels of the region's ``Input`` node."""
    return region_input(expr).channels


def own_tensors(node: Node) -> list[Tensor]:
    """The tensors ``node`` itself holds (a computed value's sources included)."""
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        out += [t for t in (value.sources if isinstance(value, Computed) else (value,))
                if isinstance(t, Tensor)]
    return out


def node_tensors(expr: Node) -> list[Tensor]:
    """Every tensor held by a node of ``expr`` (each once): parameters, buffers, constants."""
    found: dict[int, Tensor] = {}
    for node in walk(expr):
        for t in own_tensors(node):
            found.setdefault(id(t), t)
    return list(found.values())


def parameters(expr: Node) -> dict[str, Tensor]:
    """The tensors the fused (weight, bias) is differentiable in, keyed
    ``"<node name>.<field>"`` (each node type's declared ``tensors``: conv weight/bias, BN
    weight/bias, tensor scale/shift/pad values; of a computed value, the parameters it is
    computed from, keyed by their names in the model). BN running statistics are buffers
    and are not included."""
    out: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for node in walk(expr):
        if not node.tensors:
            continue
        kind = type(node).__name__.lower()
        base = getattr(node, "name", "") or f"{kind}{counts.get(kind, 0)}"
        counts[kind] = counts.get(kind, 0) + 1
        for f in node.tensors:
            value = getattr(node, f, None)
            named = parameter_sources(value) if isinstance(value, Computed) else \
                [(f"{base}.{f}", value)]
            for key, t in named:
                if isinstance(t, Tensor):
                    _add_unique(out, key, t)
    return out


def _add_unique(out: dict[str, Tensor], key: str, t: Tensor) -> None:
    """``out[key] = t``; a different tensor already under ``key`` gets ``key#2`` ..."""
    if out.get(key) is t:
        return
    if key in out:
        base, _, f = key.rpartition(".")
        n = 2
        while f"{base}#{n}.{f}" in out:
            n += 1
        key = f"{base}#{n}.{f}"
    out[key] = t


def sources(expr: Node) -> list[str]:
    """The names of the region's named ops (module paths in fx, node names in ONNX), in
    walk order, each once."""
    return list(dict.fromkeys(n.name for n in walk(expr) if getattr(n, "name", "")))


def count_params(expr: Node) -> int:
    """Number of parameter elements of the region, shared tensors counted once."""
    seen: set = set()
    total = 0
    for t in parameters(expr).values():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
    return total


def dtype_device(expr: Node) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the region's weights (by each node type's ``dtype_rank``: convs
    first, then norms, then constants): what an identity branch is cast back to."""
    nodes = sorted(walk(expr), key=lambda n: n.dtype_rank)
    for node in nodes:
        for attr in node.dtype_fields:
            t = getattr(node, attr, None)
            if isinstance(t, (Tensor, Computed)) and t.dtype.is_floating_point:
                return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def substitute(expr: Node, tensors: dict[int, Tensor]) -> Node:
    """A copy of ``expr`` in which every tensor ``t`` with ``id(t)`` in ``tensors`` is
    replaced by ``tensors[id(t)]``; shared nodes stay shared. ``expr`` is unchanged."""
    return _substituted(expr, tensors, {})


def _substituted(v, tensors: dict[int, Tensor], memo: dict[int, Node]):
    # (module-level recursion: a nested recursive function is a reference cycle that
    # would keep its memo, every copied node and their tensors, until the cyclic collector
    # runs; the proofs' float64 leaves of a whole model waited there)
    if isinstance(v, Node):
        if id(v) not in memo:
            memo[id(v)] = dataclasses.replace(v, **{
                f.name: _substituted(getattr(v, f.name), tensors, memo)
                for f in dataclasses.fields(v)})
        return memo[id(v)]
    if isinstance(v, Tensor):
        return tensors.get(id(v), v)
    if isinstance(v, Computed):
        return v.with_sources(tuple(tensors.get(id(t), t) for t in v.sources))
    if isinstance(v, tuple):
        return tuple(_substituted(c, tensors, memo) for c in v)
    if isinstance(v, list):
        return [_substituted(c, tensors, memo) for c in v]
    return v


def materialized(expr: Node, exact: bool = False) -> Node:
    """A copy of ``expr`` with every ``Computed`` field evaluated (differentiably in its
    sources; from float64 copies of them with ``exact``); ``expr`` itself when it holds
    none."""
    if not any(isinstance(getattr(n, f.name), Computed) for n in walk(expr)
               for f in dataclasses.fields(n)):
        return expr
    return _materialized(expr, exact, {})


def _materialized(node: Node, exact: bool, memo: dict[int, Node]) -> Node:
    # (module-level recursion, as ``_substituted``)
    if id(node) not in memo:
        changes = {}
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            if isinstance(v, Computed):
                changes[f.name] = v.value(exact)
            elif isinstance(v, Node):
                changes[f.name] = _materialized(v, exact, memo)
            elif isinstance(v, tuple) and any(isinstance(c, Node) for c in v):
                changes[f.name] = tuple(_materialized(c, exact, memo) for c in v)
        memo[id(node)] = dataclasses.replace(node, **changes) if changes else node
    return memo[id(node)]


def value_layouts(expr: Node) -> dict[int, str]:
    """The layout (``region.layout``) of every node's value, by ``id``, from the region
    input's layout and each node type's ``out_layout``; raises ``NotFusable`` (with
    ``.node`` set) where a node does not apply to the layout of its inputs."""
    out: dict[int, str] = {}
    for node in walk(expr):
        try:
            out[id(node)] = node.out_layout([out[id(c)] for c in children(node)])
        except NotFusable as err:
            raise NotFusable(f"{label(node)}: {err}", node=node) from err
    return out


def read_window(expr: Node) -> tuple[Pair, Pair] | None:
    """How far the training form of ``expr`` reads, from its own nodes (not from
    ``reduce``): ``((extent_h, extent_w), (jump_h, jump_w))``, the input positions one
    output position depends on at most and the input step between neighbouring outputs,
    composed through convs and pools in sequence and the widest over branches. Pads and
    crops shift a window without widening it; every other node reads one position. None
    when the region holds a transposed conv (its window is in output positions)."""
    memo: dict[int, tuple[Pair, Pair]] = {}
    for node in walk(expr):
        if isinstance(node, ConvTranspose):
            return None
        kids = [memo[id(c)] for c in children(node)]
        window = tuple(tuple(max((k[part][a] for k in kids), default=1) for a in (0, 1))
                       for part in (0, 1))
        if isinstance(node, Conv):
            window = window_after(window, node.spec.effective_kernel, node.spec.stride)
        elif isinstance(node, AvgPool):
            window = window_after(window, node.kernel_size, node.stride)
        memo[id(node)] = window
    return memo[id(expr)]


def region_input(expr: Node) -> Input:
    """The region's ``Input`` node."""
    for node in walk(expr):
        if isinstance(node, Input):
            return node
    raise ValueError("region expression has no Input node")


def with_input(shape, build) -> Node:
    """``build(Input(channels, layout))`` for the layout of a region input of ``shape``
    (unknown sizes as -1) under which every node applies (``value_layouts``): (N, C, H, W)
    is NCHW unless a Linear reads it channels-last, (N, A, B) is NCL or NLC by what reads
    it. When none fits, the first candidate's expression (reducing it names the node that
    does not)."""
    if not 2 <= len(shape) <= 4:
        raise NotFusable(f"a region value has shape {list(shape)}; only (N, C), (N, C, L) / "
                         "(N, L, C) and (N, C, H, W) / (N, H, W, C) values are fused")
    options = [(lay, c) for lay, c in L.candidates(shape) if c >= 1]
    if not options:
        raise NotFusable(f"the channel count of a region value of shape {list(shape)} is "
                         "unknown (run shape inference on the model first)")
    first = None
    for layout, channels in options:
        expr = build(Input(channels, layout))
        first = first or expr
        try:
            value_layouts(expr)
        except NotFusable:
            continue
        return expr
    return first
