"""fx rules for the layers beyond Conv2d / BatchNorm2d: Linear, Conv1d, ConvTranspose2d and
the transposes and reshapes real models put around them (tables in ``repfuse.fx.ops``).

Rules (what is matched / what must hold / what it becomes):

* ``nn.Linear`` or ``F.linear`` on a 2-D to 4-D value / parameter weight / ``Linear``
  (on the last axis: (N, C), tokens (N, L, C), channels-last maps (N, H, W, C))
* ``nn.Conv1d`` or ``F.conv1d`` on (N, C, L) / parameter weight, literal geometry /
  ``Conv`` with the weight (O, I/g, K) and a spec of one row (kernel (1, K))
* ``nn.ConvTranspose2d`` or ``F.conv_transpose2d`` on (N, C, H, W) / parameter weight,
  literal geometry, no ``output_size`` / ``ConvTranspose``
* ``x.transpose(1, 2)``, ``x.permute(0, 2, 1)`` on 3-D, ``x.permute(0, 2, 3, 1)`` /
  ``(0, 3, 1, 2)`` on 4-D / - / ``Transpose`` (the region's layout decides whether it
  moves the channel axis, as it must)
* ``x.mean((2, 3))``, ``F.adaptive_avg_pool2d(x, 1)``, ``nn.AdaptiveAvgPool2d(1)`` on
  (N, C, H, W) / - / ``GlobalPool``; ``x.flatten(1)``, ``nn.Flatten()`` of the pooled
  (N, C, 1, 1) / - / ``Flatten(start=1)``
* ``x.flatten(0, -2)`` (``flatten(0, 1)`` of tokens) / - / ``Flatten``;
  ``y.reshape_as(x)``, ``y.view_as(x)`` of the flattened value / ``x`` is an activation
  with the same last axis / ``Unflatten`` (back to ``x``'s shape)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.fx.trace import hook_reason
from repfuse.fx.values import (
    Context,
    LinearOp,
    constant,
    is_activation,
    join,
    layer_op,
    literal,
    pair,
    tensor_meta,
)
from repfuse.region.op import OpKind, produces

__all__ = ["LAYER_FUNCTION_RULES", "LAYER_METHOD_RULES", "LAYER_MODULE_RULES"]

_ANY = (2, 3, 4)


def _params(m: nn.Module) -> bool:
    return isinstance(m.weight, nn.Parameter) and (
        m.bias is None or isinstance(m.bias, nn.Parameter))


def _why(what: str, m: nn.Module) -> str:
    return "" if _params(m) else what + " {label}: weight or bias is not a parameter"


def conv1d_spec(weight_shape, stride, padding, dilation, groups,
                padding_mode: str = "zeros") -> ConvSpec:
    """The one-row 2-D spec of a Conv1d with a weight of ``weight_shape`` (O, I/g, K)."""
    o, ipg, k = (int(s) for s in weight_shape)
    pad = padding if isinstance(padding, str) else pair(padding)[0]
    return ConvSpec.one_row(ipg * groups, o, k, pair(stride)[0], pad, pair(dilation)[0],
                            groups, padding_mode)


# ----------------------------------------------------------------------------- modules
@produces(rg.Linear)
def _linear_module(node: fx.Node, m: nn.Linear, ctx: Context) -> LinearOp | None:
    return layer_op(node, m, ctx, OpKind.CONV,
                    lambda label: lambda xs: rg.Linear(xs[0], m.weight, m.bias, label),
                    _why("linear", m), _ANY)


@produces(rg.Conv)
def _conv1d_module(node: fx.Node, m: nn.Conv1d, ctx: Context) -> LinearOp | None:
    spec = conv1d_spec(m.weight.shape, m.stride, m.padding, m.dilation, m.groups,
                       m.padding_mode)
    return layer_op(node, m, ctx, OpKind.CONV,
                    lambda label: lambda xs: rg.Conv(xs[0], m.weight, m.bias, spec, label),
                    _why("conv1d", m), (3,))


@produces(rg.ConvTranspose)
def _conv_transpose_module(node: fx.Node, m: nn.ConvTranspose2d, ctx: Context
                           ) -> LinearOp | None:
    spec = ConvSpec.from_module(m)

    def build(label):
        return lambda xs: rg.ConvTranspose(xs[0], m.weight, m.bias, spec, label)
    return layer_op(node, m, ctx, OpKind.CONV, build, _why("transposed conv", m), (4,))


def _plain_input(node: fx.Node, m: nn.Module):
    """The one argument of a call of a parameter-free module without hooks, or None."""
    if len(node.args) != 1 or node.kwargs or hook_reason(m):
        return None
    return node.args[0]


@produces(rg.GlobalPool)
def _adaptive_pool_module(node: fx.Node, m: nn.AdaptiveAvgPool2d, ctx: Context
                          ) -> LinearOp | None:
    return _global_pool_op(_plain_input(node, m), m.output_size, True)


@produces(rg.Flatten)
def _flatten_module(node: fx.Node, m: nn.Flatten, ctx: Context) -> LinearOp | None:
    inp = _plain_input(node, m)
    return None if inp is None else _flatten_op(inp, m.start_dim, m.end_dim)


#: What is matched -> (rule, the methods a subclass must not override).
LAYER_MODULE_RULES: dict[type[nn.Module], tuple[Callable, tuple[str, ...]]] = {
    nn.Linear: (_linear_module, ("forward",)),
    nn.Conv1d: (_conv1d_module, ("forward", "_conv_forward")),
    nn.ConvTranspose2d: (_conv_transpose_module, ("forward",)),
    nn.AdaptiveAvgPool2d: (_adaptive_pool_module, ("forward",)),
    nn.Flatten: (_flatten_module, ("forward",)),
}


# ----------------------------------------------------------------------------- functions
def _weighted(a: dict, ctx: Context, node: fx.Node, what: str, ranks: tuple[int, ...],
              weight_dim: int, make) -> LinearOp | None:
    """``F.<what>`` with a parameter weight (and bias): ``make(weight, bias, label)`` gives
    the builder; blocked when the weight is computed in forward or not a parameter."""
    inp = a["input"]
    geometry = [v for k, v in a.items() if k not in ("input", "weight", "bias")]
    if not is_activation(inp, ranks) or not literal(*geometry) \
            or not isinstance(a["weight"], fx.Node):
        return None
    weight, why = constant(ctx, a["weight"])
    bias, why_b = (None, "") if a["bias"] is None else constant(ctx, a["bias"])
    label = join(ctx.path, getattr(a["weight"], "target", node.name))
    if not isinstance(weight, Tensor) or weight.dim() != weight_dim or (
            a["bias"] is not None and not isinstance(bias, Tensor)):
        why = why or why_b or f"weight is not a {weight_dim}-D tensor"
        return LinearOp(OpKind.CONV, [inp], lambda xs: xs[0], f"{what} {node.name}: {why}",
                        label)
    blocked = why or why_b
    if blocked or a["weight"].op != "get_attr":
        blocked = f"{what} {node.name}: weight {blocked or 'is computed in forward'}"
    return LinearOp(OpKind.CONV, [inp], make(weight, bias, label), blocked, label)


@produces(rg.Linear)
def _linear_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    return _weighted(a, ctx, node, "F.linear", _ANY, 2,
                     lambda w, b, label: lambda xs: rg.Linear(xs[0], w, b, label))


@produces(rg.Conv)
def _conv1d_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    def make(w, b, label):
        spec = conv1d_spec(w.shape, a["stride"], a["padding"], a["dilation"], a["groups"])
        return lambda xs: rg.Conv(xs[0], w, b, spec, label)
    return _weighted(a, ctx, node, "F.conv1d", (3,), 3, make)


@produces(rg.ConvTranspose)
def _conv_transpose_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    def make(w, b, label):
        spec = ConvSpec.from_weight(w.shape, stride=a["stride"], padding=a["padding"],
                                    dilation=a["dilation"], groups=a["groups"],
                                    transposed=True, output_padding=a["output_padding"])
        return lambda xs: rg.ConvTranspose(xs[0], w, b, spec, label)
    return _weighted(a, ctx, node, "F.conv_transpose2d", (4,), 4, make)


# ----------------------------------------------------------------------------- layouts
def _rank(value) -> int:
    return len(tensor_meta(value)[0])


def _transpose_op(inp, perm) -> LinearOp | None:
    if not is_activation(inp) or not all(isinstance(d, int) for d in perm):
        return None
    rank = _rank(inp)
    perm = tuple(d % rank for d in perm)
    if rank not in (3, 4) or sorted(perm) != list(range(rank)) or \
            perm not in ((0, 2, 1), (0, 2, 3, 1), (0, 3, 1, 2)):
        return None
    return LinearOp(OpKind.PASS, [inp], lambda xs: rg.Transpose(xs[0], perm))


@produces(rg.Transpose)
def _transpose(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp, d0, d1 = a["input"], a["dim0"], a["dim1"]
    if not is_activation(inp, (3,)) or not all(isinstance(d, int) for d in (d0, d1)):
        return None
    return _transpose_op(inp, (0, 2, 1)) if {d0 % 3, d1 % 3} == {1, 2} else None


@produces(rg.Transpose)
def _permute(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    dims = a["dims"]
    return _transpose_op(a["input"], tuple(dims)) if isinstance(dims, (list, tuple)) else None


def _flatten_op(inp, start, end) -> LinearOp | None:
    """Tokens' positions merged into the batch, or a pooled (N, C, 1, 1) map to (N, C)."""
    if not is_activation(inp, (3, 4)) or not isinstance(start, int) \
            or not isinstance(end, int):
        return None
    rank = _rank(inp)
    if start % rank == 0 and end % rank == rank - 2:
        return LinearOp(OpKind.PASS, [inp], lambda xs: rg.Flatten(xs[0]))
    if rank == 4 and start % rank == 1 and end % rank == 3 \
            and tuple(tensor_meta(inp)[0][2:]) == (1, 1):
        return LinearOp(OpKind.PASS, [inp], lambda xs: rg.Flatten(xs[0], 1))
    return None


