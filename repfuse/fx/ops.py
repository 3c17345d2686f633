"""Which fx nodes are linear ops, and the region-expression node each one becomes.

``classify(node, ctx)`` returns a ``LinearOp`` (the activation inputs of the node and
a builder from their expressions to the node's expression) or ``None`` for anything
that is not a linear op of a region. A ``LinearOp`` with ``blocked`` set looks
linear but must not be fused (a conv module called more than once, a weight that is
not a parameter or buffer, a batch norm without running statistics); the region
that holds it is left alone and reported with that reason.

Rules (what is matched / what must hold / what it becomes):

* ``nn.Conv2d`` module or ``F.conv2d`` / a parameter weight, or one computed in forward from
  parameters and buffers only (``values.computed``), literal geometry / ``Conv``
* a batch norm module (``nn.BatchNorm2d`` on 4-D values, ``nn.BatchNorm1d`` on 2-D and 3-D,
  ``nn.SyncBatchNorm``: their eval-mode forward) or ``F.batch_norm`` / running statistics,
  eval / ``BatchNorm``
* ``nn.Linear``, ``nn.Conv1d``, ``nn.ConvTranspose2d``, their functions, the transposes,
  permutes and reshapes around them: see ``repfuse.fx.layers``
* ``nn.Identity``, ``nn.Dropout*`` (eval), ``F.dropout(training=False)``,
  ``contiguous``, ``clone`` / - / the input itself
* ``nn.AvgPool2d`` or ``F.avg_pool2d`` / literal geometry / ``AvgPool``
* pads and crops (``nn.ZeroPad2d``, ``F.pad``, slicing, padding by slice writes): see
  ``fx.slicing`` / ``Pad``, ``Crop``
* ``x * c``, ``x / c``, ``c * x`` / ``c`` a number or a parameter/buffer (or a value computed
  from them) that varies along one axis (C,1,1), (1,C,1,1), (C,) ... or has one element /
  ``Scale`` (along that axis; the region's layout must have its channels there); ``x + c``,
  ``x - c`` likewise ``Shift``
* ``a + b``, ``a - b``, ``-a``, ``torch.cat([...], dim=1)`` (``-1`` on 2-D and 3-D values)
  on activations / equal shapes / ``Add``, ``Sub``, ``Neg``, ``Concat``
* a call of a module whose whole forward is one linear region / called once,
  plain arguments / that region's expression
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.fx.layers import LAYER_FUNCTION_RULES, LAYER_METHOD_RULES, LAYER_MODULE_RULES
from repfuse.fx.slicing import border_pad, border_pad_function, crop_function, pad_function, pad_op
from repfuse.fx.trace import hook_reason
from repfuse.fx.values import (
    ARITH,
    DROPOUT_FUNCS,
    PASS_MODULES,
    SIGS,
    Context,
    LinearOp,
    bind,
    channel_constant,
    constant,
    inplace_target,
    is_activation,
    join,
    layer_op,
    literal,
    pair,
    same_shape,
    tensor_like,
    tensor_meta,
)
from repfuse.region.computed import Computed
from repfuse.region.op import OpKind, produced, produces

__all__ = ["Context", "LinearOp", "classify", "inplace_target", "tensor_meta"]


def _passthrough(node, inp, label="") -> LinearOp | None:
    if not (is_activation(inp) and same_shape(node, inp)):
        return None
    return LinearOp(OpKind.PASS, [inp], lambda xs: xs[0], label=label)


# ----------------------------------------------------------------------------- modules
_layer_op = layer_op

#: The ranks of the values a norm module of this type normalizes (others: any rank).
_NORM_RANKS = {nn.BatchNorm2d: (4,), nn.BatchNorm1d: (2, 3), nn.SyncBatchNorm: (2, 3, 4)}


@produces(rg.Conv)
def _conv_module(node, m: nn.Conv2d, ctx: Context) -> LinearOp | None:
    params = isinstance(m.weight, nn.Parameter) and (
        m.bias is None or isinstance(m.bias, nn.Parameter))
    spec = ConvSpec(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                    m.dilation, m.groups, m.padding_mode)
    return _layer_op(node, m, ctx, OpKind.CONV,
                     lambda label: lambda xs: rg.Conv(xs[0], m.weight, m.bias, spec, label),
                     "" if params else "conv {label}: weight or bias is not a parameter", (4,))


@produces(rg.BatchNorm)
def _bn_module(node, m: nn.BatchNorm2d, ctx: Context) -> LinearOp | None:
    stats = m.running_mean is not None and m.running_var is not None

    def build(label):
        return lambda xs: rg.BatchNorm(xs[0], m.running_mean, m.running_var, m.weight, m.bias,
                                       m.eps, label)
    ranks = next((r for cls, r in _NORM_RANKS.items() if isinstance(m, cls)), None)
    return _layer_op(node, m, ctx, OpKind.NORM, build, "" if stats else (
        "batch norm {label} has no running statistics (it normalizes with batch statistics "
        "even in eval mode)"), ranks)


def _single_input(node: fx.Node, m: nn.Module, ctx: Context):
    """The one activation argument of a module call, or None (several arguments, or
    hooks that fx would drop and no summary of the module keeps)."""
    if len(node.args) != 1 or node.kwargs:
        return None
    if hook_reason(m) and id(m) not in ctx.summaries:
        return None
    return node.args[0]


@produces()
def _pass_module(node: fx.Node, m: nn.Module, ctx: Context) -> LinearOp | None:
    inp = _single_input(node, m, ctx)
    return None if inp is None else _passthrough(node, inp, join(ctx.path, node.target))


@produces(rg.AvgPool)
def _avg_pool_module(node: fx.Node, m: nn.AvgPool2d, ctx: Context) -> LinearOp | None:
    inp = _single_input(node, m, ctx)
    if inp is None or not is_activation(inp, (4,)):
        return None
    label = join(ctx.path, node.target)
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    p = pair(m.padding)

    def pool(xs):
        return rg.AvgPool(xs[0], k, s, p, m.count_include_pad, m.ceil_mode, m.divisor_override,
                          label)
    return LinearOp(OpKind.POOL, [inp], pool, label=label)


@produces(rg.Pad, rg.Crop)
def _pad_module(node: fx.Node, m: nn.Module, ctx: Context) -> LinearOp | None:
    inp = _single_input(node, m, ctx)
    if inp is None:
        return None
    return pad_op(inp, tuple(m.padding), float(getattr(m, "value", 0.0)),
                  join(ctx.path, node.target))


#: What is matched (a module of this type, or of a subclass that overrides none of the
#: listed methods) -> the rule that decides what must hold and what it becomes.
MODULE_RULES: dict[type[nn.Module], tuple[Callable, tuple[str, ...]]] = {
    nn.Conv2d: (_conv_module, ("forward", "_conv_forward")),
    nn.modules.batchnorm._BatchNorm: (_bn_module, ("forward",)),
    nn.SyncBatchNorm: (_bn_module, ("forward",)),
    **LAYER_MODULE_RULES,
    nn.AvgPool2d: (_avg_pool_module, ("forward",)),
    nn.ZeroPad2d: (_pad_module, ("forward",)),
    nn.ConstantPad2d: (_pad_module, ("forward",)),
    **{t: (_pass_module, ("forward",)) for t in PASS_MODULES},
}

def module_rule(m: nn.Module) -> Callable | None:
    """The rule for ``m``'s type: the nearest table entry among its classes, used when
    ``m``'s class overrides none of the methods the entry lists."""
    for cls in type(m).__mro__:
        entry = MODULE_RULES.get(cls)
        if entry is not None:
            rule, methods = entry
            same = all(getattr(type(m), name) is getattr(cls, name) for name in methods)
            return rule if same else None
    return None


