"""``fx.reach`` traces one module of each structure and copies its graph for the modules
that read the same (``fx.structure.structure_key``): every graph must be the one a trace of
its own module records, on real models and where instances differ in what their forward
reads; a trace that changes a module (fx storing a tensor constant, a forward setting a
flag) is not copied; a copy holds none of the values recorded of another module's run."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import reach_idioms
from helpers.zoo import ZOO, make
from torch import nn

import repfuse
from repfuse.fx import fuse as fx_fuse
from repfuse.fx import structure as fx_structure
from repfuse.fx import trace as fx_trace
from repfuse.fx.reach import reach
from repfuse.fx.structure import structure_key
from repfuse.fx.trace import CAPTURE, META, captured, forward_function
from repfuse.pristine import untouched

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repfuse-ultralytics-"))
from ultralytics.nn import tasks  # noqa: E402  (a test dependency: never skipped)


def _graphs(model: nn.Module, x, reuse: bool, monkeypatch):
    """{module path: (graph code, recorded shapes)} of every traced unit, and the run."""
    with monkeypatch.context() as m:
        if not reuse:
            m.setattr(fx_trace, "structure_key", lambda *args, **kwargs: None)
        with untouched(model):    # as ``fuse`` runs it: fx's constants are not kept
            found = reach(model, (x,), fx_fuse._capture)
    out = {}
    for unit in found.units.values():
        if unit.graph is not None:
            shapes = [n.meta.get(META) for n in unit.graph.nodes]
            out[unit.path] = (unit.graph.python_code("self").src, shapes)
    return out, found


def _same_as_traced(model: nn.Module, x, monkeypatch) -> int:
    model.eval()
    traced, _ = _graphs(model, x, False, monkeypatch)
    copied, found = _graphs(model, x, True, monkeypatch)
    assert copied.keys() == traced.keys()
    for path, (code, shapes) in traced.items():
        assert copied[path][0] == code, path
        assert copied[path][1] == shapes, path
    return found.copied


@pytest.mark.parametrize("name, least", [("mobileone_s0", 400), ("repvgg_a0", 90),
                                         ("fastvit_t8", 100)])
def test_timm_models_get_the_graphs_their_own_traces_record(name, least, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    assert _same_as_traced(model, torch.randn(1, 3, 64, 64), monkeypatch) >= least


def test_ultralytics_yolo_gets_the_graphs_its_own_traces_record(monkeypatch):
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False)
    assert _same_as_traced(model, torch.randn(1, 3, 64, 64), monkeypatch) > 0


@pytest.mark.parametrize("name", sorted(reach_idioms.IDIOMS))
def test_idioms_get_the_graphs_their_own_traces_record(name, monkeypatch):
    model, x, _ = reach_idioms.IDIOMS[name]()
    _same_as_traced(model, x, monkeypatch)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_gets_the_graphs_its_own_traces_record(name, monkeypatch):
    _same_as_traced(make(name), torch.randn(2, 3, 12, 12, dtype=torch.float64), monkeypatch)


# ------------------------------------------------------------ what tells instances apart
class _Scaled(nn.Module):
    """A forward that bakes a plain attribute into its graph as a constant."""

    def __init__(self, scale) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        return self.conv(x) * self.scale


class _Strided(nn.Module):
    """A forward that reads its submodule's attribute (the shortcut only at stride 1)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, stride=stride, padding=1)

    def forward(self, x):
        if self.conv.stride == (1, 1):
            return self.conv(x) + x
        return self.conv(x)


class _Gated(nn.Module):
    """A layer that may be None in place of a module."""

    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gate = nn.Sigmoid() if gate else None

    def forward(self, x):
        y = self.conv(x)
        return y if self.gate is None else y * self.gate(y)


