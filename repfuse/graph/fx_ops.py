"""Which fx nodes are linear ops, and the region-expression node each one becomes.

``classify(node, ctx)`` returns a ``LinearOp`` (the activation inputs of the node and
a builder from their expressions to the node's expression) or ``None`` for anything
that is not a linear op of a region. A ``LinearOp`` with ``blocked`` set looks
linear but must not be fused (a conv module called more than once, a weight that is
not a parameter or buffer, a batch norm without running statistics); the region
that holds it is left alone and reported with that reason.

Rules (what is matched / what must hold / what it becomes):

* ``nn.Conv2d`` module or ``F.conv2d`` / parameter weight, literal geometry / ``Conv``
* ``nn.BatchNorm2d`` module or ``F.batch_norm`` / running statistics, eval / ``BatchNorm``
* ``nn.Identity``, ``nn.Dropout*`` (eval), ``F.dropout(training=False)``,
  ``contiguous``, ``clone`` / - / the input itself
* ``nn.AvgPool2d`` or ``F.avg_pool2d`` / literal geometry / ``AvgPool``
* ``nn.ZeroPad2d``, ``nn.ConstantPad2d``, ``F.pad(mode="constant")`` / non-negative / ``Pad``
* ``x * c``, ``x / c``, ``c * x`` / ``c`` a number or a parameter/buffer of shape
  (C,1,1), (1,C,1,1) or one element / ``Scale``; ``x + c``, ``x - c`` likewise ``Shift``
* ``a + b``, ``a - b``, ``-a``, ``torch.cat([...], dim=1)`` on activations / equal
  shapes / ``Add``, ``Sub``, ``Neg``, ``Concat``
* a call of a module whose whole forward is one linear region / called once,
  plain arguments / that region's expression
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse.core.spec import ConvSpec
from repfuse.graph import region as rg
from repfuse.graph.fx_trace import hook_reason
from repfuse.graph.fx_values import (
    ARITH,
    DROPOUT_FUNCS,
    PASS_MODULES,
    SIGS,
    Context,
    LinearOp,
    bind,
    channel_factor,
    constant,
    is_activation,
    join,
    literal,
    pair,
    same_shape,
    tensor_meta,
)

__all__ = ["Context", "LinearOp", "classify", "inplace_target", "tensor_meta"]


def _passthrough(node, inp, label="") -> LinearOp | None:
    if not (is_activation(inp) and same_shape(node, inp)):
        return None
    return LinearOp("pass", [inp], lambda xs: xs[0], label=label)


# ----------------------------------------------------------------------------- modules
def _conv_module(node, m: nn.Conv2d, ctx: Context) -> LinearOp | None:
    inp = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if inp is None or not is_activation(inp):
        return None
    label = join(ctx.path, node.target)
    blocked = ctx.shared(m)
    if not isinstance(m.weight, nn.Parameter) or (
            m.bias is not None and not isinstance(m.bias, nn.Parameter)):
        blocked = blocked or f"conv {label}: weight or bias is not a parameter"
    spec = ConvSpec(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                    m.dilation, m.groups, m.padding_mode)
    return LinearOp("conv", [inp], lambda xs: rg.Conv(xs[0], m.weight, m.bias, spec, label),
                    blocked, label, [m])


def _bn_module(node, m: nn.BatchNorm2d, ctx: Context) -> LinearOp | None:
    inp = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if inp is None or not is_activation(inp):
        return None
    label = join(ctx.path, node.target)
    blocked = ctx.shared(m)
    if m.running_mean is None or m.running_var is None:
        blocked = blocked or f"batch norm {label} has no running statistics (it normalizes " \
                             "with batch statistics even in eval mode)"

    def build(xs):
        return rg.BatchNorm(xs[0], m.running_mean, m.running_var, m.weight, m.bias, m.eps,
                            label)
    return LinearOp("bn", [inp], build, blocked, label, [m])


def _module_op(node: fx.Node, ctx: Context) -> LinearOp | None:
    m = ctx.module.get_submodule(node.target)
    label = join(ctx.path, node.target)
    if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward \
            and type(m)._conv_forward is nn.Conv2d._conv_forward:
        return _conv_module(node, m, ctx)
    if isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward:
        return _bn_module(node, m, ctx)
    if len(node.args) != 1 or node.kwargs:
        return None
    inp = node.args[0]
    if hook_reason(m) and id(m) not in ctx.summaries:
        return None  # kept as it is: fx would drop its hooks
    if type(m) in PASS_MODULES:
        return _passthrough(node, inp, label)
    if type(m) is nn.AvgPool2d:
        if not is_activation(inp):
            return None
        k = pair(m.kernel_size)
        s = pair(m.stride if m.stride is not None else m.kernel_size)
        p = pair(m.padding)

        def pool(xs):
            return rg.AvgPool(xs[0], k, s, p, m.count_include_pad, m.ceil_mode,
                              m.divisor_override, label)
        return LinearOp("avgpool", [inp], pool, label=label)
    if type(m) in (nn.ZeroPad2d, nn.ConstantPad2d):
        return _pad_op(inp, tuple(m.padding), float(getattr(m, "value", 0.0)), label)
    summary = ctx.summaries.get(id(m))
    if summary is not None:
        op = summary(inp)
        if op is not None:
            op.blocked = op.blocked or ctx.shared(m)
            op.label = label
            op.modules = [m]
        return op
    return None


def _pad_op(inp, pad, value, label="") -> LinearOp | None:
    if not is_activation(inp) or len(pad) not in (2, 4) or min(pad) < 0:
        return None
    left, right = pad[0], pad[1]
    top, bottom = (pad[2], pad[3]) if len(pad) == 4 else (0, 0)
    padding = (top, bottom, left, right)
    return LinearOp("pad", [inp], lambda xs: rg.Pad(xs[0], padding, value, label), label=label)


# ----------------------------------------------------------------------------- functions
def _conv_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp = a["input"]
    if not is_activation(inp) or not literal(a["stride"], a["padding"], a["dilation"],
                                               a["groups"]):
        return None
    weight, why = constant(ctx, a["weight"])
    if a["weight"] is not None and not isinstance(a["weight"], fx.Node):
        return None
    bias, why_b = (None, "") if a["bias"] is None else constant(ctx, a["bias"])
    label = join(ctx.path, getattr(a["weight"], "target", node.name))
    if not isinstance(weight, Tensor) or weight.dim() != 4 or (
            a["bias"] is not None and not isinstance(bias, Tensor)):
        why = why or why_b or "weight is not a 4-D tensor"
        return LinearOp("conv", [inp], lambda xs: xs[0], f"F.conv2d {node.name}: {why}", label)
    blocked = why or why_b
    if blocked or a["weight"].op != "get_attr":
        blocked = f"F.conv2d {node.name}: weight {blocked or 'is computed in forward'}"
    spec = ConvSpec.from_weight(tuple(weight.shape), stride=a["stride"], padding=a["padding"],
                                dilation=a["dilation"], groups=a["groups"])
    return LinearOp("conv", [inp], lambda xs: rg.Conv(xs[0], weight, bias, spec, label),
                    blocked, label)


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
    owner = getattr(a["running_mean"], "target", "") or ""
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
    return LinearOp("bn", [inp], build, blocked, label)


def _arith(kind: str, a: dict, node: fx.Node, ctx: Context) -> LinearOp | None:
    x, y = a["input"], a.get("other")
    alpha = a.get("alpha", 1)
    if kind == "neg":
        if not (is_activation(x) and same_shape(node, x)):
            return None
        return LinearOp("neg", [x], lambda xs: rg.Neg(xs[0]))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    if kind == "div" and a.get("rounding_mode") is not None:
        return None
    x_act, y_act = is_activation(x), is_activation(y)
    if x_act and y_act:
        if kind not in ("add", "sub") or not same_shape(node, x, y):
            return None
        if x is y:  # x + x, x - x: a scale of one input
            return LinearOp(kind, [x], lambda xs, f=(1 + alpha if kind == "add" else 1 - alpha):
                            rg.Scale(xs[0], float(f)))
        if alpha != 1:
            def build_alpha(xs, k=kind, f=float(alpha)):
                other = rg.Scale(xs[1], f)
                return rg.Add((xs[0], other)) if k == "add" else rg.Sub(xs[0], other)
            return LinearOp(kind, [x, y], build_alpha)
        if kind == "add":
            return LinearOp("add", [x, y], lambda xs: rg.Add((xs[0], xs[1])))
        return LinearOp("sub", [x, y], lambda xs: rg.Sub(xs[0], xs[1]))
    act, other, act_first = (x, y, True) if x_act else (y, x, False)
    if not is_activation(act) or not same_shape(node, act):
        return None
    value, why = constant(ctx, other)
    factor = channel_factor(value, tensor_meta(act)[0]) if value is not None else None
    if factor is None:
        return None
    blocked = f"{node.name}: operand {why}" if why else ""
    if isinstance(factor, Tensor) and tensor_meta(node)[1] != tensor_meta(act)[1]:
        return None
    if kind == "mul":
        if isinstance(factor, float) and factor == 1.0:
            return LinearOp("pass", [act], lambda xs: xs[0])
        return LinearOp("scale", [act], lambda xs: rg.Scale(xs[0], factor), blocked)
    if kind == "div":
        if not act_first:
            return None
        inv = 1.0 / factor if isinstance(factor, float) else 1.0 / factor
        return LinearOp("scale", [act], lambda xs: rg.Scale(xs[0], inv), blocked)
    value = factor * alpha if act_first else factor
    sign = -1.0 if kind == "sub" else 1.0
    if isinstance(value, float) and value == 0.0 and act_first:
        return LinearOp("pass", [act], lambda xs: xs[0])
    if act_first:
        return LinearOp("shift", [act], lambda xs: rg.Shift(xs[0], sign * value), blocked)
    if kind == "add":  # c + alpha * x
        inner = (lambda xs: rg.Scale(xs[0], float(alpha))) if alpha != 1 else (lambda xs: xs[0])
        if isinstance(value, float) and value == 0.0:
            return LinearOp("pass" if alpha == 1 else "scale", [act], inner)
        return LinearOp("shift", [act], lambda xs: rg.Shift(inner(xs), value), blocked)
    # c - alpha * x

    def rsub(xs):
        inner = rg.Neg(xs[0]) if alpha == 1 else rg.Scale(xs[0], -float(alpha))
        return rg.Shift(inner, value)
    return LinearOp("shift", [act], rsub, blocked)


def _function_op(node: fx.Node, ctx: Context) -> LinearOp | None:
    target = node.target
    if node.op == "call_function" and target in ARITH and target not in SIGS:
        args = list(node.args)
        if node.kwargs or len(args) not in (1, 2):
            return None
        a = {"input": args[0], "other": args[1] if len(args) == 2 else None, "alpha": 1}
        return _arith(ARITH[target], a, node, ctx)
    a = bind(node)
    if a is None:
        return None
    if node.op == "call_method":
        name = target.rstrip("_")
        if name in ("contiguous", "clone"):
            return _passthrough(node, a["input"])
        return _arith(name, a, node, ctx)
    if target in ARITH:
        return _arith(ARITH[target], a, node, ctx)
    if target is F.conv2d:
        return _conv_function(a, ctx, node)
    if target is F.batch_norm:
        return _bn_function(a, ctx, node)
    if target in DROPOUT_FUNCS:
        return _passthrough(node, a["input"]) if a["training"] is False else None
    if target is F.avg_pool2d:
        inp = a["input"]
        if not is_activation(inp) or not literal(*(a[k] for k in a if k != "input")):
            return None
        k = pair(a["kernel_size"])
        s = k if a["stride"] in (None, [], ()) else pair(a["stride"])
        p = pair(a["padding"])
        label = node.name

        def pool(xs):
            return rg.AvgPool(xs[0], k, s, p, bool(a["count_include_pad"]), bool(a["ceil_mode"]),
                              a["divisor_override"], label)
        return LinearOp("avgpool", [inp], pool, label=label)
    if target is F.pad:
        if a["mode"] != "constant" or not literal(a["pad"], a["value"]):
            return None
        value = 0.0 if a["value"] is None else float(a["value"])
        return _pad_op(a["input"], tuple(a["pad"]), value, node.name)
    if target in (torch.cat, torch.concat):
        parts = a["tensors"]
        if not isinstance(parts, (list, tuple)) or len(parts) < 1 or a["dim"] not in (1, -3):
            return None
        if not all(is_activation(p) for p in parts) or len(set(parts)) != len(parts):
            return None
        return LinearOp("cat", list(parts), lambda xs: rg.Concat(tuple(xs)))
    return None


def classify(node: fx.Node, ctx: Context) -> LinearOp | None:
    """The node as a linear op of a region, or None."""
    if not is_activation(node):
        return None
    if node.op == "call_module":
        return _module_op(node, ctx)
    if node.op in ("call_function", "call_method"):
        return _function_op(node, ctx)
    return None


def inplace_target(node: fx.Node, module: nn.Module) -> fx.Node | None:
    """The activation an op modifies in place, if any."""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_") and node.args:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv) or \
                node.kwargs.get("inplace") is True:
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
