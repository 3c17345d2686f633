"""The runtime-fused patterns (``region.patterns``) of an fx graph: activations and norms
written out in Python (``x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))``,
``F.relu6(x + 3) / 6``, ``x * torch.sigmoid(x)``, a LayerNorm from means), whose scales
and shifts linear regions leave alone so that an exported fused model still shows them
to the runtime whole."""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse.fx.values import Context, constant, tensor_meta
from repfuse.region.computed import Computed
from repfuse.region.patterns import Pattern, find_patterns

_FUNCTIONS = {
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    torch.true_divide: "div", operator.add: "add", torch.add: "add", operator.sub: "sub",
    torch.sub: "sub", torch.erf: "erf", torch.special.erf: "erf", torch.tanh: "tanh",
    F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", operator.pow: "pow",
    torch.pow: "pow", torch.mean: "mean", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal", F.relu6: "relu6",
}
_METHODS = {"mul": "mul", "div": "div", "add": "add", "sub": "sub", "erf": "erf",
            "tanh": "tanh", "sigmoid": "sigmoid", "pow": "pow", "mean": "mean",
            "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal"}
_MODULES = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU6: "relu6"}
_CLAMPS = (F.hardtanh, torch.clamp, torch.clip, "clamp", "clip")


class FxView:
    """``region.patterns.View`` of one module's fx graph."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def kind(self, node) -> str | None:
        if not isinstance(node, fx.Node) or tensor_meta(node) is None:
            return None
        if node.op == "call_module":
            m = self.ctx.module.get_submodule(node.target)
            if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0):
                return "relu6"
            return _MODULES.get(type(m))
        if node.op not in ("call_function", "call_method") or not node.args:
            return None
        if node.target in _CLAMPS:
            bounds = [self.scalar(a) for a in (*node.args[1:3], *node.kwargs.values())]
            return "relu6" if bounds == [0.0, 6.0] else None
        kind = (_FUNCTIONS if node.op == "call_function" else _METHODS).get(node.target)
        if kind in ("add", "sub") and node.kwargs.get("alpha", 1) != 1:
            return None
        if kind == "div" and node.kwargs.get("rounding_mode") is not None:
            return None
        return kind

    def operands(self, node) -> list:
        if self.kind(node) in ("mul", "div", "add", "sub", "pow"):
            other = node.args[1] if len(node.args) > 1 else node.kwargs.get(
                "other", node.kwargs.get("exponent"))
            return [node.args[0], other]
        return [node.args[0]]

    def users(self, node) -> list:
        return list(node.users)

    def scalar(self, operand) -> float | None:
        value, _ = constant(self.ctx, operand)
        if isinstance(value, Computed):
            if math.prod(value.shape) != 1:
                return None
            with torch.no_grad():
                value = value.value()
        if isinstance(value, Tensor):
            return float(value.reshape(())) if value.numel() == 1 else None
        return value

    def is_constant(self, operand) -> bool:
        return constant(self.ctx, operand)[0] is not None

    def trailing(self, mean) -> bool:
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        meta = tensor_meta(mean.args[0])
        if dims is None or meta is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(meta[0])
        return sorted(d % rank for d in dims) == list(range(rank - len(dims), rank))


def kept_patterns(graph: fx.Graph, ctx: Context) -> list[Pattern]:
    """The runtime-fused patterns of one module's graph."""
    return find_patterns(FxView(ctx), list(graph.nodes))
