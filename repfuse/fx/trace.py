"""Tracing for the fx front end: one graph per module, every called submodule a leaf.

Each module is traced on its own, with the submodules it calls kept as
``call_module`` nodes, so a rewrite touches only the smallest module that holds a
region and every other module keeps its class and attribute path. A module whose
forward cannot be traced that way is traced through its submodules instead
(``flat``); one that cannot be traced at all is opaque and its children are
traced as separate units.

``run_graphs`` executes the traced graphs once on the example inputs (one real
forward pass: a traced submodule is run through its own graph) and records the
shape and dtype of every value, and optionally a small copy of selected values for
the per-region proofs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from repfuse.errors import first_line

#: Modules that are never traced: torch.nn's own layers (not its containers).
_CONTAINERS = (nn.Sequential,)

#: Key of the recorded (shape, dtype) of a node's value in ``node.meta``.
META = "repfuse_value"
#: Key of a captured copy (first two samples) of a node's value in ``node.meta``.
CAPTURE = "repfuse_capture"
#: Spatial size of the captured copies (the top-left window).
CAPTURE_CROP = 40


def is_torch_leaf(module: nn.Module) -> bool:
    """torch.nn's own layers (Conv2d, BatchNorm2d, ReLU, ...): classified, never traced."""
    mod = type(module).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) \
        and not isinstance(module, _CONTAINERS)


def hook_reason(module: nn.Module, path: str = "") -> str:
    """Why ``module`` must be kept as it is: fx never runs hooks, so fusing it (or tracing
    through it) would drop its forward / pre-forward / backward hooks. Empty if none."""
    from torch.nn.modules import module as torch_module

    kinds = [kind for kind, store in (
        ("forward", module._forward_hooks), ("forward pre-", module._forward_pre_hooks),
        ("backward", module._backward_hooks),
        ("backward pre-", getattr(module, "_backward_pre_hooks", {})),
        ("global forward", torch_module._global_forward_hooks),
        ("global forward pre-", torch_module._global_forward_pre_hooks)) if store]
    if not kinds:
        return ""
    name = path or type(module).__name__
    return (f"module {name} has {' and '.join(kinds)} hooks, which fusion would drop "
            "(remove the hooks before fusing)")


@dataclass(eq=False)
class ModuleGraph:
    """The traced graph of one module (``graph`` is None when it could not be traced)."""

    module: nn.Module
    path: str
    graph: fx.Graph | None
    flat: bool = False
    reason: str = ""
    n_inputs: int = 0
    calls: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    ran: bool = False


class _Lookup:
    """id -> relative name within a module: direct members first, the subtree on a miss."""

    def __init__(self, direct: dict[int, str], full) -> None:
        self.direct, self.full, self.all = direct, full, None

    def get(self, key: int, default=None):
        if key in self.direct:
            return self.direct[key]
        if self.all is None:
            self.all = self.full()
        return self.all.get(key, default)


@dataclass(eq=False)
class _Frame:
    module: nn.Module
    path: str
    flat: bool
    names: _Lookup
    tensors: _Lookup
    cache: dict = field(default_factory=dict)


def _frame(module: nn.Module, path: str, flat: bool) -> _Frame:
    names = _Lookup({id(m): n for n, m in module._modules.items() if m is not None},
                    lambda: {id(m): n for n, m in module.named_modules() if n})
    direct = {id(t): n for n, t in module._parameters.items() if t is not None}
    direct.update({id(t): n for n, t in module._buffers.items() if t is not None})

    def full():
        out = {id(t): n for n, t in module.named_parameters()}
        out.update({id(t): n for n, t in module.named_buffers()})
        return out
    return _Frame(module, path, flat, names, _Lookup(direct, full))


