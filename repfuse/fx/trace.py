"""Tracing for the fx front end: one graph per module, every called submodule a leaf.

Each module is traced on its own, with the submodules it calls kept as
``call_module`` nodes, so a rewrite touches only the smallest module that holds a
region and every other module keeps its class and attribute path. A module whose
forward cannot be traced is opaque: it keeps running its own Python on real values,
and the modules it calls are traced as units of their own when they are called
(``repfuse.fx.reach``).

Modules that read the same (same class and forward, the same plain values in their
subtrees: ``fx.structure``) trace to the same graph: within a run the first is traced and
the others get copies of its graph (timm mobileone_s0: 45 traces for 468 units). A tensor
the forward makes while traced is kept with the graph (``ModuleGraph.constants``) instead
of being stored on the module.

A traced submodule that returns a tuple, list or dict gives its caller a container of
its items (indexing proxies), so a caller that unpacks, iterates or extends with the
result still traces. ``x[i] = v`` on a traced value is recorded as ``operator.setitem``
(slice assignment: DBB's and ECB's padding with a bias value).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch.fx as fx
import torch.fx._symbolic_trace as fx_symbolic
from torch import Tensor, nn

from repfuse.errors import first_line
from repfuse.fx.structure import structure_key, watch_writes

#: Modules that are never traced: torch.nn's own layers (not its containers).
_CONTAINERS = (nn.Sequential,)

#: Key of the recorded (shape, dtype) of a node's value in ``node.meta``.
META = "repfuse_value"
#: Key of a captured copy of a node's value in ``node.meta`` (in a ``Captured`` box, read
#: with ``captured``): the first two samples of a vector, token or sequence value; of a 4-D
#: value, the first sample's top-left window read as (N, C, H, W) (dims 2 and 3 cropped).
CAPTURE = "repfuse_capture"
#: Key of the same window of a 4-D value read as channels-last (N, H, W, C): dims 1 and 2
#: cropped, every channel kept (the region's layout, known only later, picks one).
CAPTURE_CHANNELS_LAST = "repfuse_capture_nhwc"
#: The keys of ``node.meta`` a run fills (``fx.reach``): not part of a trace.
_RECORDED = frozenset((META, CAPTURE, CAPTURE_CHANNELS_LAST))
#: Largest spatial size of the captured copies (the top-left window); see ``capture_crop``.
CAPTURE_CROP = 40
#: Smallest spatial size of the captured copies.
CAPTURE_CROP_MIN = 8


class Captured:
    """A captured copy in ``node.meta`` (under ``CAPTURE`` or ``CAPTURE_CHANNELS_LAST``),
    boxed: a node copied by inlining shares the box, so emptying it (``Reach.drop_captures``)
    frees the copy for every node, erased ones included (a traced graph and its nodes are
    reference cycles, which would otherwise keep it until the cyclic collector runs)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def captured(node, key: str = CAPTURE):
    """The copy captured at ``node`` under ``key`` (None when there is none)."""
    box = node.meta.get(key)
    return None if box is None else box.value


def capture_crop(root: nn.Module) -> int:
    """The spatial size of the windows captured for the proofs of ``root``'s regions:
    ``2e + 1`` for the model's widest kernel or pooling window (effective extent ``e``),
    within ``CAPTURE_CROP_MIN`` and ``CAPTURE_CROP``; at least the probe a region proof
    draws for one such kernel at a stride up to ``e`` (``e`` plus the stride, plus one on
    W: ``region.layout.probe_size``). A region whose probe is wider (kernels composed in
    sequence, a window computed in forward) has it filled with the real window where this
    one reaches and random values beyond. Every region-valued node is captured, since
    which are region inputs is known only later: with a fixed window of 40, repvgg_b3 at
    224x224 held 549 MB of windows for its 28 region proofs."""
    extent = 1
    for m in root.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            extent = max(extent, *(d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation)))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.MaxPool1d,
                            nn.AvgPool1d)):
            kernel = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
            dilation = getattr(m, "dilation", 1)
            dilation = dilation if isinstance(dilation, tuple) else (dilation,) * len(kernel)
            extent = max(extent, *(d * (k - 1) + 1 for k, d in zip(kernel, dilation)))
    return max(CAPTURE_CROP_MIN, min(CAPTURE_CROP, 2 * extent + 1))


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
    """The traced graph of one module (``graph`` is None when it could not be traced:
    ``reason`` says why)."""

    module: nn.Module
    path: str
    graph: fx.Graph | None
    reason: str = ""
    n_inputs: int = 0
    #: tensors the forward made while traced (``torch.tensor(...)`` in forward), by the
    #: name its ``get_attr`` nodes read: fx would store them on the module, which the
    #: trace leaves as it was (a rewrite installs those its graph reads: ``fx.install``)
    constants: dict[str, Tensor] = field(default_factory=dict)


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
    names: _Lookup
    tensors: _Lookup
    cache: dict = field(default_factory=dict)


