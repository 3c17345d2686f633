"""Rewrite a linear region of an onnx_ir graph as one ``Conv`` node.

The new ``Conv`` reads the region's input, produces the region's output value (same
name, type and shape, so graph outputs keep their names) and owns two new
initializers. Nodes and initializers that only fed the removed region (constant
subgraphs, shared ``Identity`` copies of parameters) are removed with it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch


def _unique(graph: ir.Graph, base: str) -> str:
    taken = _names(graph)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _names(graph: ir.Graph) -> set[str]:
    cache = graph.meta.get("repfuse.names")
    if cache is None:
        cache = set(graph.initializers)
        cache |= {v.name for v in graph.inputs if v.name}
        for node in graph:
            cache |= {v.name for v in node.outputs if v.name}
            if node.name:
                cache.add(node.name)
        graph.meta["repfuse.names"] = cache
    return cache


def _numpy_dtype(output: ir.Value, fallback: torch.dtype) -> np.dtype:
    if output.dtype is not None and output.dtype.is_floating_point():
        return np.dtype(output.dtype.numpy())
    return torch.empty((), dtype=fallback).numpy().dtype


def _initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def type_only_use(user: ir.Node, value: ir.Value) -> bool:
    """Whether ``user`` reads only the element type of ``value``: the ``target_type``
    input of CastLike (the torch exporter casts scalar constants like an activation)."""
    return (user.op_type == "CastLike" and user.domain in ("", "ai.onnx")
            and len(user.inputs) > 1 and user.inputs[1] is value and user.inputs[0] is not value)


def replace_with_conv(graph: ir.Graph, nodes: list[ir.Node], x: ir.Value, output: ir.Value,
                      fused) -> ir.Node:
    """Replace ``nodes`` (computing ``output`` from ``x``) by one Conv of ``fused``. A
    CastLike outside that takes its type from a value inside takes it from ``x``
    instead (the same element type, computed before every node of the region)."""
    sink = output.producer()
    members = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is output:
                continue
            for user, index in list(value.uses()):
                if user not in members and type_only_use(user, value):
                    user.replace_input_with(index, x)
    dtype = _numpy_dtype(output, fused.dtype or torch.float32)
    base = sink.name or output.name or "region"
    weight = fused.weight.detach().cpu().numpy().astype(dtype)
    bias = (fused.bias.detach().cpu().numpy() if fused.bias is not None
            else np.zeros(weight.shape[0])).astype(dtype)
    w = _initializer(graph, weight, _unique(graph, f"{base}.fused_weight"))
    b = _initializer(graph, bias, _unique(graph, f"{base}.fused_bias"))
    spec = fused.spec
    t, bottom, left, right = spec.padding
    conv = ir.node("Conv", [x, w, b], attributes={
        "kernel_shape": list(spec.kernel_size), "strides": list(spec.stride),
        "pads": [t, left, bottom, right], "dilations": list(spec.dilation),
        "group": spec.groups}, name=_unique(graph, f"{base}.fused"))
    feeders = {v for n in nodes for v in n.inputs if v is not None}
    ir.convenience.replace_nodes_and_values(graph, sink, nodes, [conv], [output],
                                            [conv.outputs[0]])
    _remove_dead(graph, feeders)
    return conv


def _remove_dead(graph: ir.Graph, values: set[ir.Value]) -> None:
    """Remove the producers of ``values`` (and initializers) that are no longer used."""
    pending = list(values)
    while pending:
        value = pending.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer() and value.name in graph.initializers:
            del graph.initializers[value.name]
            continue
        node = value.producer()
        if node is None or node.graph is not graph:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        pending += inputs