class _TensorAttrs(dict):
    """fx's tensor-attribute table for one module, built on first use."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.built = module, False

    def get(self, key, default=None):
        if not self.built:
            self.built = True
            for prefix, m in self.module.named_modules():
                for k, v in m.__dict__.items():
                    if isinstance(v, Tensor):
                        self[v] = f"{prefix}.{k}" if prefix else k
        return super().get(key, default)


class _NestedTracer(fx.Tracer):
    """One fx trace of the whole model in which every called non-torch.nn module gets
    its own graph (traced at its first call, independently of the call's arguments)
    and appears as a ``call_module`` node in its caller's graph. torch's patching is
    set up once for the whole model instead of once per module."""

    def __init__(self, graphs: dict[int, ModuleGraph], paths: dict[int, str]) -> None:
        super().__init__(autowrap_modules=())
        self.graphs = graphs
        self.paths = paths
        self.stack: list[_Frame] = []

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if not isinstance(attr_val, Tensor) or not self.stack:
            return attr_val
        fr = self.stack[-1]
        name = fr.tensors.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in fr.cache:
            fr.cache[name] = self.create_proxy("get_attr", name, (), {})
        return fr.cache[name]

    def call_module(self, m, forward, args, kwargs):
        fr = self.stack[-1]
        if fr.flat and not is_torch_leaf(m) and not hook_reason(m):
            return forward(*args, **kwargs)
        rel = fr.names.get(id(m))
        if rel is None:
            raise fx.proxy.TraceError(f"{type(m).__name__} is not a submodule of "
                                      f"{fr.path or 'the model'}")
        if not is_torch_leaf(m) and id(m) not in self.graphs:
            self.graphs[id(m)] = self.nested(m, self.paths.get(id(m), join(fr.path, rel)))
        return self.create_proxy("call_module", rel, args, kwargs)

    def nested(self, m: nn.Module, path: str, n_inputs: int | None = None) -> ModuleGraph:
        saved = (self.graph, self.root, self.tensor_attrs)
        reasons = []
        try:
            for flat in (False, True):
                self.graph = fx.Graph()  # a plain Graph: fused modules pickle with fx.Tracer
                self.root = m
                self.tensor_attrs = _TensorAttrs(m)
                self.stack.append(_frame(m, path, flat))
                try:
                    concrete, required = _concrete_args(m, n_inputs)
                    fn, args = self.create_args_for_root(type(m).forward, True,
                                                         concrete or None)
                    self.create_node("output", "output", (self.create_arg(fn(*args)),), {})
                    return ModuleGraph(m, path, self.graph, flat=flat, n_inputs=required)
                except Exception as err:  # noqa: BLE001 - any failure: not traceable so
                    first = first_line(err) if str(err).strip() else ""
                    reasons.append(f"{type(err).__name__}: {first}")
                finally:
                    self.stack.pop()
            return ModuleGraph(m, path, None, reason=reasons[-1])
        finally:
            self.graph, self.root, self.tensor_attrs = saved

    def trace_root(self, root: nn.Module, path: str, n_inputs: int | None) -> ModuleGraph:
        """Trace ``root`` (and everything it calls) inside one patching session."""
        result: list[ModuleGraph] = []
        tracer = self

        class _Entry(nn.Module):
            def forward(self):
                result.append(tracer.nested(root, path, n_inputs))
                return None

        entry = _Entry()
        self.stack.append(_frame(entry, path, False))
        try:
            super().trace(entry)
        finally:
            self.stack.pop()
        return result[0]


def join(path: str, name: str) -> str:
    """A dotted module path: ``join('a.b', 'c') == 'a.b.c'`` (either may be empty)."""
    return f"{path}.{name}" if path and name else path or name


def _concrete_args(module: nn.Module, n_inputs: int | None) -> tuple[dict, int]:
    """Defaults of the forward's optional parameters, baked into the trace (fx guards
    them with asserts), and the number of parameters left as placeholders."""
    sig = inspect.signature(module.forward)
    concrete, required = {}, 0
    for i, (name, p) in enumerate(sig.parameters.items()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty or (n_inputs is not None and i < n_inputs):
            required += 1
        else:
            concrete[name] = p.default
    return concrete, required


def trace_all(root: nn.Module, n_inputs: int) -> tuple[dict[int, ModuleGraph], list]:
    """Trace ``root`` and, recursively, every non-torch.nn module it calls.

    Returns the graphs by ``id(module)`` and the list of opaque modules (no graph);
    the children of an opaque module are traced as separate units (their graphs have
    ``calls`` filled by ``run_graphs`` to check that the standalone trace is faithful).
    """
    graphs: dict[int, ModuleGraph] = {}
    paths = {id(m): p for p, m in root.named_modules()}
    opaque: list[ModuleGraph] = []
    stack = [(root, "", n_inputs)]
    while stack:
        module, path, n = stack.pop()
        if id(module) in graphs:
            continue
        if is_torch_leaf(module):  # a torch.nn layer as the model: nothing to trace
            graphs[id(module)] = ModuleGraph(module, path, None, reason="a torch.nn layer")
            continue
        mg = _NestedTracer(graphs, paths).trace_root(module, path, n)
        graphs[id(module)] = mg
        for g in list(graphs.values()):
            if g.graph is None and g not in opaque:
                opaque.append(g)
                for name, child in g.module.named_children():
                    if not is_torch_leaf(child) and id(child) not in graphs:
                        stack.append((child, join(g.path, name), None))
    return graphs, opaque


def _record(node: fx.Node, value, capture: Callable[[fx.Node], bool] | None) -> None:
    if isinstance(value, Tensor) and META not in node.meta:
        node.meta[META] = (tuple(value.shape), value.dtype)
        if capture is not None and capture(node) and value.dim() == 4:
            node.meta[CAPTURE] = value[:2, :, :CAPTURE_CROP, :CAPTURE_CROP].detach().clone()
        elif capture is not None and capture(node) and value.dim() in (2, 3):
            node.meta[CAPTURE] = value[:2].detach().clone()  # vectors, tokens, sequences


class _GraphRunner(fx.Interpreter):
    """Runs one module's traced graph; traced submodules run through their graphs."""

    def __init__(self, mg: ModuleGraph, graphs: dict[int, ModuleGraph],
                 capture: Callable[[fx.Node], bool] | None) -> None:
        super().__init__(mg.module, garbage_collect_values=True, graph=mg.graph)
        self.mg = mg
        self.graphs = graphs
        self.capture = capture

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        _record(n, out, self.capture)
        return out

    def call_module(self, target, args, kwargs):
        sub = self.fetch_attr(target)
        mg = self.graphs.get(id(sub))
        if mg is not None and mg.graph is not None and not kwargs:
            mg.ran = True
            return _GraphRunner(mg, self.graphs, self.capture).run(*args)
        return sub(*args, **kwargs)