def _frame(module: nn.Module, path: str) -> _Frame:
    names = _Lookup({id(m): n for n, m in module._modules.items() if m is not None},
                    lambda: {id(m): n for n, m in module.named_modules() if n})
    direct = {id(t): n for n, t in module._parameters.items() if t is not None}
    direct.update({id(t): n for n, t in module._buffers.items() if t is not None})

    def full():
        out = {id(t): n for n, t in module.named_parameters()}
        out.update({id(t): n for n, t in module.named_buffers()})
        return out
    return _Frame(module, path, names, _Lookup(direct, full))


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


class _Proxy(fx.Proxy):
    """A proxy on which ``x[i] = v`` is recorded (``operator.setitem``)."""

    def __setitem__(self, key, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _structured(proxy: fx.Proxy, graph: fx.Graph):
    """The caller's view of a call of a module traced into ``graph``: a tuple, list or
    dict of indexing proxies when the module returns one, else ``proxy``."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    if isinstance(out, tuple):
        return tuple(proxy[i] for i in range(len(out)))
    if isinstance(out, list):
        return [proxy[i] for i in range(len(out))]
    if isinstance(out, dict) and all(isinstance(k, str) for k in out):
        return {k: proxy[k] for k in out}
    return proxy


def forward_function(module: nn.Module, forward):
    """``forward`` (what the module's calls run: its class's ``forward`` or a method set
    on the instance) as a function of ``self``; None when it is not a method of the
    module."""
    if inspect.ismethod(forward):
        return forward.__func__ if forward.__self__ is module else None
    return forward if inspect.isfunction(forward) else None


@contextlib.contextmanager
def _fx_tracing(value: bool) -> Iterator[None]:
    """torch.fx's "tracing now" flag (``torch.fx._symbolic_trace.is_fx_tracing()``) set to
    ``value`` for the body: False while a session runs the model's real code."""
    get = getattr(fx_symbolic, "_get_is_fx_tracing", None)
    put = getattr(fx_symbolic, "_set_is_fx_tracing", None)
    if get is None or put is None:
        if not hasattr(fx_symbolic, "_is_fx_tracing_flag"):   # a torch without the flag
            yield
            return

        def get():   # torch before the flag was thread-local
            return fx_symbolic._is_fx_tracing_flag

        def put(flag):
            fx_symbolic._is_fx_tracing_flag = flag
    before = get()
    put(value)
    try:
        yield
    finally:
        put(before)


class _NestedTracer(fx.Tracer):
    """One fx trace in which every called non-torch.nn module gets its own graph
    (traced at its first call, independently of the call's arguments) and appears as a
    ``call_module`` node in its caller's graph. torch's patching is set up once per
    traced unit instead of once per module, or once for a whole run of real code
    (``session``)."""

    def __init__(self, graphs: dict[int, ModuleGraph], paths: dict[int, str],
                 forwards: dict[int, object]) -> None:
        super().__init__(autowrap_modules=())
        self.graphs = graphs
        self.paths = paths
        self.forwards = forwards
        self.stack: list[_Frame] = []
        self.thread = threading.get_ident()   # the one whose calls a trace records
        self.constants: dict[str, Tensor] = {}  # of the trace open
        #: the graphs traced, by ``structure_key`` and arguments (a run records values in
        #: their ``node.meta``, which a copy leaves out: ``_copy``)
        self.known: dict[tuple, tuple[fx.Graph, int, dict]] = {}
        self.copied = 0     # units given a copy of a known graph instead of a trace
        #: structure keys by module id, made since the outermost ``nested`` call began
        #: (no real code runs until it returns; a trace that changes a module drops them)
        self.keys: dict[int, tuple | None] = {}
        self.depth = 0
        self.changed = False    # whether a module was changed while a trace was open

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def _tracing(self) -> bool:
        """Whether a call now belongs to a trace: one is open and this is its thread (fx's
        patches are process-wide; another thread's modules run as they are)."""
        return bool(self.stack) and threading.get_ident() == self.thread

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if not isinstance(attr_val, Tensor) or not self._tracing():
            return attr_val
        fr = self.stack[-1]
        name = fr.tensors.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in fr.cache:
            fr.cache[name] = self.create_proxy("get_attr", name, (), {})
        return fr.cache[name]

    def call_module(self, m, forward, args, kwargs):
        if not self._tracing():   # real code running in a session: the call as it is
            return forward(*args, **kwargs)
        fr = self.stack[-1]
        rel = fr.names.get(id(m))
        if rel is None:
            raise fx.proxy.TraceError(f"{type(m).__name__} is not a submodule of "
                                      f"{fr.path or 'the model'}")
        if not is_torch_leaf(m) and id(m) not in self.graphs:
            self.graphs[id(m)] = self.nested(m, self.paths.get(id(m), join(fr.path, rel)))
        proxy = self.create_proxy("call_module", rel, args, kwargs)
        sub = self.graphs.get(id(m))
        return proxy if sub is None or sub.graph is None else _structured(proxy, sub.graph)

    def forward_of(self, m: nn.Module):
        """The function ``m``'s calls run, as a function of ``self`` (None if none)."""
        return forward_function(m, self.forwards.get(id(m), type(m).forward))

    def nested(self, m: nn.Module, path: str, n_inputs: int | None = None) -> ModuleGraph:
        """``m``'s graph: traced, or copied from a module traced before whose trace read
        the same (``fx.structure``)."""
        fn = self.forward_of(m)
        if fn is None:
            return ModuleGraph(m, path, None, reason="its forward is replaced on the "
                               "instance by a function that is not one of its methods")
        self.depth += 1
        try:
            key = structure_key(m, self.forward_of, self.keys)
            if key is not None:
                key = (key, n_inputs)
                if key in self.known:
                    return self._copy(m, path, *self.known[key])
            changed, self.changed = self.changed, False
            unit = self._trace(m, fn, path, n_inputs)
            if self.changed:    # the trace set a module's attribute: not a graph to copy
                self.keys.clear()
            elif key is not None and unit.graph is not None:
                self.known[key] = (unit.graph, unit.n_inputs, unit.constants)
            self.changed = self.changed or changed
            return unit
        finally:
            self.depth -= 1
            if not self.depth:  # real code runs next and may change any module
                self.keys.clear()

    def _copy(self, m: nn.Module, path: str, graph: fx.Graph, n_inputs: int,
              constants: dict[str, Tensor]) -> ModuleGraph:
        """``m``'s unit with a copy of ``graph`` (``m``'s trace would record it), and the
        graphs of the submodules it calls, in the order a trace would make them."""
        self.copied += 1
        graph = _graph_copy(graph)
        for node in graph.nodes:
            if _RECORDED & node.meta.keys():    # what ``fx.reach`` recorded of a run
                node.meta = {k: v for k, v in node.meta.items() if k not in _RECORDED}
            if node.op != "call_module":
                continue
            sub = m.get_submodule(node.target)
            if not is_torch_leaf(sub) and id(sub) not in self.graphs:
                self.graphs[id(sub)] = self.nested(
                    sub, self.paths.get(id(sub), join(path, node.target)))
        return ModuleGraph(m, path, graph, n_inputs=n_inputs, constants=dict(constants))

    def _trace(self, m: nn.Module, fn, path: str, n_inputs: int | None) -> ModuleGraph:
        saved = (self.graph, self.root, self.tensor_attrs, self.constants)
        self.graph = fx.Graph()  # a plain Graph: fused modules pickle with fx.Tracer
        self.root = m
        self.tensor_attrs = _TensorAttrs(m)
        self.constants = constants = {}
        self.stack.append(_frame(m, path))
        try:
            concrete, required = _concrete_args(fn, n_inputs)
            with _fx_tracing(True):
                fn_, args = self.create_args_for_root(fn, True, concrete or None)
                self.create_node("output", "output", (self.create_arg(fn_(*args)),), {})
            return ModuleGraph(m, path, self.graph, n_inputs=required, constants=constants)
        except Exception as err:  # noqa: BLE001 - any failure: not traceable
            first = first_line(err) if str(err).strip() else ""
            return ModuleGraph(m, path, None, reason=f"{type(err).__name__}: {first}")
        finally:
            self.stack.pop()
            self.graph, self.root, self.tensor_attrs, self.constants = saved

    def create_arg(self, a):
        """fx's, but a tensor the forward made (not a parameter, buffer or attribute of
        the module) is kept in the unit's ``constants``, not stored on the module."""
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter) and self._tracing() \
                and self.tensor_attrs.get(a) is None:
            i = len(self.constants)
            while hasattr(self.root, f"_tensor_constant{i}"):
                i += 1
            name = self.tensor_attrs[a] = f"_tensor_constant{i}"
            self.constants[name] = a
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def session(self, run: Callable[[], object]):
        """``run()`` (real code: the model's forward) inside one fx patching session, and
        its result. While it runs, the patched ``nn.Module.__call__`` and ``__getattr__``
        pass every call and attribute through unchanged (no trace is open: ``stack`` is
        empty) and fx's tracing flag reads False; ``nested`` traces a module at any point
        of it without patching again. Setting ``nn.Module.__call__`` and ``__getattr__``
        updates a slot of every subclass (about 1,500 with timm and ultralytics
        imported): a session per traced unit cost about 2.5 ms a unit, 0.1 s of
        ultralytics yolov8n's 41 units."""
        result: list = []

        class _Entry(nn.Module):
            def forward(self):
                with _fx_tracing(False):
                    result.append(run())
                return None

        with watch_writes(self._wrote):   # a trace that writes is not copied (``nested``)
            super().trace(_Entry())
        return result[0]

    def _wrote(self) -> None:
        """A module attribute was written (``structure.watch_writes``): by a trace, if one is
        open on this thread."""
        if self._tracing():
            self.changed = True


