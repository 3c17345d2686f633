"""What a conversion makes is freed when it is no longer used, by reference counting: no
reference cycle keeps the proofs' float64 copies of the weights or the activations captured
for them until the cyclic collector happens to run (on repvgg_b3 at 224x224 they were
1.06 GB, held after ``fuse`` returned)."""

from __future__ import annotations

import ast
import gc
import pathlib
import weakref

import pytest
import torch
import torch.fx as fx
from torch import nn

import repfuse
from repfuse.core.spec import ConvSpec
from repfuse.fx.trace import CAPTURE, CAPTURE_CHANNELS_LAST, captured
from repfuse.models.repvgg import RepVGGBlock
from repfuse.region import Add, BatchNorm, Conv, Input, substitute
from repfuse.region.computed import Computed
from repfuse.region.tree import materialized


@pytest.fixture
def no_collector():
    """The cyclic collector off: what is still alive is held by a reference or a cycle."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    gc.collect()


def _expr(weight):
    c = weight.shape[0]
    bn = BatchNorm(Conv(Input(c), weight, None, ConvSpec(c, c, 3, padding=1), "c"),
                   torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c), 1e-5, "bn")
    return Add((bn, Input(c)))


def test_substitute_leaves_no_cycle(no_collector):
    weight = torch.randn(4, 4, 3, 3)
    new = weight.double()
    ref = weakref.ref(new)
    out = substitute(_expr(weight), {id(weight): new})
    assert out.inputs[0].input.weight is new
    del out, new
    assert ref() is None


def test_materialized_leaves_no_cycle(no_collector):
    weight = torch.randn(4, 4, 3, 3)
    expr = _expr(weight)
    conv = expr.inputs[0].input
    conv.weight = Computed(lambda w: w * 2, (weight,), ("w",))
    out = materialized(expr, exact=True)
    value = out.inputs[0].input.weight
    assert value.dtype == torch.float64 and torch.equal(value, weight.double() * 2)
    ref = weakref.ref(value)
    del out, value
    assert ref() is None


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepVGGBlock(8, 8), RepVGGBlock(8, 8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_a_verified_conversion_leaves_nothing_to_the_collector(no_collector):
    """After ``fuse(verify=True)`` returns and its result is dropped, none of the float64
    tensors it made and none of the captured activations is alive."""
    model, x = _model(), torch.randn(1, 3, 16, 16)
    before = {id(o) for o in gc.get_objects()}
    result = repfuse.fuse(model, x, verify=True)
    assert result.report.ok and len(result.report.fused) == 2
    del result
    made = [o for o in gc.get_objects() if id(o) not in before]
    doubles = [t for t in made if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
    assert doubles == []
    nodes = [n for n in made if isinstance(n, fx.Node)]
    assert nodes     # the traced graphs' nodes wait for the collector (an fx graph is a cycle)
    assert all(captured(n, key) is None for n in nodes for key in (CAPTURE,
                                                                   CAPTURE_CHANNELS_LAST))


def _defs(node) -> list:
    """The functions defined in ``node``'s own scope (not inside a nested function)."""
    out, stack = [], list(ast.iter_child_nodes(node))
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(n)
        elif not isinstance(n, (ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(n))
    return out


def _nested_recursion(source: str) -> list[str]:
    """Nested functions that call themselves or a sibling: each call of the enclosing
    function leaves a reference cycle (function -> closure cell -> function) holding
    everything the closure holds."""
    found = []
    for outer in ast.walk(ast.parse(source)):
        if not isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        nested = _defs(outer)
        names = {n.name for n in nested}
        for n in nested:
            own = {d.name for d in _defs(n)}
            used = {x.id for x in ast.walk(n) if isinstance(x, ast.Name)} & names - own
            if used:
                found.append(f"{outer.name}.{n.name} -> {sorted(used)}")
    return found


def test_the_scan_finds_a_nested_recursion():
    assert _nested_recursion("def f(x):\n    def g(y):\n        return g(y - 1) if y else 0\n"
                             "    return g(x)\n") == ["f.g -> ['g']"]
    assert _nested_recursion("def f(x):\n    def g(y):\n        def h():\n            return y\n"
                             "        return h\n    return g(x)\n") == []


def test_no_nested_recursion_in_the_package():
    root = pathlib.Path(repfuse.__file__).resolve().parent.parent
    files = [p for d in ("repfuse", "cli", "models") for p in (root / d).rglob("*.py")]
    assert len(files) > 50
    found = [f"{p.relative_to(root)}: {hit}" for p in files
             for hit in _nested_recursion(p.read_text())]
    assert found == []
