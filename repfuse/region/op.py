"""What both front ends share about a graph node that is a linear op of a region.

``OpKind`` is the one vocabulary of operation kinds; ``LinearOp`` is what a front-end
rule returns for a node (its activation inputs and the builder of its region-expression
node); ``is_region_value`` is the one test of whether a value can flow through a region.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from repfuse.region.kinds import GEOMETRIC, OpKind
from repfuse.region.nodes import Node

__all__ = ["GEOMETRIC", "LinearOp", "OpKind", "is_region_value", "produced", "produces"]

V = TypeVar("V")


@dataclass(eq=False)
class LinearOp(Generic[V]):
    """A linear op: its activation inputs (graph values of the front end) and the builder
    of its expression node from theirs. ``blocked`` set: it looks linear but must not be
    fused (a module used twice, a weight that is not a parameter, ...), the reason says
    why. ``source``: front-end objects behind it (fx modules, an ONNX node)."""

    kind: OpKind
    inputs: list[V]
    build: Callable[[list[Node]], Node]
    blocked: str = ""
    label: str = ""
    source: list[Any] = field(default_factory=list)


def produces(*types: type[Node]):
    """Mark a front-end rule with the node types its expressions are made of (read by
    ``produced``, which the completeness test checks against every node type)."""
    def mark(rule):
        rule.produces = frozenset(types)
        return rule
    return mark


def produced(rules) -> set[type[Node]]:
    """Every node type the given rules declare they produce."""
    out: set[type[Node]] = set()
    for rule in rules:
        out |= getattr(rule, "produces", frozenset())
    return out


def is_region_value(shape: Sequence[int] | None, dtype: torch.dtype | None) -> bool:
    """Whether a value of this shape and dtype can flow through a region: a floating
    activation of rank 2 to 4 ((N, C), (N, C, L) / (N, L, C), (N, C, H, W) / (N, H, W, C);
    see ``region.layout``)."""
    return shape is not None and 2 <= len(shape) <= 4 and dtype is not None \
        and dtype.is_floating_point