def _graph_copy(graph: fx.Graph) -> fx.Graph:
    """What ``copy.deepcopy(graph)`` makes (fx's ``Graph.__deepcopy__``: new nodes, each
    with a shallow copy of its ``meta``), with a shallow copy of the graph's code generator
    instead of a deep one: it holds no state a graph changes (only its pytree specs, which
    are not written). The deep copy was a third of the time of timm mobileone_s0's 423
    copies (90 against 61 ms)."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    copied = new.graph_copy(graph, {}, return_output_node=True)
    new._codegen = copy.copy(graph._codegen)
    if copied is not None:
        value, old = copied
        new.output(value, type_expr=getattr(old, "type", None)).meta = copy.copy(old.meta)
    return new


def join(path: str, name: str) -> str:
    """A dotted module path: ``join('a.b', 'c') == 'a.b.c'`` (either may be empty)."""
    return f"{path}.{name}" if path and name else path or name


def _concrete_args(fn, n_inputs: int | None) -> tuple[dict, int]:
    """Defaults of the forward's optional parameters, baked into the trace (fx guards
    them with asserts), and the number of parameters left as placeholders."""
    sig = inspect.signature(fn)
    concrete, required = {}, 0
    params = list(sig.parameters.items())[1:]  # self
    for i, (name, p) in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty or (n_inputs is not None and i < n_inputs):
            required += 1
        else:
            concrete[name] = p.default
    return concrete, required


