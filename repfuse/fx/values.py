"""Values seen by the fx front end: linear ops, parameter constants, argument binding.

``LinearOp`` (``repfuse.region.op``) is what ``fx.ops.classify`` returns; ``constant``
resolves a number, a parameter/buffer, or a tensor computed in forward from parameters,
buffers and literals only (``computed``: a view of a parameter, OREPA's generated kernel,
ECB's ``scale * mask``, a frozen batch norm's scale), and says why when it is none of
these; ``bind`` names a call's arguments for the functions and methods the front end
knows.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse.fx.trace import META, join
from repfuse.region.computed import Computed
from repfuse.region.op import LinearOp, is_region_value

PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                 F.feature_alpha_dropout)


@dataclass(eq=False)
class Context:
    """What classification needs to know about the module whose graph is classified."""

    module: nn.Module
    path: str
    summaries: dict[int, Callable[[fx.Node], LinearOp | None]]
    shared: Callable[[nn.Module], str]
    #: nodes computed from parameters, buffers and literals only
    const: set[fx.Node] = field(default_factory=set)
    #: tensors the forward made while traced (``ModuleGraph.constants``)
    constants: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- values
def tensor_meta(node) -> tuple[tuple[int, ...], torch.dtype] | None:
    return node.meta.get(META) if isinstance(node, fx.Node) else None


def is_activation(arg, ranks: tuple[int, ...] | None = None) -> bool:
    """Whether ``arg`` is a node whose value can flow through a region (of one of
    ``ranks``, when given)."""
    meta = tensor_meta(arg)
    return meta is not None and is_region_value(*meta) and (
        ranks is None or len(meta[0]) in ranks)


def layer_op(node, m: nn.Module, ctx: Context, kind, build, why: str,
             ranks: tuple[int, ...] | None = None) -> LinearOp | None:
    """The op of a call of a layer module with one activation argument (of one of
    ``ranks``): blocked when the module must not be fused away (used twice, hooked) or for
    ``why`` (its own reason); ``build(label)`` makes the expression builder."""
    inp = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if inp is None or not is_activation(inp, ranks):
        return None
    label = join(ctx.path, node.target)
    blocked = ctx.shared(m) or (why.format(label=label) if why else "")
    return LinearOp(kind, [inp], build(label), blocked, label, [m])


def _owner(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    prefix, _, name = target.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), name


def resolve_attr(ctx: Context, node: fx.Node) -> tuple[Tensor | None, str]:
    """The tensor of a ``get_attr`` node and "" if it is a parameter or buffer, else why not."""
    if node.target in ctx.constants:
        return ctx.constants[node.target], f"{join(ctx.path, node.target)} is a tensor " \
            "made in forward, not a parameter or buffer"
    try:
        owner, name = _owner(ctx.module, node.target)
    except AttributeError:
        return None, f"{node.target} cannot be resolved"
    if name in owner._parameters or name in owner._buffers:
        return getattr(owner, name), ""
    value = getattr(owner, name, None)
    if isinstance(value, Tensor):
        return value, f"{join(ctx.path, node.target)} is a tensor constant, not a parameter " \
                      "or buffer"
    return None, f"{node.target} is not a tensor"


def constant(ctx: Context, arg) -> tuple[float | Tensor | Computed | None, str]:
    """A number, a parameter/buffer, or a value computed from them (``computed``); else
    (None, why)."""
    if isinstance(arg, bool) or arg is None:
        return None, "not a number"
    if isinstance(arg, (int, float)):
        return float(arg), ""
    if not isinstance(arg, fx.Node):
        return None, "not a number"
    if arg.op == "get_attr":
        return resolve_attr(ctx, arg)
    if arg in ctx.const:
        return computed(ctx, arg)
    return None, "computed in forward from values other than parameters and buffers"


# ----------------------------------------------------------------------------- computed
#: Substrings of the names of functions whose result is random.
_RANDOM = ("rand", "bernoulli", "normal", "uniform", "multinomial", "poisson", "dropout",
           "exponential", "cauchy", "geometric", "log_normal")


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _identity_on_values(node: fx.Node) -> bool:
    """``t.detach()`` and ``t.data``: the same values (the map is differentiated through
    them: fusion keeps the inference function, whose values they do not change)."""
    if node.op == "call_method" and node.target == "detach" and len(node.args) == 1:
        return True
    return node.op == "call_function" and node.target is getattr and \
        len(node.args) == 2 and node.args[1] == "data"


def computed(ctx: Context, node: fx.Node) -> tuple[Computed | None, str]:
    """A value computed in forward from parameters, buffers and literals only (OREPA's
    generated kernel, ECB's ``scale * mask``, DBB's pad value, a frozen batch norm's
    scale): a ``Computed`` of the parameters and buffers it reads, so the proofs
    differentiate through it; else (None, why)."""
    need, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        if n not in ctx.const:
            return None, "computed in forward from values other than parameters and buffers"
        need.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    nodes = sorted(need, key=order.__getitem__)
    if any(inplace_target(u, ctx.module) in need for n in nodes for u in n.users):
        return None, "computed in forward with in-place writes"
    if any(n.op != "get_attr" and any(r in _name(n) for r in _RANDOM) for n in nodes):
        return None, "computed in forward with random values"
    graph, env, sources, names = fx.Graph(), {}, [], []
    for n in nodes:
        if n.op == "get_attr":
            t, why = resolve_attr(ctx, n)
            if t is None or why:
                return None, why or f"{n.target} is not a tensor"
            env[n] = graph.placeholder(f"s{len(sources)}")
            sources.append(t)
            names.append(join(ctx.path, n.target))
        elif _identity_on_values(n):
            env[n] = env[n.args[0]]
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[node])
    fn = fx.GraphModule(nn.Module(), graph)
    return Computed(fn, tuple(sources), tuple(names), join(ctx.path, node.name)), ""


def tensor_like(value):
    """``value`` itself, or for a computed value a tensor of its shape and dtype without
    data (for checks of shape and dtype)."""
    if isinstance(value, Computed):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def channel_constant(value, shape) -> tuple[float | Tensor, int] | None:
    """``(value, axis)``: a scalar (axis 1), or a (C,) tensor and the axis of ``shape``
    (an activation of rank 2 to 4) it runs along (a computed value: a computed (C,)
    value), if broadcasting ``value`` over ``shape``
    keeps the shape and varies along at most one axis other than the batch; else None.
    (Whether that axis is the value's channel axis is the region layout's to decide.)"""
    if isinstance(value, float):
        return value, 1
    if isinstance(value, Computed):
        probe = channel_constant(tensor_like(value), shape)
        if probe is None:
            return None
        c = shape[probe[1]]
        return value.map(lambda t: t.reshape(1).expand(c) if t.numel() == 1
                         else t.reshape(c)), probe[1]
    rank = len(shape)
    if not isinstance(value, Tensor) or value.dim() > rank or not value.is_floating_point():
        return None
    if value.numel() == 1:
        return value.reshape(1).expand(shape[1]), 1
    full = (1,) * (rank - value.dim()) + tuple(value.shape)
    axes = [k for k, n in enumerate(full) if n != 1]
    if len(axes) != 1 or axes[0] == 0 or full[axes[0]] != shape[axes[0]]:
        return None
    return value.reshape(-1), axes[0]


# ----------------------------------------------------------------------------- binding
SIGS: dict = {
    F.conv2d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
               (None, 1, 0, 1, 1)),
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps"), (None, None, False, 0.1, 1e-5)),
    F.avg_pool2d: (("input", "kernel_size", "stride", "padding", "ceil_mode",
                    "count_include_pad", "divisor_override"), (None, 0, False, True, None)),
    F.pad: (("input", "pad", "mode", "value"), ("constant", None)),
    operator.getitem: (("input", "index"), ()),
    torch.cat: (("tensors", "dim"), (0,)),
    torch.add: (("input", "other", "alpha"), (1,)),
    torch.sub: (("input", "other", "alpha"), (1,)),
    torch.mul: (("input", "other"), ()),
    torch.div: (("input", "other", "rounding_mode"), (None,)),
    torch.neg: (("input",), ()),
    F.linear: (("input", "weight", "bias"), (None,)),
    F.conv1d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
               (None, 1, 0, 1, 1)),
    F.conv_transpose2d: (("input", "weight", "bias", "stride", "padding", "output_padding",
                          "groups", "dilation"), (None, 1, 0, 0, 1, 1)),
    torch.transpose: (("input", "dim0", "dim1"), ()),
    torch.permute: (("input", "dims"), ()),
    torch.flatten: (("input", "start_dim", "end_dim"), (0, -1)),
    torch.mean: (("input", "dim", "keepdim"), (False,)),
    F.adaptive_avg_pool2d: (("input", "output_size"), ()),
}
for _f in DROPOUT_FUNCS:
    SIGS[_f] = (("input", "p", "training", "inplace"), (0.5, True, False))
SIGS[torch.concat] = SIGS[torch.cat]
SIGS[torch.subtract] = SIGS[torch.sub]
SIGS[torch.multiply] = SIGS[torch.mul]
SIGS[torch.divide] = SIGS[torch.div]
SIGS[torch.negative] = SIGS[torch.neg]

_METHODSIGS = {
    "add": ("input", "other", "alpha"), "add_": ("input", "other", "alpha"),
    "sub": ("input", "other", "alpha"), "sub_": ("input", "other", "alpha"),
    "mul": ("input", "other"), "mul_": ("input", "other"),
    "div": ("input", "other", "rounding_mode"), "div_": ("input", "other", "rounding_mode"),
    "neg": ("input",), "neg_": ("input",), "contiguous": ("input",), "clone": ("input",),
    "transpose": ("input", "dim0", "dim1"), "flatten": ("input", "start_dim", "end_dim"),
    "reshape_as": ("input", "other"), "view_as": ("input", "other"),
    "mean": ("input", "dim", "keepdim"),
}
#: Defaults of method arguments that may be left out.
_METHOD_DEFAULTS = {"mean": {"keepdim": False}, "flatten": {"end_dim": -1}}
#: Methods whose trailing positional arguments form one sequence (``x.permute(0, 2, 1)``).
_VARARG_METHODS = {"permute": ("input", "dims")}


def bind(node: fx.Node) -> dict | None:
    """The node's arguments by name (defaults filled in), or None if not a known op."""
    if node.op == "call_method" and node.target in _VARARG_METHODS:
        if node.kwargs or len(node.args) < 2:
            return None
        rest = node.args[1:]
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return {"input": node.args[0], "dims": tuple(dims)}
    if node.op == "call_function" and node.target in SIGS:
        names, defaults = SIGS[node.target]
    elif node.op == "call_method" and node.target in _METHODSIGS:
        names, defaults = _METHODSIGS[node.target], ()
    else:
        return None
    if len(node.args) > len(names):
        return None
    out = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k in out or k not in names:
            return None
        out[k] = v
    for k, v in zip(names[len(names) - len(defaults):], defaults):
        out.setdefault(k, v)
    if node.op == "call_method":
        out.setdefault("alpha", 1)
        out.setdefault("rounding_mode", None)
        for k, v in _METHOD_DEFAULTS.get(node.target, {}).items():
            out.setdefault(k, v)
    return out if all(k in out for k in names) else None


ARITH = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    torch.divide: "div", operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
}


def pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def literal(*values) -> bool:
    """No fx node among the values (geometry must be known when fusing)."""
    return not any(_has_node(v) for v in values)


def _has_node(v) -> bool:
    if isinstance(v, fx.Node):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_node(x) for x in v)
    return False


def same_shape(node: fx.Node, *inputs) -> bool:
    meta = tensor_meta(node)
    return meta is not None and all(
        tensor_meta(i) is not None and tensor_meta(i)[0] == meta[0]
        and tensor_meta(i)[1] == meta[1] for i in inputs)


def inplace_target(node: fx.Node, module: nn.Module) -> fx.Node | None:
    """The activation an op modifies in place, if any."""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_") and node.args:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                           operator.setitem) or node.kwargs.get("inplace") is True:
            return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        try:
            m = module.get_submodule(node.target)
        except AttributeError:
            return None
        if getattr(m, "inplace", False) is True and node.args and \
                isinstance(node.args[0], fx.Node):
            return node.args[0]
    return None
