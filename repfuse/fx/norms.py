"""Recognizing an eval-mode batch norm in an fx graph, for the rules that move norms
(``fx.distribute``, ``fx.readers``).

What is matched: a call of an ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` module (its own
forward, eval mode, running statistics, no hooks, one argument), or ``F.batch_norm`` with
``training=False`` whose statistics, weight and bias are parameters or buffers
(``get_attr`` nodes, as an inlined ``BatchNormAct2d`` runs it). What it gives: the
targets of its statistics, weight and bias (``None`` where it has none) and its eps, so a
rule can compute copies of the norm from the norm's own tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repfuse.fx.trace import hook_reason
from repfuse.fx.values import bind

__all__ = ["EvalNorm", "eval_norm"]

STATS = ("running_mean", "running_var", "weight", "bias")
_NORM_FORWARD = nn.modules.batchnorm._BatchNorm.forward


@dataclass(frozen=True)
class EvalNorm:
    """An eval-mode batch norm node: ``stats`` maps each of ``STATS`` to the target of
    its tensor (or None), ``eps`` its epsilon."""

    node: fx.Node
    stats: dict
    eps: float

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def eval_norm(node: fx.Node, root: nn.Module,
              types: tuple[type, ...] = (nn.BatchNorm2d,)) -> EvalNorm | None:
    """The eval-mode batch norm ``node`` is (a module of ``types``, or ``F.batch_norm``),
    or None."""
    if node.op == "call_module":
        m = _module(root, node)
        if not isinstance(m, types) or type(m).forward is not _NORM_FORWARD \
                or m.training or m.running_mean is None or hook_reason(m) \
                or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        return EvalNorm(node, {k: f"{node.target}.{k}" if getattr(m, k) is not None else None
                               for k in STATS}, float(m.eps))
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    a = bind(node)
    if a is None or a["training"] is not False or not isinstance(a["eps"], (int, float)) \
            or not isinstance(a["input"], fx.Node) or node.args[0] is not a["input"]:
        return None
    stats = {k: a[k] for k in STATS}
    if any(v is not None and (not isinstance(v, fx.Node) or v.op != "get_attr")
           for v in stats.values()) or stats["running_mean"] is None \
            or stats["running_var"] is None:
        return None
    return EvalNorm(node, {k: None if v is None else v.target for k, v in stats.items()},
                    float(a["eps"]))
