"""A batch norm whose output several layers read, copied into each of them.

What is matched: an eval-mode batch norm (``fx.norms``) whose output reaches layers only
through ops that keep its channels apart and commute with a per-channel affine map:

* layout ops: ``transpose``, ``permute``, ``contiguous``, and ``reshape`` / ``view`` /
  ``flatten`` / ``unflatten`` that keep the channel axis whole (the sizes before it
  multiply to the same number), ``nn.Identity`` and eval-mode dropout modules;
* average pools (``nn.AvgPool1d`` / ``nn.AvgPool2d``, ``F.avg_pool1d`` / ``F.avg_pool2d``) on
  channel axis 1 whose every output is a mean of inputs: no padding counted in the mean
  (no padding, or ``count_include_pad=False``), no ``divisor_override``, no partial window
  from ``ceil_mode``; then ``pool(a * x + b) == a * pool(x) + b`` per channel;
* further eval-mode batch norms on channel axis 1;

and every layer it reaches (a *reader*) absorbs a per-channel affine map on its input
exactly: an ``nn.Linear`` / ``F.linear`` reading the channels on its last axis, or an
``nn.Conv1d`` / ``nn.Conv2d`` / ``F.conv1d`` / ``F.conv2d`` reading them on axis 1 without
padding. The norm's output and every value between are read by nothing else (shape reads
aside).
What must hold besides: the norm (and each norm between) is a module called only here, or
``F.batch_norm``; it does not fold into the layer computing its input (a conv or linear
layer whose output only the norm reads), and it is not a norm read directly by one layer
(a region folds that as it is).
What it becomes: the ops between run on the norm's input (the norms go; the pools and
layout ops stay, still computed once), and each reader reads its own copy of the norms on
its path, computed from the norms' own tensors (``F.batch_norm`` on ``get_attr`` nodes of
their statistics, weight and bias), applied with the channel axis moved to axis 1 and back
(``transpose(1, 2)`` on tokens, ``permute`` on channels-last maps): each reader and its
copies form a region of their own that folds into one layer, and the proofs differentiate
through the copies. When a layer reached does not absorb its copy, nothing changes (a copy
left in front of a layer would make the model slower); ``fx.account`` then names the
readers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repfuse.fx.norms import EvalNorm, eval_norm
from repfuse.fx.trace import CAPTURE, META, hook_reason
from repfuse.fx.values import PASS_MODULES, tensor_meta

__all__ = ["copy_norms", "opens_for_readers"]

#: ``usable(module) -> reason``: why a reader module must not be fused away ("" if none)
Usable = Callable[[nn.Module], str]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_RESHAPES = frozenset({"reshape", "view", "flatten", "unflatten"})
_SWAPS = frozenset({"transpose", "swapaxes", "swapdims"})
_LAYERS = {nn.Linear: "last", nn.Conv1d: 1, nn.Conv2d: 1}
_POOLS = {nn.AvgPool1d: 3, nn.AvgPool2d: 4}
#: F.avg_pool1d / F.avg_pool2d: their arguments by name, with defaults
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override")
_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None}


@dataclass(eq=False)
class _Leaf:
    """A reader: ``reader`` reads ``value`` (channels on ``axis``) after ``norms``."""

    reader: fx.Node
    value: fx.Node
    axis: int
    norms: tuple[EvalNorm, ...]


@dataclass(eq=False)
class Cone:
    """What a norm's output reaches: the ops between (graph nodes), the norms among them
    and the readers."""

    norm: EvalNorm
    between: list[fx.Node] = field(default_factory=list)
    norms: list[EvalNorm] = field(default_factory=list)
    leaves: list[_Leaf] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def _submodule(root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def _shape(node) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    return None if meta is None else tuple(meta[0])


def _shape_read(user: fx.Node, value: fx.Node) -> bool:
    """``value.shape`` / ``value.size()`` and the like: they read no values."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is value and user.args[1] in _SHAPE_ATTRS
    return user.op == "call_method" and user.target in _SHAPE_METHODS \
        and user.args[:1] == (value,)


