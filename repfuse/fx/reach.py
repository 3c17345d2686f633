"""One real forward pass of the model that reaches every module it runs.

``reach(root, args, capture) -> Reach`` calls the model once on the example inputs with a
dispatcher installed on every module (an instance-level ``forward``, removed afterwards):

* a module is traced (``repfuse.fx.trace``) at its first call, with the submodules it
  calls as leaves (or given a copy of the graph of a module traced before that reads
  the same: ``fx.structure``); a traced module runs through its graph
  (``_GraphRunner``: the loop of ``fx.Interpreter``), whose ``call_module`` nodes call
  the submodules, so their dispatchers run too;
* a module that cannot be traced (or is called with arguments its trace does not take)
  runs its own Python on real values, and the modules it calls are dispatched in turn:
  reach descends through loops over ModuleLists and iterated Sequentials, list
  mutation, attribute routing and data-dependent checks, to the modules that trace.

The whole run happens inside one torch.fx patching session (``_NestedTracer.session``):
every trace it makes shares one patching of ``nn.Module``, and real calls pass through.

Containers handed from a graph to Python code are plain lists and dicts (never fx's
immutable ones). What is recorded: each graph value's shape and dtype (and, for the
proofs, a window of each value a region could start at: ``fx.trace.capture_crop``),
every module that ran, the graph nodes it was called from, whether it was called from
Python that was not traced (and from which module), and whether every call matched its
trace.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from repfuse.fx.trace import (
    CAPTURE,
    CAPTURE_CHANNELS_LAST,
    META,
    Captured,
    ModuleGraph,
    _NestedTracer,
    capture_crop,
    is_torch_leaf,
)

__all__ = ["TORCH_LAYER", "Reach", "reach"]

#: The reason a torch.nn layer's own code is not traced.
TORCH_LAYER = "a torch.nn layer, run as it is"


@dataclass(eq=False)
class _Call:
    """A frame of the running model: the unit running and, while a graph runs a
    ``call_module`` node, that node and its module."""

    unit: ModuleGraph
    node: fx.Node | None = None
    target: nn.Module | None = None


@dataclass(eq=False)
class Reach:
    """What the real forward pass found."""

    root: nn.Module
    #: every traced or opaque unit by ``id(module)`` (torch.nn layers are not units)
    units: dict[int, ModuleGraph] = field(default_factory=dict)
    #: ids of every module that ran (torch.nn layers included)
    ran: set[int] = field(default_factory=set)
    #: per module id: the graph nodes that called it
    sites: dict[int, set[fx.Node]] = field(default_factory=dict)
    #: per module id: the innermost unit whose untraced Python called it
    from_python: dict[int, ModuleGraph] = field(default_factory=dict)
    #: ids of modules called with arguments their trace does not take (they ran their
    #: own Python)
    unplain: set[int] = field(default_factory=set)
    #: units called from untraced Python, in the order they first ran
    entries: list[ModuleGraph] = field(default_factory=list)
    #: per traced module id: a submodule that changed a container the graph handed it
    #: (the graph, traced before, may not see the change: the module is not rewritten)
    changed_args: dict[int, str] = field(default_factory=dict)
    #: every capture made (``node.meta``'s boxes), for ``drop_captures``
    captured: list[Captured] = field(default_factory=list)
    #: units whose graph is a copy of another module's trace (``fx.structure``)
    copied: int = 0

    def drop_captures(self) -> None:
        """Free the activations captured for the proofs (once the regions are proven), at
        every node that holds one (``fx.trace.Captured``)."""
        for box in self.captured:
            box.value = None
        self.captured.clear()

    def uses(self, m: nn.Module) -> int:
        """Call sites of ``m``: graph nodes that called it, plus one for all calls from
        untraced Python (a rewrite of the module itself serves every such call)."""
        return len(self.sites.get(id(m), ())) + (id(m) in self.from_python)

    def plain(self, m: nn.Module) -> bool:
        return id(m) in self.ran and id(m) not in self.unplain

    def graph(self, m: nn.Module) -> ModuleGraph | None:
        unit = self.units.get(id(m))
        return unit if unit is not None and unit.graph is not None else None

    @property
    def opaque(self) -> list[ModuleGraph]:
        return [u for u in self.units.values() if u.graph is None and id(u.module) in self.ran]


def _mutable(value, made: list):
    """``value`` with fx's immutable lists and dicts (containers written in a graph's
    arguments) replaced by plain ones, recursively; every container made is appended to
    ``made`` with its items, to see afterwards whether the callee changed it."""
    if type(value) is immutable_list:
        out = [_mutable(v, made) for v in value]
        made.append((out, list(out)))
        return out
    if type(value) is immutable_dict:
        out = {k: _mutable(v, made) for k, v in value.items()}
        made.append((out, dict(out)))
        return out
    if type(value) is tuple:
        return tuple(_mutable(v, made) for v in value)
    return value


def _changed(made: list) -> bool:
    """Whether a container ``_mutable`` made now holds other items than it was made with."""
    for now, was in made:
        keys = list(was) if isinstance(was, dict) else range(len(was))
        if len(now) != len(was) or (isinstance(was, dict) and now.keys() != was.keys()) \
                or any(now[k] is not was[k] for k in keys):
            return True
    return False


def _record(node: fx.Node, value, capture: Callable[[fx.Node], bool] | None,
            crop: int, boxes: list[Captured], seen: dict[int, tuple]) -> None:
    if isinstance(value, Tensor) and META not in node.meta:
        node.meta[META] = (tuple(value.shape), value.dtype)
        if capture is None or not capture(node):
            return
        # One value reaches several nodes: the node of the parent's graph that made it,
        # the placeholder of every unit it is passed to (2.5 nodes a value on timm
        # mobileone_s0). Those nodes share its boxes while it is the same tensor, unchanged
        # since (its version counter: an in-place op or a write to a view bumps it).
        plain = type(value) is Tensor and not value.is_inference()
        if plain:
            known = seen.get(id(value))
            if known is not None and known[0]() is value and known[1] == value._version:
                node.meta.update(known[2])
                return
        copies = {}
        if value.dim() == 4 and type(value) is Tensor and value.layout == torch.strided \
                and not value.is_quantized:
            # the window in either layout (see ``fx.trace.CAPTURE``), each one view made
            # with ``as_strided`` (a slice per axis cost 12 us more a node: 1,680 nodes of
            # timm mobileone_s0)
            n, ch, h, w = value.shape
            strides = value.stride()
            copies[CAPTURE] = value.as_strided((min(n, 1), ch, min(h, crop), min(w, crop)),
                                               strides)
            copies[CAPTURE_CHANNELS_LAST] = value.as_strided(
                (min(n, 1), min(ch, crop), min(h, crop), w), strides)
        elif value.dim() == 4:
            copies[CAPTURE] = value[:1, :, :crop, :crop]
            copies[CAPTURE_CHANNELS_LAST] = value[:1, :crop, :crop, :]
        elif value.dim() in (2, 3):
            copies[CAPTURE] = value[:2]   # vectors, tokens, sequences
        made = {}
        for key, window in copies.items():
            made[key] = Captured(window.detach().clone())
            boxes.append(made[key])
        node.meta.update(made)
        if plain:
            seen[id(value)] = (weakref.ref(value), value._version, made)


class _GraphRunner:
    """Runs one unit's graph on real values, node by node; submodules are called (their
    dispatchers decide how they run). What ``fx.Interpreter.run`` does (inputs and
    outputs through the graph's codegen, placeholders' defaults, each value freed after
    its last use), without what reach has no use for and paid for at every call: the
    interpreter's dict of every submodule below the unit (the root's run listed all 469
    modules of timm mobileone_s0, and every unit below it its own), a progress bar per run
    and a context manager per node."""

    def __init__(self, session: _Session, frame: _Call) -> None:
        self.session = session
        self.frame = frame
        self.node: fx.Node | None = None

    def run(self, *args):
        graph = self.frame.unit.graph
        last: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            for n in node.all_input_nodes:
                last[n] = node
        frees: dict[fx.Node, list[fx.Node]] = {}
        for n, user in last.items():
            frees.setdefault(user, []).append(n)
        env: dict[fx.Node, object] = {}
        inputs = iter(graph.process_inputs(*args))
        session = self.session
        for node in graph.nodes:
            self.node = node
            try:
                out = self._run_node(node, env, inputs)
            except Exception as err:
                if hasattr(err, "add_note"):   # Python >= 3.11
                    err.add_note(f"while running {node.format_node()} of "
                                 f"{self.frame.unit.path or '(root)'}")
                raise
            _record(node, out, session.capture, session.crop, session.found.captured,
                    session.windows)
            if node.op == "output":
                return graph.process_outputs(out)
            env[node] = out
            for n in frees.get(node, ()):
                del env[n]
        raise RuntimeError(f"the graph of {self.frame.unit.path or '(root)'} has no output")

    def _run_node(self, node: fx.Node, env: dict, inputs):
        op, target = node.op, node.target
        if op == "placeholder":
            if target.startswith("*"):
                return list(inputs)
            value = next(inputs, _MISSING)
            if value is not _MISSING:
                return value
            if node.args:
                return node.args[0]     # the parameter's default
            raise RuntimeError(f"no value passed for parameter {target}")
        if op == "get_attr":
            unit = self.frame.unit
            return unit.constants[target] if target in unit.constants \
                else _fetch(unit.module, target)
        args = fx.node.map_arg(node.args, env.__getitem__)
        if op == "output":
            return args[0]
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if op == "call_function":
            return target(*args, **kwargs)
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if op == "call_module":
            return self.call_module(target, args, kwargs)
        raise RuntimeError(f"unknown graph node kind {op!r} ({node.format_node()})")

    def call_module(self, target, args, kwargs):
        sub = _fetch(self.frame.unit.module, target)
        self.frame.node, self.frame.target = self.node, sub
        made: list = []
        try:
            return sub(*_mutable(args, made), **_mutable(kwargs, made))
        finally:
            self.frame.node = self.frame.target = None
            if _changed(made):  # the graph may read the container after the call
                self.session.found.changed_args[id(self.frame.unit.module)] = target


_MISSING = object()


def _fetch(module: nn.Module, target: str):
    """The attribute at dotted path ``target`` below ``module``."""
    value = module
    for i, atom in enumerate(target.split(".")):
        if not hasattr(value, atom):
            raise RuntimeError(f"the graph reads {target}, which does not exist "
                               f"({'.'.join(target.split('.')[:i + 1])} is missing)")
        value = getattr(value, atom)
    return value


class _Session:
    def __init__(self, root: nn.Module, n_inputs: int,
                 capture: Callable[[fx.Node], bool] | None) -> None:
        self.found = Reach(root)
        self.n_inputs = n_inputs
        self.capture = capture
        self.crop = capture_crop(root) if capture is not None else 0
        #: per captured tensor's id: (weak reference, version, its boxes) (``_record``)
        self.windows: dict[int, tuple] = {}
        self.paths = {id(m): p for p, m in root.named_modules()}
        self.forwards: dict[int, object] = {}
        self.stack: list[_Call] = []
        self.tracer = _NestedTracer(self.found.units, self.paths, self.forwards)

    # ------------------------------------------------------------------ units
    def unit(self, m: nn.Module, n_args: int) -> ModuleGraph:
        found = self.found
        if id(m) not in found.units:
            n = self.n_inputs if m is found.root else n_args
            found.units[id(m)] = self.tracer.nested(m, self.paths.get(id(m), ""), n)
        return found.units[id(m)]

    def note_call(self, m: nn.Module) -> bool:
        """Record a call of ``m``; whether it comes from a graph node."""
        found = self.found
        found.ran.add(id(m))
        if not self.stack:
            return False
        caller = self.stack[-1]
        if caller.target is m and caller.node is not None:
            found.sites.setdefault(id(m), set()).add(caller.node)
            caller.node = caller.target = None  # one call per node
            return True
        found.from_python.setdefault(id(m), caller.unit)
        return False

    # ------------------------------------------------------------------ dispatch
    def dispatcher(self, m: nn.Module, forward):
        def dispatch(*args, **kwargs):
            from_graph = self.note_call(m)
            if is_torch_leaf(m):
                if not m._modules:
                    return forward(*args, **kwargs)
                self.stack.append(_Call(ModuleGraph(m, self.paths.get(id(m), ""), None,
                                                    reason=TORCH_LAYER)))
                try:  # a torch.nn layer with layers inside (nn.TransformerEncoderLayer)
                    return forward(*args, **kwargs)
                finally:
                    self.stack.pop()
            unit = self.unit(m, len(args))
            if unit.graph is not None and not kwargs and len(args) == unit.n_inputs:
                if not from_graph and self.stack and unit not in self.found.entries:
                    self.found.entries.append(unit)
                frame = _Call(unit)
                self.stack.append(frame)
                try:
                    return _GraphRunner(self, frame).run(*args)
                finally:
                    self.stack.pop()
            if unit.graph is not None:
                self.found.unplain.add(id(m))
            self.stack.append(_Call(unit))
            try:
                return forward(*args, **kwargs)
            finally:
                self.stack.pop()
        return dispatch

    def run(self, args: tuple):
        root = self.found.root
        modules = list({id(m): m for m in root.modules()}.values())
        installed = []
        try:
            for m in modules:
                own = m.__dict__.get("forward")
                try:
                    m.forward = self.dispatcher(m, m.forward)
                except (AttributeError, RuntimeError, TypeError):  # a ScriptModule: not reached
                    continue
                if own is not None:
                    self.forwards[id(m)] = own
                installed.append((m, own))
            with torch.no_grad():   # one fx patching session for every trace of the run
                return self.tracer.session(lambda: root(*args))
        finally:
            for m, own in installed:
                if own is None:
                    del m.forward
                else:
                    m.forward = own


def reach(root: nn.Module, args: tuple,
          capture: Callable[[fx.Node], bool] | None = None) -> Reach:
    """Run ``root`` once on ``args`` (no grad), tracing and recording as the module
    docstring says. Exceptions of the model propagate (the model is left as it was)."""
    session = _Session(root, len(args), capture)
    session.run(args)
    found = session.found
    found.copied = session.tracer.copied
    if found.graph(root) is not None and found.plain(root):
        found.entries.insert(0, found.units[id(root)])
    return found