def _module_op(node: fx.Node, ctx: Context) -> LinearOp | None:
    m = ctx.module.get_submodule(node.target)
    rule = module_rule(m)
    if rule is not None:
        return rule(node, m, ctx)
    inp = _single_input(node, m, ctx)
    summary = ctx.summaries.get(id(m)) if inp is not None else None
    if summary is None:
        return None
    op = summary(inp)
    if op is not None:
        op.blocked = op.blocked or ctx.shared(m)
        op.label = join(ctx.path, node.target)
        op.source = [m]
    return op


# ----------------------------------------------------------------------------- functions
@produces(rg.Conv)
def _conv_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp = a["input"]
    if not is_activation(inp, (4,)) or not isinstance(a["weight"], fx.Node) or not literal(
            a["stride"], a["padding"], a["dilation"], a["groups"]):
        return None
    weight, why = constant(ctx, a["weight"])
    bias, why_b = (None, "") if a["bias"] is None else constant(ctx, a["bias"])
    named = a["weight"].target if a["weight"].op == "get_attr" else node.name
    label = join(ctx.path, named)
    shape = tuple(getattr(tensor_like(weight), "shape", ()))
    if len(shape) != 4 or (a["bias"] is not None and bias is None):
        why = why or why_b or "weight is not a 4-D tensor"
        return LinearOp(OpKind.CONV, [inp], lambda xs: xs[0], f"F.conv2d {node.name}: {why}",
                        label)
    blocked = f"F.conv2d {node.name}: weight {why or why_b}" if why or why_b else ""
    spec = ConvSpec.from_weight(shape, stride=a["stride"], padding=a["padding"],
                                dilation=a["dilation"], groups=a["groups"])
    return LinearOp(OpKind.CONV, [inp], lambda xs: rg.Conv(xs[0], weight, bias, spec, label),
                    blocked, label)


