"""Every region node type declares its facts and has all its rules: a reducer, a reference
evaluator, a description, and a rule in each front end that produces it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.fx.ops import produced_types as fx_types
from repfuse.onnx.match import produced_types as onnx_types
from repfuse.region.nodes import node_types
from repfuse.region.registry import missing_rules


def test_every_node_type_has_every_rule():
    assert missing_rules(fx=fx_types(), onnx=onnx_types()) == []


def test_a_node_type_without_rules_is_named():
    @dataclass(eq=False)
    class Crop(rg.Node):
        input: rg.Node

    missing = missing_rules([Crop], fx=fx_types(), onnx=onnx_types())
    assert missing == ["Crop: reducer", "Crop: evaluator", "Crop: describer",
                       "Crop: fx rule", "Crop: onnx rule"]


def test_facts_drive_the_tree_utilities():
    w, b = torch.randn(4, 4, 3, 3), torch.randn(4)
    x = rg.Input(4)
    conv = rg.Conv(x, w, b, ConvSpec(4, 4, 3, 1, 1), "c")
    expr = rg.Sub(rg.Shift(conv, torch.ones(4), "s"), x)
    assert rg.children(expr) == (expr.left, x)
    assert [type(n).__name__ for n in rg.walk(expr)] == ["Input", "Conv", "Shift", "Sub"]
    assert set(rg.parameters(expr)) == {"c.weight", "c.bias", "s.value"}
    assert rg.Input.links == () and all(t.links for t in node_types() if t is not rg.Input)
