"""The runtime-fused patterns (``region.patterns``) of an ONNX graph: the nodes linear
regions leave alone.

The view maps ONNX ops to the pattern kinds: Mul, Div, Add, Sub, Erf, Tanh, Sigmoid,
Clip to [0, 6] (``relu6``), Pow, ReduceMean, Sqrt, Reciprocal; constants are what
``match.Constants`` resolves (initializers, Constant nodes, small folded subgraphs).
"""

from __future__ import annotations

import onnx_ir as ir

from repfuse.onnx.match import Constants
from repfuse.region.patterns import Pattern, find_patterns

_KINDS = {"Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub", "Erf": "erf",
          "Tanh": "tanh", "Sigmoid": "sigmoid", "Pow": "pow", "ReduceMean": "mean",
          "Sqrt": "sqrt", "Reciprocal": "reciprocal"}
_OUTPUT = object()      # stands for a graph output among a value's users


class OnnxView:
    """``region.patterns.View`` of one onnx_ir graph."""

    def __init__(self, consts: Constants) -> None:
        self.consts = consts

    def _node(self, value) -> ir.Node | None:
        if not isinstance(value, ir.Value) or value.index() != 0:
            return None
        node = value.producer()
        return node if node is not None and node.domain in ("", "ai.onnx") else None

    def kind(self, value) -> str | None:
        node = self._node(value)
        if node is None or self.consts(value) is not None:
            return None
        if node.op_type == "Clip":
            return "relu6" if self._clip_bounds(node) == (0.0, 6.0) else None
        return _KINDS.get(node.op_type)

    def _clip_bounds(self, node: ir.Node):
        if len(node.inputs) > 1:
            bounds = [self.scalar(v) if v is not None else None for v in node.inputs[1:3]]
            return tuple(bounds) if len(bounds) == 2 else None
        return (node.attributes.get_float("min", float("-inf")),
                node.attributes.get_float("max", float("inf")))

    def operands(self, value) -> list:
        return list(self._node(value).inputs)

    def users(self, value) -> list:
        out, seen = [], set()
        for node in value.consumers():
            if id(node) not in seen:
                seen.add(id(node))
                out.append(node.outputs[0] if node.outputs else _OUTPUT)
        return out + ([_OUTPUT] if value.is_graph_output() else [])

    def scalar(self, operand) -> float | None:
        array = self.consts(operand) if isinstance(operand, ir.Value) else None
        if array is None or array.size != 1 or array.dtype.kind not in "fiu":
            return None
        return float(array.reshape(()))

    def is_constant(self, operand) -> bool:
        return isinstance(operand, ir.Value) and self.consts(operand) is not None

    def trailing(self, mean) -> bool:
        node = self._node(mean)
        axes = node.attributes.get("axes")
        if axes is not None:
            axes = list(axes.as_ints())
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            found = self.consts(node.inputs[1])
            axes = None if found is None else [int(a) for a in found.reshape(-1)]
        shape = node.inputs[0].shape
        if not axes:        # all axes (or unknown): not a LayerNormalization
            return False
        rank = len(shape) if shape is not None else None
        if rank is None:
            return sorted(axes) == list(range(-len(axes), 0))
        return sorted(a % rank for a in axes) == list(range(rank - len(axes), rank))


def kept_patterns(graph: ir.Graph, consts: Constants) -> list[Pattern]:
    """The runtime-fused patterns of ``graph`` (not of its subgraphs)."""
    values = [node.outputs[0] for node in graph if node.outputs]
    return find_patterns(OnnxView(consts), values)


def kept_nodes(patterns: list[Pattern]) -> set[ir.Node]:
    return {v.producer() for p in patterns for v in p.values}
