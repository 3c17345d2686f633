"""Installing a rewritten graph into the module it was traced from, keeping its identity.

What is matched: a module whose traced graph had regions replaced by fused convs. What
must hold: the module is the one the rest of the model holds (same object). What it
becomes: the same object, now an instance of a subclass of its own class (named like
it, so ``isinstance`` and ``type(m).__name__`` hold) whose ``forward`` is the rewritten
graph's code; the fused convs are added as submodules (a single conv keeps the name of
the module it replaces, ``fx.fuser``), and the submodules, parameters and buffers that
only the fused parts read are removed (a no-op module, identity or dropout, stays where its
owner does). Its plain attributes, hooks, buffers and state-dict names outside
the fused parts are untouched, and the parent's own forward code still calls it.

The subclass is made once per (class, code) and rebuilt by name on unpickling, so a fused
model deep-copies, pickles (``torch.save``) and loads (``torch.load(weights_only=False)``)
like the original; loading needs repfuse importable, as a ``GraphModule`` needs torch.
"""

from __future__ import annotations

import linecache
import sys
import types

import torch.fx as fx
from torch import Tensor, nn

from repfuse.fx.values import PASS_MODULES

__all__ = ["install", "original_class"]

#: (original class, source, global names) -> the subclass running that source
_CLASSES: dict[tuple, type] = {}


def original_class(module: nn.Module) -> type:
    """The user's class of ``module`` (its class before any rewrite)."""
    return getattr(type(module), "_repfuse_original", type(module))


def _portable(globals_: dict) -> tuple:
    """fx's code globals as a picklable, hashable spec: modules by name."""
    out = []
    for name, value in sorted(globals_.items()):
        if isinstance(value, types.ModuleType):
            out.append((name, "module", value.__name__))
        else:
            out.append((name, "value", value))
    return tuple(out)


def _namespace(spec: tuple) -> dict:
    ns = {}
    for name, kind, value in spec:
        if kind == "module":
            __import__(value)
            ns[name] = sys.modules[value]
        else:
            ns[name] = value
    return ns


def _reduce_ex(self, protocol):
    cls = type(self)
    return _rebuild, (cls._repfuse_original, cls._repfuse_source, cls._repfuse_globals), \
        self.__dict__


def _rebuild(base: type, source: str, spec: tuple) -> nn.Module:
    """An empty instance of the rewritten class (unpickling then sets its state)."""
    cls = _fused_class(base, source, spec)
    return cls.__new__(cls)


def _fused_class(base: type, source: str, spec: tuple) -> type:
    # floats by their repr: an unpickled nan is another object, and nan != nan
    key = (base, source, tuple((n, k, repr(v) if isinstance(v, float) else v)
                               for n, k, v in spec))
    cls = _CLASSES.get(key)
    if cls is None:
        filename = f"<repfuse: fused {base.__qualname__} #{len(_CLASSES)}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        ns = _namespace(spec)
        exec(compile(source, filename, "exec"), ns)  # noqa: S102 - code fx generated
        cls = type(base)(base.__name__, (base,), {
            "forward": ns["forward"], "__reduce_ex__": _reduce_ex,
            "__module__": base.__module__, "__qualname__": base.__qualname__,
            "_repfuse_original": base, "_repfuse_source": source, "_repfuse_globals": spec})
        _CLASSES[key] = cls
    return cls


def _parent(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    prefix, _, name = target.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), name


def _targets(graph: fx.Graph) -> set[str]:
    return {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}


def _remove(module: nn.Module, target: str) -> None:
    try:
        owner, name = _parent(module, target)
    except AttributeError:
        return
    for store in (owner._modules, owner._parameters, owner._buffers):
        if name in store:
            del store[name]
            return


def _dissolve(module: nn.Module, prefixes: set[str], keep: set[str]) -> None:
    """The submodules at ``prefixes`` lost parts to the fused convs and the new graph does
    not call them (their code was copied into the graph): remove the empty ones (a norm
    left with only its ``num_batches_tracked`` counter counts as empty) and turn
    the others into plain containers of what is left, deepest first (an ``nn.Module``
    holding the same names: the class's forward would read the removed parts)."""
    for prefix in sorted(prefixes, key=lambda p: -p.count(".")):
        if prefix in keep:
            continue
        try:
            owner, name = _parent(module, prefix)
            sub = owner._modules[name]
        except (AttributeError, KeyError):
            continue
        counter = isinstance(sub, nn.modules.batchnorm._NormBase) and \
            set(sub._buffers) <= {"num_batches_tracked"}   # a norm's training counter
        if not sub._modules and not sub._parameters and (counter or not sub._buffers) \
                and not any(k.startswith(prefix + ".") for k in keep):
            del owner._modules[name]
            continue
        if type(sub) is nn.Module:
            continue
        husk = nn.Module()
        husk.training = sub.training
        for store in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            getattr(husk, store).update(getattr(sub, store))
        owner._modules[name] = husk


def install(module: nn.Module, before: set[str], graph: fx.Graph,
            new_modules: dict[str, nn.Module],
            constants: dict[str, Tensor] | None = None) -> None:
    """Make ``module`` run ``graph`` (see the module docstring). ``before``: the targets
    the module's graph read before the rewrite; ``new_modules``: target -> fused conv;
    ``constants``: tensors the forward made while traced, by target (``ModuleGraph``),
    given to the module where the graph reads them, as buffers that are not saved (they
    follow the model's ``.to()``; its state dict stays the user's)."""
    graph.lint()
    after = _targets(graph)
    for target in sorted(after & set(constants or ())):
        owner, name = _parent(module, target)
        if name not in owner._buffers and not hasattr(owner, name):
            owner.register_buffer(name, constants[target], persistent=False)
    lost = before - after - set(new_modules)
    emptied = {p for t in lost if "." in t for p in _ancestors(t.rpartition(".")[0])}
    for target in sorted(lost, key=lambda t: -t.count(".")):
        if not any(a.startswith(target + ".") for a in after) \
                and not _idle_noop(module, target, emptied):
            _remove(module, target)
    for target, sub in new_modules.items():
        owner, name = _parent(module, target)
        if name in owner._modules:      # in its place: the module order stays the user's
            owner._modules[name] = sub
            continue
        _remove(owner, name)
        if owner.__dict__.get(name, 0) is None:  # a placeholder such as reparam_conv = None
            del owner.__dict__[name]
        owner.add_module(name, sub)
    _dissolve(module, emptied, after)
    if isinstance(module, fx.GraphModule):  # its own class already runs its graph
        module.graph = graph
        return
    code = graph.python_code(root_module="self")
    module.__class__ = _fused_class(original_class(module), code.src,
                                    _portable(code.globals))


def _idle_noop(module: nn.Module, target: str, emptied: set[str]) -> bool:
    """Whether ``target`` is a no-op module (identity, dropout) the new graph no longer
    calls that stays in its place: its owner is not a module the rewrite empties, so user
    code reading it (``model.head_drop``) still finds it."""
    try:
        sub = module.get_submodule(target)
    except AttributeError:
        return False
    return type(sub) in PASS_MODULES and target.rpartition(".")[0] not in emptied


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
