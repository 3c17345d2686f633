"""Rewrite a linear region of an onnx_ir graph as one layer: ``Conv`` (2-D, or 1-D for
sequences), ``ConvTranspose``, ``Gemm`` for (N, C) values, ``MatMul`` + ``Add`` for tokens
and channels-last maps (by the fused kernel's ``value_layout``; a ``Flatten`` first where
the region merges the positions of tokens into the batch, a ``GlobalAveragePool`` where it
pools first, a ``Transpose`` before or after where it moves the channel axis:
``algebra.modules.relayout``).

The new layer reads the region's input, produces the region's output value (same
name, type and shape, so graph outputs keep their names) and owns two new
initializers. Nodes and initializers that only fed the removed region (constant
subgraphs, shared ``Identity`` copies of parameters) are removed with it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from repfuse.algebra.modules import dense_matrix, relayout
from repfuse.errors import NotFusable


def unique_name(graph: ir.Graph, base: str) -> str:
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


def initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
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


def shape_only_use(user: ir.Node, members: set) -> bool:
    """Whether ``user`` is a ``Shape`` whose result only region ``members`` read (a
    ``Reshape`` back to the shape of a value inside the region): it dies with them."""
    return (user.op_type == "Shape" and user.domain in ("", "ai.onnx")
            and all(c in members for o in user.outputs for c in o.consumers())
            and not any(o.is_graph_output() for o in user.outputs))


def transposed_pads(spec) -> tuple[list[int], list[int]]:
    """ONNX ``pads`` and ``output_padding`` of a transposed spec: the end padding net of
    the output padding, output padding only where that is negative (ONNX Runtime needs
    ``output_padding < stride``; ``NotFusable`` otherwise)."""
    begin, end, extra = [], [], []
    for axis in range(2):
        lo, hi = spec.padding_pairs[axis]
        net = hi - spec.output_padding[axis]
        if -net >= spec.stride[axis]:
            raise NotFusable(f"{spec.describe()}: output padding {spec.output_padding} is not "
                             "below the stride, which ONNX Runtime does not run")
        begin.append(lo)
        end.append(max(net, 0))
        extra.append(max(-net, 0))
    return begin + end, extra


def _layer(graph: ir.Graph, x: ir.Value, fused, dtype, base: str) -> list[ir.Node]:
    """The nodes computing ``fused`` on ``x`` (see the module docstring); the last one
    produces the output."""
    if fused.pooled:    # the mean over positions first, flattened for a Gemm
        pool = [ir.node("GlobalAveragePool", [x], name=unique_name(graph, f"{base}.fused_pool"))]
        if fused.value_layout == "NC":
            pool.append(ir.node("Flatten", [pool[0].outputs[0]], attributes={"axis": 1},
                                name=unique_name(graph, f"{base}.fused_flatten")))
        return pool + _layer(graph, pool[-1].outputs[0], fused.replace(pooled=False), dtype,
                             base)
    before, inner, after = relayout(fused)
    if inner is not fused:   # a move of the channel axis: the layer and a Transpose
        if before:
            perm = ir.node("Transpose", [x], attributes={"perm": list(before)},
                           name=unique_name(graph, f"{base}.fused_transpose"))
            return [perm] + _layer(graph, perm.outputs[0], inner, dtype, base)
        nodes = _layer(graph, x, inner, dtype, base)
        return nodes + [ir.node("Transpose", [nodes[-1].outputs[0]],
                                attributes={"perm": list(after)},
                                name=unique_name(graph, f"{base}.fused_transpose"))]
    spec, layout = fused.spec, fused.value_layout
    weight = fused.weight.detach().cpu().numpy()
    bias = (fused.bias.detach().cpu().numpy() if fused.bias is not None
            else np.zeros(spec.out_channels)).astype(dtype)
    name = unique_name(graph, f"{base}.fused")
    if layout in ("NC", "NLC", "NHWC"):
        matrix = dense_matrix(fused.weight.detach(), spec.groups).cpu().numpy().astype(dtype)
        b = initializer(graph, bias, unique_name(graph, f"{base}.fused_bias"))
        if layout == "NC":
            w = initializer(graph, matrix, unique_name(graph, f"{base}.fused_weight"))
            merge = []
            if fused.input_layout not in ("", layout):   # tokens' positions into the batch
                axis = 2 if fused.input_layout == "NLC" else 3
                merge = [ir.node("Flatten", [x], attributes={"axis": axis},
                                 name=unique_name(graph, f"{base}.fused_flatten"))]
                x = merge[0].outputs[0]
            return merge + [ir.node("Gemm", [x, w, b], attributes={"transB": 1}, name=name)]
        w = initializer(graph, np.ascontiguousarray(matrix.T),
                         unique_name(graph, f"{base}.fused_weight"))
        product = ir.node("MatMul", [x, w], name=name)
        return [product, ir.node("Add", [product.outputs[0], b],
                                 name=unique_name(graph, f"{base}.fused_bias_add"))]
    t, bottom, left, right = spec.padding
    attrs = {"strides": list(spec.stride), "dilations": list(spec.dilation),
             "group": spec.groups, "kernel_shape": list(spec.kernel_size),
             "pads": [t, left, bottom, right]}
    if layout == "NCL":
        weight = weight[:, :, 0]
        attrs.update(strides=[spec.stride[1]], dilations=[spec.dilation[1]],
                     kernel_shape=[spec.kernel_size[1]], pads=[left, right])
    if spec.transposed:
        attrs["pads"], attrs["output_padding"] = transposed_pads(spec)
    w = initializer(graph, weight.astype(dtype), unique_name(graph, f"{base}.fused_weight"))
    b = initializer(graph, bias, unique_name(graph, f"{base}.fused_bias"))
    kind = "ConvTranspose" if spec.transposed else "Conv"
    return [ir.node(kind, [x, w, b], attributes=attrs, name=name)]


def replace_with_conv(graph: ir.Graph, nodes: list[ir.Node], x: ir.Value, output: ir.Value,
                      fused) -> list[ir.Node]:
    """Replace ``nodes`` (computing ``output`` from ``x``) by the layer of ``fused`` (one
    Conv in most cases; returns the new nodes, the last one giving ``output``). A CastLike
    outside that takes its type from a value inside takes it from ``x`` instead (the same
    element type, computed before every node of the region); a Shape only the region reads
    dies with it."""
    sink = output.producer()
    members = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is output:
                continue
            for user, index in list(value.uses()):
                if user not in members and (type_only_use(user, value)
                                             or shape_only_use(user, members)):
                    user.replace_input_with(index, x)
    dtype = _numpy_dtype(output, fused.dtype or torch.float32)
    base = sink.name or output.name or "region"
    layer = _layer(graph, x, fused, dtype, base)
    feeders = {v for n in nodes for v in n.inputs if v is not None}
    ir.convenience.replace_nodes_and_values(graph, sink, nodes, layer, [output],
                                            [layer[-1].outputs[0]])
    _remove_dead(graph, feeders)
    return layer


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


#: the op types that hold a fused layer's weights
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def weighted_node(layer: list[ir.Node]) -> ir.Node:
    """The node of a fused layer (``replace_with_conv``) that holds its weights."""
    return next((n for n in layer if n.op_type in LAYER_OPS), layer[-1])