def _signature(args, kwargs) -> tuple[int, tuple[str, ...]]:
    n = len(args) if all(isinstance(a, Tensor) for a in args) else -1
    return n, tuple(sorted(kwargs))


def run_graphs(root: nn.Module, graphs: dict[int, ModuleGraph], opaque: list[ModuleGraph],
               args: tuple, capture: Callable[[fx.Node], bool] | None = None) -> None:
    """One forward pass of ``root`` on ``args`` through the traced graphs (no grad),
    recording every value's shape and dtype (and captures, see ``capture``).

    Units below an opaque module are run through their graphs from a forward hook
    (on a copy of their inputs) and their call signatures are recorded."""
    handles = []
    units = [mg for mg in graphs.values()
             if mg.graph is not None and mg.module is not root
             and any(mg.module in dict(o.module.named_children()).values() for o in opaque)]

    def hook(mg):
        def fn(module, a, kw, out):
            mg.calls.append(_signature(a, kw))
            if not mg.ran and not kw and mg.calls[-1][0] == len(a):
                mg.ran = True
                with torch.no_grad():
                    _GraphRunner(mg, graphs, capture).run(
                        *[x.detach().clone() for x in a])
        return fn

    for mg in units:
        handles.append(mg.module.register_forward_hook(hook(mg), with_kwargs=True))
    try:
        with torch.no_grad():
            top = graphs[id(root)]
            if top.graph is not None:
                top.ran = True
                _GraphRunner(top, graphs, capture).run(*args)
            else:
                root(*args)
    finally:
        for h in handles:
            h.remove()
