"""The one set of utilities that walk a region expression (a DAG of ``region.nodes``).

Everything here reads the facts the node types declare (``links``, ``tensors``,
``dtype_fields``), so a new node type needs nothing added here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from repfuse.region.nodes import Input, Node


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
    for node in walk(expr):
        if isinstance(node, Input):
            return node.channels
    raise ValueError("region expression has no Input node")


def node_tensors(expr: Node) -> list[Tensor]:
    """Every tensor held by a node of ``expr`` (each once): parameters, buffers, constants."""
    found: dict[int, Tensor] = {}
    for node in walk(expr):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if isinstance(value, Tensor):
                found.setdefault(id(value), value)
    return list(found.values())


def parameters(expr: Node) -> dict[str, Tensor]:
    """The tensors the fused (weight, bias) is differentiable in, keyed
    ``"<node name>.<field>"`` (each node type's declared ``tensors``: conv weight/bias, BN
    weight/bias, tensor scale/shift/pad values). BN running statistics are buffers and
    are not included."""
    out: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for node in walk(expr):
        if not node.tensors:
            continue
        kind = type(node).__name__.lower()
        base = getattr(node, "name", "") or f"{kind}{counts.get(kind, 0)}"
        counts[kind] = counts.get(kind, 0) + 1
        for f in node.tensors:
            t = getattr(node, f, None)
            if not isinstance(t, Tensor):
                continue
            key = f"{base}.{f}"
            if key in out and out[key] is not t:
                n = 2
                while f"{base}#{n}.{f}" in out:
                    n += 1
                key = f"{base}#{n}.{f}"
            out[key] = t
    return out


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
            if isinstance(t, Tensor) and t.is_floating_point():
                return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def substitute(expr: Node, tensors: dict[int, Tensor]) -> Node:
    """A copy of ``expr`` in which every tensor ``t`` with ``id(t)`` in ``tensors`` is
    replaced by ``tensors[id(t)]``; shared nodes stay shared. ``expr`` is unchanged."""
    memo: dict[int, Node] = {}

    def conv(v):
        if isinstance(v, Node):
            return copy(v)
        if isinstance(v, Tensor):
            return tensors.get(id(v), v)
        if isinstance(v, tuple):
            return tuple(conv(c) for c in v)
        if isinstance(v, list):
            return [conv(c) for c in v]
        return v

    def copy(node: Node) -> Node:
        if id(node) not in memo:
            changes = {f.name: conv(getattr(node, f.name)) for f in dataclasses.fields(node)}
            memo[id(node)] = dataclasses.replace(node, **changes)
        return memo[id(node)]

    return copy(expr)