@produces(rg.Flatten)
def _flatten(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    return _flatten_op(a["input"], a["start_dim"], a["end_dim"])


def _global_pool_op(inp, size, keepdim: bool) -> LinearOp | None:
    if inp is None or not is_activation(inp, (4,)) or size not in (1, (1, 1), [1, 1]):
        return None
    return LinearOp(OpKind.PASS, [inp], lambda xs: rg.GlobalPool(xs[0], keepdim))


@produces(rg.GlobalPool)
def _mean(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp, dims, keepdim = a["input"], a["dim"], a["keepdim"]
    if not is_activation(inp, (4,)) or not isinstance(dims, (list, tuple)) \
            or not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
        return None
    if sorted(d % 4 for d in dims) != [2, 3]:
        return None
    return _global_pool_op(inp, 1, keepdim)


@produces(rg.GlobalPool)
def _adaptive_pool(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    size = a["output_size"]
    return _global_pool_op(a["input"], tuple(size) if isinstance(size, list) else size, True)


@produces(rg.Unflatten)
def _reshape_as(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    inp, other = a["input"], a["other"]
    if not is_activation(inp, (2,)) or not is_activation(other, (3, 4)) or inp is other:
        return None
    shape, like = tensor_meta(inp)[0], tensor_meta(other)[0]
    if like[-1] != shape[-1] or int(torch.Size(like[:-1]).numel()) != shape[0]:
        return None
    return LinearOp(OpKind.PASS, [inp, other], lambda xs: rg.Unflatten(xs[0], xs[1]))


#: Functions -> their rule (arguments bound by ``fx.values.bind``).
LAYER_FUNCTION_RULES: dict[Callable, Callable] = {
    F.linear: _linear_function,
    F.conv1d: _conv1d_function,
    F.conv_transpose2d: _conv_transpose_function,
    torch.transpose: _transpose,
    torch.permute: _permute,
    torch.flatten: _flatten,
    torch.mean: _mean,
    F.adaptive_avg_pool2d: _adaptive_pool,
}

#: Tensor methods -> their rule.
LAYER_METHOD_RULES: dict[str, Callable] = {
    "transpose": _transpose, "permute": _permute, "flatten": _flatten,
    "reshape_as": _reshape_as, "view_as": _reshape_as, "mean": _mean,
}