class _Seq(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            if float(x.detach().abs().sum()) >= 0:   # data-dependent: each block is its own unit
                x = b(x)
        return x


def test_instances_that_read_different_values_are_traced_apart(monkeypatch):
    model = _Seq(_Scaled(2.0), _Scaled(2.0), _Scaled(True), _Scaled(1), _Scaled(0.0),
                 _Scaled(-0.0), _Scaled((1, 2)[0]), _Strided(1), _Strided(2), _Strided(1),
                 _Gated(True), _Gated(False), _Gated(True))
    copied = _same_as_traced(model, torch.randn(1, 4, 8, 8), monkeypatch)
    # 2.0 twice, 1 (after True: not a copy of it) and (1, 2)[0], stride 1 twice, a gate twice
    assert copied == 4


def test_keys_tell_apart_what_a_trace_bakes():
    fo = lambda m: forward_function(m, type(m).forward)  # noqa: E731
    assert structure_key(_Scaled(2.0), fo) == structure_key(_Scaled(2.0), fo)
    assert structure_key(_Scaled(True), fo) != structure_key(_Scaled(1), fo)
    assert structure_key(_Scaled(0.0), fo) != structure_key(_Scaled(-0.0), fo)
    assert structure_key(_Strided(1), fo) != structure_key(_Strided(2), fo)
    assert structure_key(_Gated(True), fo) != structure_key(_Gated(False), fo)
    wide = _Scaled(2.0)
    wide.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    assert structure_key(wide, fo) != structure_key(_Scaled(2.0), fo)
    # what a key cannot stand for: a list, a plain tensor attribute, a hook, itself below
    listed, tensor, hooked, cyclic = _Scaled([1]), _Scaled(torch.ones(1)), _Scaled(2.0), \
        _Seq(_Scaled(2.0))
    hooked.conv.register_forward_hook(lambda *args: None)
    cyclic.blocks[0].back = cyclic
    for m in (listed, tensor, hooked, cyclic):
        assert structure_key(m, fo) is None


# ---------------------------------------------------------------- traces that change modules
class _Constant(nn.Module):
    """A tensor made in forward: fx stores it on the module traced (``_tensor_constant0``)
    and reads it back through ``get_attr``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * torch.tensor([2.0])


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 3.0 if getattr(self, "tripled", False) else y


class _Setter(nn.Module):
    """A forward that sets a flag on its submodule before calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        self.inner.tripled = True
        return self.inner(x)


def _fuses(model: nn.Module, x) -> None:
    result = repfuse.fuse(model, x)
    assert result.report.ok and len(result.report.fused) == 3
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    return result


def test_a_tensor_made_in_forward_is_kept_with_the_graph(monkeypatch):
    """The trace leaves the module as it was (the constant is the unit's, not stored on
    the module), copies carry it, and a rewritten module holds it as a buffer that is not
    saved. (Before, fx stored it on the module, the run's restore removed it, and the
    fused model failed: "'_Constant' object has no attribute '_tensor_constant0'".)"""
    torch.manual_seed(0)
    model = reach_idioms.randomize(_Seq(_Constant(), _Constant(), _Constant())).eval()
    x = torch.randn(1, 4, 8, 8)
    assert _same_as_traced(model, x, monkeypatch) == 2
    assert not any("_tensor_constant0" in vars(b) for b in model.blocks)
    fused = _fuses(model, x).model
    for block in fused.blocks:
        assert "_tensor_constant0" in block._buffers
        assert "_tensor_constant0" in block._non_persistent_buffers_set
    assert fused.state_dict().keys() <= model.state_dict().keys()
    fused.double()      # a buffer follows the model's dtype and device
    assert all(b._tensor_constant0.dtype == torch.float64 for b in fused.blocks)


class _ScaledNormAct(nn.BatchNorm2d):
    """A norm with its activation and a scale made in forward, opened into its caller's
    graph (a conv followed by a module that starts with a norm): the caller's graph reads
    the constant under the norm's path."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return self.act(x) * torch.tensor([0.5])


class _ConvNormAct(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = _ScaledNormAct(c)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_tensor_made_in_an_opened_module_is_kept_under_its_path():
    torch.manual_seed(0)
    model = reach_idioms.randomize(nn.Sequential(*(_ConvNormAct(4) for _ in range(3)))).eval()
    x = torch.randn(1, 4, 8, 8)
    fused = _fuses(model, x).model
    for block in fused:
        assert "bn.weight" not in dict(block.named_parameters())     # folded into the conv
        assert "_tensor_constant0" in block.bn._non_persistent_buffers_set
    assert fused.state_dict().keys() <= model.state_dict().keys()


def test_a_trace_that_changes_a_module_is_not_copied(monkeypatch):
    torch.manual_seed(0)
    model = reach_idioms.randomize(_Seq(_Setter(), _Setter(), _Setter())).eval()
    x = torch.randn(1, 4, 8, 8)
    # every _Setter is traced (a copy would not set the flag, and its _Inner would be
    # traced without it: another graph); the flagged _Inner of the later two are copies
    assert _same_as_traced(model, x, monkeypatch) == 2
    _fuses(model, x)


class _PlainWrites(_Inner):
    """A class whose own ``__setattr__`` writes plain values past ``nn.Module``'s."""

    def __setattr__(self, name, value):
        if isinstance(value, (nn.Module, torch.Tensor)):
            super().__setattr__(name, value)
        else:
            object.__setattr__(self, name, value)


class _PlainSetter(_Setter):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _PlainWrites()


def test_a_class_that_writes_past_the_watch_is_always_traced(monkeypatch):
    """The watch sees writes through ``nn.Module``'s methods only: a module whose class has
    a ``__setattr__`` of its own (here one that sets the flag with ``object.__setattr__``),
    and every module above it, has no key, so each is traced (the watch's rule for a trace
    that writes, kept where the watch cannot see the write), and gets its own graph."""
    torch.manual_seed(0)
    model = reach_idioms.randomize(_Seq(_PlainSetter(), _PlainSetter(), _PlainSetter())).eval()
    x = torch.randn(1, 4, 8, 8)
    assert _same_as_traced(model, x, monkeypatch) == 0
    _fuses(model, x)
    assert structure_key(model.blocks[0].inner, lambda m: type(m).forward) is None
    assert structure_key(model.blocks[0], lambda m: type(m).forward) is None
    assert not fx_structure._writes_unseen(nn.LSTM)     # torch's own calls nn.Module's


def test_a_copy_records_its_own_run():
    """Each block's graph is its own: the shapes and the captured windows at its nodes are
    those of its own input, not of the block whose trace was copied."""
    torch.manual_seed(0)
    model = nn.Sequential(*(reach_idioms.RepBlock(4) for _ in range(3))).eval()
    x = torch.randn(1, 4, 8, 8)
    found = reach(model, (x,), fx_fuse._capture)
    assert found.copied >= 2
    inputs, y = [], x
    with torch.no_grad():
        for block in model:
            inputs.append(y)
            y = block(y)
    boxes = []
    for block, value in zip(model, inputs):
        graph = found.graph(block).graph
        first = next(n for n in graph.nodes if n.op == "placeholder")
        window = captured(first)
        assert window is not None
        torch.testing.assert_close(window, value[:1, :, :window.shape[2], :window.shape[3]],
                                   rtol=0, atol=0)
        boxes.append(first.meta[CAPTURE])
    assert len({id(b) for b in boxes}) == len(boxes)


class _Keyed(nn.Module):
    """A forward whose input is a dict: its graph's code generator holds pytree specs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, inputs):
        return {"y": self.conv(inputs["x"]) + 1}


def test_a_graph_copy_is_what_a_deep_copy_makes():
    graph = fx.symbolic_trace(_Keyed()).graph
    for node in graph.nodes:
        node.meta["mark"] = [node.name]
    copied, deep = fx_trace._graph_copy(graph), copy.deepcopy(graph)
    assert copied.python_code("self").src == deep.python_code("self").src
    assert type(copied._codegen) is type(graph._codegen) \
        and copied._codegen is not graph._codegen
    for old, new in zip(graph.nodes, copied.nodes):
        assert new is not old and new.graph is copied and new.name == old.name
        assert new.meta is not old.meta and new.meta == old.meta
        assert all(a.graph is copied for a in new.all_input_nodes)
    last = next(n for n in copied.nodes if n.op == "call_function")
    last.args = (last.args[0], 2)           # the copy changes alone
    assert copied.python_code("self").src != graph.python_code("self").src
    assert graph.python_code("self").src == deep.python_code("self").src
