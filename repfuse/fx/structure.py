"""Whether two modules trace alike: a key of everything a module's trace can read.

fx traces a forward by running its Python on proxies, so the graph it records depends
only on the forward's code and on the plain values that Python reads: the module's own
attributes and those of the modules below it (flags, sizes, strides, ``None`` in place
of a layer), their classes, names and forwards, and which parameters and buffers exist.
Tensors are read through ``get_attr`` proxies, so their values are not in the graph
(their shapes and dtypes are in the key all the same: Python that reads a tensor past
the patched attribute access would bake them). The submodules a trace calls are traced
on their own, and what the caller sees of them (the container a call returns) depends
on their subtrees, which are in the key.

``structure_key(module, forward_of)`` gathers all of that for a module and its whole
subtree, or gives None where any of it is not a plain immutable value (a list, a dict,
a tensor held as a plain attribute, a hook, an object of another kind) or where a class
of its own ``__setattr__`` could write past ``watch_writes``: two modules with one key
trace to one graph. ``fx.trace`` traces the first module of a key and copies
its graph for the others (timm mobileone_s0: 45 traces for its 468 units).
"""

from __future__ import annotations

import contextlib
import enum
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["structure_key", "watch_writes"]

#: nn.Module's own bookkeeping attributes (hooks, flags), present on every module.
_MODULE_STATE = frozenset(nn.Module().__dict__)
#: Those of them that hold hooks: a module with one is not keyed (fx runs no hooks).
_HOOKS = _MODULE_STATE - {"training", "_is_full_backward_hook", "_non_persistent_buffers_set",
                          "_modules", "_parameters", "_buffers"}
_SCALARS = frozenset((type(None), bool, int, str, bytes, torch.dtype, torch.device))
#: Objects a forward may hold and call (an activation function, a layer class), keyed by
#: identity: the module keeps them alive while the key is in use.
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, type)


class _NoKey(Exception):
    """A value the key cannot stand for."""


#: By class: whether its attribute writes may bypass ``nn.Module``'s methods, which
#: ``watch_writes`` patches (a ``__setattr__`` or ``__delattr__`` of its own, outside
#: torch, that need not call them: ``object.__setattr__``).
_OWN_WRITES: dict[type, bool] = {}


def _writes_unseen(cls: type) -> bool:
    found = _OWN_WRITES.get(cls)
    if found is None:
        found = _OWN_WRITES[cls] = any(
            ("__setattr__" in vars(c) or "__delattr__" in vars(c))
            and not c.__module__.startswith("torch.")
            for c in cls.__mro__ if c is not nn.Module and issubclass(c, nn.Module))
    return found


def structure_key(module: nn.Module, forward_of: Callable[[nn.Module], object],
                  made: dict | None = None) -> tuple | None:
    """A hashable key of what a trace of ``module`` can depend on (module docstring), or
    None. ``forward_of(m)``: the function ``m``'s calls run (its class's ``forward`` or
    one set on the instance), or None when there is none to trace. ``made``: keys made
    before by module id (None: none), filled with those made now; valid while no module
    below changes (the caller drops it when code that may change one has run)."""
    try:
        return _key(module, forward_of, {} if made is None else made)
    except _NoKey:
        return None


def _key(m: nn.Module, forward_of, made: dict) -> tuple:
    """``m``'s key; ``made``: the keys made so far by module id (a module shared by two
    parents is keyed once; None for a module without one, or in progress: one that
    contains itself has none)."""
    key = made.get(id(m), made)
    if key is not made:
        if key is None:
            raise _NoKey
        return key
    made[id(m)] = None
    fn = forward_of(m)
    if fn is None or _writes_unseen(type(m)):
        raise _NoKey
    attrs = [m.training, frozenset(m._non_persistent_buffers_set)]
    for name, v in m.__dict__.items():
        if name in _MODULE_STATE:
            if v and name in _HOOKS:
                raise _NoKey
        elif name != "forward":   # fx.reach's dispatcher: ``forward_of`` gives what runs
            t = type(v)
            attrs.append((name, t, v) if t in _SCALARS else (name, _value(v)))
    tensors = tuple((k, None if t is None else (t.shape, t.dtype, type(t)))
                    for store in (m._parameters, m._buffers) for k, t in store.items())
    children = tuple((k, None if c is None else _key(c, forward_of, made))
                     for k, c in m._modules.items())
    made[id(m)] = key = (type(m), id(fn), tuple(attrs), tensors, children)
    return key


def _value(v) -> tuple:
    """A hashable stand-in for a plain value that tells apart what a trace would: its type
    with it (``True`` is not ``1``), a float by its bits (``-0.0`` is not ``0.0``)."""
    t = type(v)
    if t in _SCALARS:
        return t, v
    if t is float:
        return t, v.hex()
    if t is tuple:
        if all(type(e) is int for e in v):    # sizes, strides, paddings
            return t, v
        return t, tuple(_value(e) for e in v)
    if isinstance(v, enum.Enum):
        return t, v.name
    if isinstance(v, _BY_IDENTITY):
        return t, id(v)
    raise _NoKey


#: The ways a module's attributes are written: a trace that uses one is not copied.
_WRITES = ("__setattr__", "__delattr__", "register_buffer", "register_parameter",
           "add_module", "register_module")


@contextlib.contextmanager
def watch_writes(wrote: Callable[[], None]) -> Iterator[None]:
    """``wrote()`` called before every write of a module's attribute (set, delete,
    register) in the body: a forward that sets a flag on itself or below while traced, fx
    storing a constant other than a tensor on the module traced. Such a trace does the same
    for every module it is run for, so its graph is not copied to another (``fx.trace``).
    ``nn.Module``'s methods are patched once for the body, as fx patches its ``__call__``;
    a class with a ``__setattr__`` or ``__delattr__`` of its own might not call them, so a
    module of one, or one with such a module below it, has no key (always traced)."""
    real = {name: getattr(nn.Module, name) for name in _WRITES}

    def watched(method):
        def call(module, *args, **kwargs):
            wrote()
            return method(module, *args, **kwargs)
        return call
    try:
        for name, method in real.items():
            setattr(nn.Module, name, watched(method))
        yield
    finally:
        for name, method in real.items():
            setattr(nn.Module, name, method)