@produces(rg.BatchNorm)
def _bn_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp = a["input"]
    if not is_activation(inp) or a["training"] is not False or not literal(a["eps"]):
        return None
    tensors, whys = {}, []
    for k in ("running_mean", "running_var", "weight", "bias"):
        if a[k] is None:
            tensors[k] = None
            continue
        t, why = constant(ctx, a[k]) if isinstance(a[k], fx.Node) else (None, "not a tensor")
        tensors[k] = t
        if why:
            whys.append(f"{k} {why}")
    stat = a["running_mean"]
    if isinstance(stat, fx.Node) and stat.target is operator.getitem:  # a slice of it
        stat = stat.args[0]
    owner = getattr(stat, "target", "") or ""
    owner = owner if isinstance(owner, str) else ""
    label = join(ctx.path, owner.rpartition(".")[0]) if "." in owner else ctx.path or node.name
    blocked = ""
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        blocked = f"F.batch_norm {label} has no running statistics"
    elif whys:
        blocked = f"F.batch_norm {label}: " + "; ".join(whys)
    eps = float(a["eps"])

    def build(xs):
        return rg.BatchNorm(xs[0], tensors["running_mean"], tensors["running_var"],
                            tensors["weight"], tensors["bias"], eps, label)
    return LinearOp(OpKind.NORM, [inp], build, blocked, label)


def _arith(kind: str, a: dict, node: fx.Node, ctx: Context) -> LinearOp | None:
    x, y = a["input"], a.get("other")
    alpha = a.get("alpha", 1)
    if kind == "neg":
        if not (is_activation(x) and same_shape(node, x)):
            return None
        return LinearOp(OpKind.AFFINE, [x], lambda xs: rg.Neg(xs[0]))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    if kind == "div" and a.get("rounding_mode") is not None:
        return None
    x_act, y_act = is_activation(x), is_activation(y)
    if x_act and y_act:
        if kind not in ("add", "sub") or not same_shape(node, x, y):
            return None
        if x is y:  # x + x, x - x: a scale of one input
            return LinearOp(OpKind.AFFINE, [x],
                            lambda xs, f=(1 + alpha if kind == "add" else 1 - alpha):
                            rg.Scale(xs[0], float(f)))
        if alpha != 1:
            def build_alpha(xs, k=kind, f=float(alpha)):
                other = rg.Scale(xs[1], f)
                return rg.Add((xs[0], other)) if k == "add" else rg.Sub(xs[0], other)
            return LinearOp(OpKind.COMBINE, [x, y], build_alpha)
        if kind == "add":
            return LinearOp(OpKind.COMBINE, [x, y], lambda xs: rg.Add((xs[0], xs[1])))
        return LinearOp(OpKind.COMBINE, [x, y], lambda xs: rg.Sub(xs[0], xs[1]))
    act, other, act_first = (x, y, True) if x_act else (y, x, False)
    if not is_activation(act) or not same_shape(node, act):
        return None
    value, why = constant(ctx, other)
    found = channel_constant(value, tensor_meta(act)[0]) if value is not None else None
    if found is None:
        return None
    factor, dim = found
    blocked = f"{node.name}: operand {why}" if why else ""
    if isinstance(tensor_like(factor), Tensor) and tensor_meta(node)[1] != tensor_meta(act)[1]:
        return None
    if kind == "mul":
        if isinstance(factor, float) and factor == 1.0:
            return LinearOp(OpKind.PASS, [act], lambda xs: xs[0])
        return LinearOp(OpKind.AFFINE, [act], lambda xs: rg.Scale(xs[0], factor, dim=dim),
                        blocked)
    if kind == "div":
        if not act_first:
            return None
        inv = _map(factor, lambda t: 1.0 / t)
        return LinearOp(OpKind.AFFINE, [act], lambda xs: rg.Scale(xs[0], inv, dim=dim), blocked)
    value = _map(factor, lambda t: t * alpha) if act_first else factor
    sign = -1.0 if kind == "sub" else 1.0
    if isinstance(value, float) and value == 0.0 and act_first:
        return LinearOp(OpKind.PASS, [act], lambda xs: xs[0])
    if act_first:
        shift = value if sign > 0 else _map(value, lambda t: -t)
        return LinearOp(OpKind.AFFINE, [act], lambda xs: rg.Shift(xs[0], shift, dim=dim), blocked)
    if kind == "add":  # c + alpha * x
        inner = (lambda xs: rg.Scale(xs[0], float(alpha))) if alpha != 1 else (lambda xs: xs[0])
        if isinstance(value, float) and value == 0.0:
            return LinearOp(OpKind.PASS if alpha == 1 else OpKind.AFFINE, [act], inner)
        return LinearOp(OpKind.AFFINE, [act], lambda xs: rg.Shift(inner(xs), value, dim=dim),
                        blocked)
    # c - alpha * x

    def rsub(xs):
        inner = rg.Neg(xs[0]) if alpha == 1 else rg.Scale(xs[0], -float(alpha))
        return rg.Shift(inner, value, dim=dim)
    return LinearOp(OpKind.AFFINE, [act], rsub, blocked)


