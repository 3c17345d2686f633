"""Where each node type registers its reducer, reference evaluator and description.

``reducer(Conv)``, ``evaluator(Conv)`` and ``describer(Conv)`` are decorators used by
``region.reducers``, ``region.reference`` and ``region.description``; ``missing_rules`` names
the node types that lack one (a test asserts there are none, front-end rules included).
"""

from __future__ import annotations

from collections.abc import Callable

from repfuse.region.nodes import Node, node_types

REDUCERS: dict[type[Node], Callable] = {}
EVALUATORS: dict[type[Node], Callable] = {}
DESCRIBERS: dict[type[Node], Callable] = {}


def _register(table: dict, *types: type[Node]):
    def decorate(fn):
        for t in types:
            if t in table:
                raise ValueError(f"{t.__name__} already has a rule in this table")
            table[t] = fn
        return fn
    return decorate


def reducer(*types: type[Node]):
    """``fn(node, args, ctx)`` -> the node's reduced value (see ``region.reduce``)."""
    return _register(REDUCERS, *types)


def evaluator(*types: type[Node]):
    """``fn(node, args, x)`` -> the node's training-form output (``region.reference``)."""
    return _register(EVALUATORS, *types)


def describer(*types: type[Node]):
    """``fn(node, args)`` -> the branch kinds (``region.describe``)."""
    return _register(DESCRIBERS, *types)


def missing_rules(types: list[type[Node]] | None = None,
                  **front_ends: set[type[Node]]) -> list[str]:
    """``"<Type>: <table>"`` for every node type (all of them, or ``types``) without a
    reducer, evaluator, description, or (for each named front end: the set of types its
    rules produce) a rule that produces it. (Importing ``repfuse.region`` registers every
    rule of the package.)"""
    tables = {"reducer": REDUCERS, "evaluator": EVALUATORS, "describer": DESCRIBERS}
    out = []
    for t in types if types is not None else node_types():
        out += [f"{t.__name__}: {name}" for name, table in tables.items() if t not in table]
        out += [f"{t.__name__}: {name} rule" for name, made in front_ends.items()
                if t not in made]
    return out
