"""ATen graphs of ``torch.export`` programs, lowered to the torch functions the fx front
end classifies (so a ``.pt2`` program fuses like the ``nn.Module`` it came from)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def _aten_lowering() -> dict:
    import operator

    import torch.nn.functional as F

    aten = torch.ops.aten
    return {aten.conv2d.default: F.conv2d, aten.cat.default: torch.cat,
            aten.mul.Tensor: operator.mul, aten.div.Tensor: operator.truediv,
            aten.neg.default: operator.neg, aten.add.Tensor: operator.add,
            aten.sub.Tensor: operator.sub, aten.relu.default: torch.relu}


def lower_aten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite the ATen calls of an exported graph that linear regions are made of (conv2d,
    batch_norm, add, sub, mul, div, neg, cat) as the torch functions they stand for, so the
    fx front end sees the same graph as for an ``nn.Module``. In place; returns ``gm``."""
    import torch.nn.functional as F

    table = _aten_lowering()
    bn = torch.ops.aten.batch_norm.default
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in table and "alpha" not in node.kwargs:
            node.target = table[node.target]
        elif node.target == bn and len(node.args) >= 8 and not node.kwargs:
            x, w, b, mean, var, training, momentum, eps = node.args[:8]
            node.target = F.batch_norm
            node.args = (x, mean, var, w, b, training, momentum, eps)
    gm.graph.lint()
    gm.recompile()
    return gm


def program_module(program, example: torch.Tensor | None = None) -> nn.Module:
    """An ``nn.Module`` for an exported program that repfuse can fuse: a plain GraphModule
    (the unlifted module refuses ``.eval()``) with its ATen ops lowered (see ``lower_aten``).
    When ``example`` is given, the lowered module must reproduce the program's output on it,
    otherwise the unlowered module is returned."""
    unlifted = program.module()
    plain = torch.fx.GraphModule(unlifted, unlifted.graph)
    lowered = lower_aten(torch.fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph)))
    if example is None:
        return lowered
    with torch.no_grad():
        try:
            same = torch.equal(lowered(example), plain(example))
        except Exception:
            same = False
    return lowered if same else plain