def _map(value, f):
    """``f`` applied to a constant (to a computed one as part of its computation)."""
    return value.map(f) if isinstance(value, Computed) else f(value)


@produces()
def _dropout_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    return _passthrough(node, a["input"]) if a["training"] is False else None


@produces(rg.AvgPool)
def _avg_pool_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp = a["input"]
    if not is_activation(inp, (4,)) or not literal(*(a[k] for k in a if k != "input")):
        return None
    k = pair(a["kernel_size"])
    s = k if a["stride"] in (None, [], ()) else pair(a["stride"])
    p = pair(a["padding"])
    label = node.name

    def pool(xs):
        return rg.AvgPool(xs[0], k, s, p, bool(a["count_include_pad"]), bool(a["ceil_mode"]),
                          a["divisor_override"], label)
    return LinearOp(OpKind.POOL, [inp], pool, label=label)


@produces(rg.Concat)
def _cat_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    parts = a["tensors"]
    if not isinstance(parts, (list, tuple)) or len(parts) < 1 or not isinstance(a["dim"], int):
        return None
    if not all(is_activation(p) for p in parts) or len(set(parts)) != len(parts):
        return None
    rank = len(tensor_meta(parts[0])[0])
    dim = a["dim"] % rank
    if dim != 1 and not (rank < 4 and dim == rank - 1):  # channels first, or last (2-D, 3-D)
        return None
    return LinearOp(OpKind.COMBINE, list(parts), lambda xs: rg.Concat(tuple(xs), dim))


@produces(rg.Scale, rg.Shift, rg.Add, rg.Sub, rg.Neg)
def _arith_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    return _arith(ARITH[node.target], a, node, ctx)


@produces()
def _pass_method(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    return _passthrough(node, a["input"])


@produces(rg.Scale, rg.Shift, rg.Add, rg.Sub, rg.Neg)
def _arith_method(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    return _arith(node.target.rstrip("_"), a, node, ctx)


#: Functions (matched by identity, arguments bound by name) -> their rule.
FUNCTION_RULES: dict[Callable, Callable] = {
    F.conv2d: _conv_function,
    F.batch_norm: _bn_function,
    F.avg_pool2d: _avg_pool_function,
    F.pad: pad_function,
    operator.getitem: crop_function,
    border_pad: border_pad_function,
    torch.cat: _cat_function,
    torch.concat: _cat_function,
    **dict.fromkeys(DROPOUT_FUNCS, _dropout_function),
    **{f: _arith_function for f in ARITH if f in SIGS},
    **LAYER_FUNCTION_RULES,
}

#: Tensor methods (in-place variants included) -> their rule.
METHOD_RULES: dict[str, Callable] = {
    "contiguous": _pass_method,
    "clone": _pass_method,
    **dict.fromkeys(("add", "sub", "mul", "div", "neg"), _arith_method),
    **LAYER_METHOD_RULES,
}


def produced_types() -> set[type[rg.Node]]:
    """Node types the rule tables can produce (the region input included)."""
    rules = [r for r, _ in MODULE_RULES.values()] + list(FUNCTION_RULES.values()) + \
        list(METHOD_RULES.values())
    return produced(rules) | {rg.Input}


def _function_op(node: fx.Node, ctx: Context) -> LinearOp | None:
    target = node.target
    if node.op == "call_function" and target in ARITH and target not in SIGS:
        args = list(node.args)   # operator.add & co: positional only
        if node.kwargs or len(args) not in (1, 2):
            return None
        a = {"input": args[0], "other": args[1] if len(args) == 2 else None, "alpha": 1}
        return _arith(ARITH[target], a, node, ctx)
    if node.op == "call_method":
        rule = METHOD_RULES.get(target.rstrip("_")) if isinstance(target, str) else None
    else:
        rule = FUNCTION_RULES.get(target)
    a = bind(node) if rule is not None else None
    return None if a is None else rule(a, ctx, node)


def classify(node: fx.Node, ctx: Context) -> LinearOp | None:
    """The node as a linear op of a region, or None."""
    if not is_activation(node):
        return None
    if node.op == "call_module":
        return _module_op(node, ctx)
    if node.op in ("call_function", "call_method"):
        return _function_op(node, ctx)
    return None