def _only_first(user: fx.Node, value: fx.Node) -> bool:
    """``value`` is ``user``'s first argument and nothing else of it."""
    rest = fx.node.map_aggregate((user.args[1:], dict(user.kwargs)), lambda a: a)
    seen: list = []
    fx.node.map_arg(rest, seen.append)
    return user.args[:1] == (value,) and value not in seen


def _bound(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict | None:
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    out = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    return out if all(k in out for k in names) else None


def _ints(v, n: int) -> tuple[int, ...] | None:
    v = (v,) * n if isinstance(v, int) else v
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) for i in v):
        return None
    v = tuple(v) * n if len(v) == 1 else tuple(v)
    return v if len(v) == n else None


# ----------------------------------------------------------------------------- the ops between
def _moved_axis(node: fx.Node, value: fx.Node, axis: int, root: nn.Module) -> int | None:
    """The channel axis of ``node``'s output when ``node`` is a layout op of ``value``
    that keeps the channels whole, else None."""
    name, before, after = _name(node), _shape(value), _shape(node)
    if before is None or after is None:
        return None
    channels = before[axis]
    if node.op == "call_module":
        m = _submodule(root, node)
        return axis if isinstance(m, PASS_MODULES) and not hook_reason(m) \
            and before == after else None
    if node.op not in ("call_method", "call_function") or (
            node.op == "call_function" and getattr(torch, name, None) is not node.target):
        return None
    new = None
    if name in ("contiguous", "clone") and before == after:
        new = axis
    elif name in _SWAPS and len(node.args) == 3 and not node.kwargs:
        d0, d1 = node.args[1], node.args[2]
        if isinstance(d0, int) and isinstance(d1, int):
            d0, d1 = d0 % len(before), d1 % len(before)
            new = d1 if axis == d0 else d0 if axis == d1 else axis
    elif name == "permute" and not node.kwargs:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        if all(isinstance(d, int) for d in dims) and len(dims) == len(before):
            dims = [d % len(before) for d in dims]
            new = dims.index(axis) if axis in dims else None
    elif name in _RESHAPES:
        lead = math.prod(before[:axis])
        new = next((j for j in range(len(after))
                    if math.prod(after[:j]) == lead and after[j] == channels), None)
    return new if new is not None and after[new] == channels else None


def _pool_axis(node: fx.Node, value: fx.Node, axis: int, root: nn.Module) -> int | None:
    """1 when ``node`` averages ``value`` (channels on axis 1) so that every output is a
    mean of inputs, else None."""
    before, after = _shape(value), _shape(node)
    if axis != 1 or before is None or after is None:
        return None
    m = _submodule(root, node)
    if m is not None:
        rank = next((r for cls, r in _POOLS.items() if type(m) is cls), None)
        if rank is None:
            return None
        a = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
             "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
             "divisor_override": getattr(m, "divisor_override", None)}
    elif node.op == "call_function" and node.target in (F.avg_pool1d, F.avg_pool2d):
        rank = 3 if node.target is F.avg_pool1d else 4
        a = _bound(node, _POOL_ARGS, _POOL_DEFAULTS)
    else:
        return None
    if a is None or len(before) != rank or len(after) != rank:
        return None
    n = rank - 2
    k, p = _ints(a["kernel_size"], n), _ints(a["padding"], n)
    s = k if a["stride"] in (None, (), []) else _ints(a["stride"], n)
    if k is None or s is None or p is None or a["divisor_override"] is not None \
            or not isinstance(a["count_include_pad"], bool) or not isinstance(a["ceil_mode"], bool):
        return None
    if any(p) and a["count_include_pad"]:
        return None     # zero padding counted in the mean: pool(b) != b at the border
    floor = tuple((before[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(n))
    return 1 if floor == tuple(after[2:]) else None    # no partial window (ceil_mode)


def _reader(node: fx.Node, value: fx.Node, axis: int, root: nn.Module,
            usable: Usable) -> bool:
    """Whether ``node`` is a layer that absorbs a per-channel affine map on ``value``
    (channels on ``axis``) exactly."""
    shape = _shape(value)
    if shape is None or not _only_first(node, value):
        return False
    last = len(shape) - 1
    m = _submodule(root, node)
    if m is not None:
        want = next((ax for cls, ax in _LAYERS.items() if type(m) is cls), None)
        if want is None or node.kwargs or len(node.args) != 1 or usable(m) \
                or not isinstance(m.weight, nn.Parameter):
            return False
        if isinstance(m, nn.Linear):
            return axis == last
        rank = 3 if isinstance(m, nn.Conv1d) else 4
        return axis == 1 and len(shape) == rank and (
            m.padding == "valid" or not any(_ints(m.padding, rank - 2) or (1,)))
    if node.op != "call_function":
        return False
    if node.target is F.linear:
        a = _bound(node, ("input", "weight", "bias"), {"bias": None})
        return a is not None and axis == last and isinstance(a["weight"], fx.Node) \
            and a["weight"].op == "get_attr"
    if node.target in (F.conv1d, F.conv2d):
        rank = 3 if node.target is F.conv1d else 4
        a = _bound(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                   {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        return a is not None and axis == 1 and len(shape) == rank \
            and isinstance(a["weight"], fx.Node) and a["weight"].op == "get_attr" and (
                a["padding"] == "valid" or not any(_ints(a["padding"], rank - 2) or (1,)))
    return False


# ----------------------------------------------------------------------------- the cone
def _own_norm(node: fx.Node, root: nn.Module, usable: Usable) -> EvalNorm | None:
    """The eval-mode norm ``node`` is, unless it is a module called elsewhere too."""
    norm = eval_norm(node, root, _NORMS)
    if norm is None:        # most nodes: no second look-up of their module
        return None
    m = _submodule(root, node)
    return None if m is not None and usable(m) else norm


def _walk(value: fx.Node, axis: int, norms: tuple, root: nn.Module, usable: Usable,
          cone: Cone) -> bool:
    """Add what ``value`` (channels on ``axis``, after ``norms``) reaches to ``cone``;
    False when something it reaches is not a reader nor an op between."""
    for user in list(value.users):
        if _shape_read(user, value):
            continue
        if not _only_first(user, value):
            return False
        if _reader(user, value, axis, root, usable):
            cone.leaves.append(_Leaf(user, value, axis, norms))
            continue
        norm = _own_norm(user, root, usable)
        if norm is not None:
            if axis != 1:
                return False
            cone.between.append(user)
            cone.norms.append(norm)
            if not _walk(user, 1, norms + (norm,), root, usable, cone):
                return False
            continue
        new = _moved_axis(user, value, axis, root)
        if new is None:
            new = _pool_axis(user, value, axis, root)
        if new is None:
            return False
        cone.between.append(user)
        if not _walk(user, new, norms, root, usable, cone):
            return False
    return True


def _folds_back(norm: EvalNorm, root: nn.Module) -> bool:
    """The norm reads a conv or linear layer's output that only it reads (and shape
    reads): it folds into that layer."""
    inp = norm.input
    if any(u is not norm.node and not _shape_read(u, inp) for u in inp.users):
        return False
    m = _submodule(root, inp)
    if m is not None:
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    return inp.op == "call_function" and inp.target in (F.conv1d, F.conv2d, F.linear)


def norm_cone(node: fx.Node, root: nn.Module, usable: Usable) -> Cone | None:
    """The cone of the norm ``node`` when every layer it reaches absorbs a copy (see
    the module docstring), else None."""
    norm = _own_norm(node, root, usable)
    if norm is None or _folds_back(norm, root) or _shape(node) is None:
        return None
    cone = Cone(norm)
    if not _walk(node, 1, (norm,), root, usable, cone) or not cone.leaves:
        return None
    if not cone.between and len(cone.leaves) == 1:
        return None     # one layer reads it directly: a region folds it as it is
    return cone


# ----------------------------------------------------------------------------- rewriting
def _meta_like(node: fx.Node, like: fx.Node, perm: tuple[int, ...] | None = None) -> fx.Node:
    shape, dtype = tensor_meta(like)
    node.meta[META] = (tuple(shape[i] for i in perm) if perm else tuple(shape), dtype)
    return node


def _to_first(graph: fx.Graph, value: fx.Node, axis: int, rank: int
              ) -> tuple[fx.Node, Callable[[fx.Node], fx.Node]]:
    """``value`` with its channels moved to axis 1, and the op moving them back."""
    if axis == 1:
        return value, lambda h: h
    if rank == 3:
        perm = (0, 2, 1)
        out = _meta_like(graph.call_method("transpose", (value, 1, 2)), value, perm)
        return out, lambda h: _meta_like(graph.call_method("transpose", (h, 1, 2)), value)
    to, back = (0, 3, 1, 2), (0, 2, 3, 1)
    out = _meta_like(graph.call_method("permute", (value, *to)), value, to)
    return out, lambda h: _meta_like(graph.call_method("permute", (h, *back)), value)


def _copy(graph: fx.Graph, h: fx.Node, norm: EvalNorm) -> fx.Node:
    attrs = [None if norm.stats[k] is None else graph.get_attr(norm.stats[k])
             for k in ("running_mean", "running_var", "weight", "bias")]
    out = graph.call_function(F.batch_norm, (h, *attrs, False, 0.0, norm.eps))
    return _meta_like(out, h)


def _raw(value: fx.Node, norms: dict[fx.Node, EvalNorm]) -> fx.Node:
    while value in norms:
        value = norms[value].input
    return value


def _rewrite(graph: fx.Graph, cone: Cone) -> None:
    norms = {n.node: n for n in [cone.norm, *cone.norms]}
    for leaf in cone.leaves:
        value = _raw(leaf.value, norms)
        with graph.inserting_before(leaf.reader):
            h, back = _to_first(graph, value, leaf.axis, len(_shape(value)))
            for norm in leaf.norms:
                h = _copy(graph, h, norm)
            leaf.reader.replace_input_with(leaf.value, back(h))
    for node in cone.between:   # their values are now computed without the norms
        node.meta.pop(CAPTURE, None)
    for node, norm in reversed(list(norms.items())):
        node.replace_all_uses_with(norm.input)
        own = [a for a in node.all_input_nodes if a.op == "get_attr"]
        graph.erase_node(node)
        for a in own:
            if not a.users:
                graph.erase_node(a)


def copy_norms(graph: fx.Graph, root: nn.Module, usable: Usable) -> None:
    """Rewrite every match in ``graph`` (see the module docstring); ``root``: the module
    the graph belongs to; ``usable``: why a reader module must not be fused away."""
    done: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in done or node.graph is not graph:
            continue
        cone = norm_cone(node, root, usable)
        if cone is not None:
            done |= {n.node for n in cone.norms}
            _rewrite(graph, cone)


def opens_for_readers(call: fx.Node, root: nn.Module, child: fx.Graph, child_root: nn.Module,
                      usable: Usable) -> bool:
    """Whether ``call`` (of ``child_root``, traced as ``child``) reads an eval-mode norm
    (through layout ops read once) whose copies its readers inside the child would all
    absorb: then the call is opened so that ``copy_norms`` sees the readers."""
    if len(call.args) != 1 or call.kwargs or not isinstance(call.args[0], fx.Node):
        return False
    chain, value = [], call.args[0]
    while _own_norm(value, root, usable) is None:
        users = [u for u in value.users if not _shape_read(u, value)]
        if len(users) != 1 or not value.args or not isinstance(value.args[0], fx.Node):
            return False
        chain.append(value)
        value = value.args[0]
    norm = _own_norm(value, root, usable)
    if _folds_back(norm, root) or [u for u in value.users if not _shape_read(u, value)] \
            != [chain[-1] if chain else call]:
        return False
    axis = 1
    for node in reversed(chain):
        axis = _moved_axis(node, node.args[0], axis, root)
        if axis is None:
            return False
    inputs = [n for n in child.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or _shape(inputs[0]) != _shape(call.args[0]):
        return False
    cone = Cone(norm)
    return _walk(inputs[0], axis, (), child_root, usable, cone) and bool(cone.leaves)
