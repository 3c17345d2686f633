"""The front-end-neutral expression of a linear region.

A region has one input value and one output value. Front ends (``fx.py``,
``onnx.py``) build an expression tree out of the node types below; ``reduce``
turns it into one ``AffineConv`` using only the algebra (``region_eval.evaluate``
runs the training form with torch ops, for the proofs). Tensors held by nodes
are the model's own tensors (live ``nn.Parameter`` objects in the fx front end),
so the map from branch parameters to the fused kernel can be differentiated.

Node kinds (all activations are NCHW, all weights in torch's layout):

========== ===============================================================
Input      the region's input value (the identity branch is just ``Input``)
Conv       forward conv with a parameter weight (O, I/g, KH, KW), optional bias
BatchNorm  eval-mode batch norm with running statistics
AvgPool    average pooling (a depthwise conv with constant taps)
Scale      multiply by a scalar or a per-channel (C,) tensor (div: 1/c)
Shift      add a scalar or a per-channel (C,) constant
Add        elementwise sum of two or more branches
Sub, Neg   difference, negation
Concat     concatenation of branches along channels
Pad        constant padding (scalar or per-channel value) of the spatial dims
========== ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from repfuse import algebra as A
from repfuse.core.spec import ConvSpec, Pad4, Pair
from repfuse.errors import InputError, NotFusable


@dataclass(eq=False)
class Node:
    """Base class; nodes compare and hash by identity (a DAG may share nodes)."""


@dataclass(eq=False)
class Input(Node):
    channels: int


@dataclass(eq=False)
class Conv(Node):
    input: Node
    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec
    name: str = ""


@dataclass(eq=False)
class BatchNorm(Node):
    input: Node
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    name: str = ""


@dataclass(eq=False)
class AvgPool(Node):
    input: Node
    kernel_size: Pair
    stride: Pair
    padding: Pad4 | Pair | int = 0
    count_include_pad: bool = True
    ceil_mode: bool = False
    divisor_override: int | None = None
    name: str = ""


@dataclass(eq=False)
class Scale(Node):
    input: Node
    factor: float | Tensor
    name: str = ""


@dataclass(eq=False)
class Shift(Node):
    input: Node
    value: float | Tensor
    name: str = ""


@dataclass(eq=False)
class Add(Node):
    inputs: tuple[Node, ...] = field(default_factory=tuple)


@dataclass(eq=False)
class Sub(Node):
    left: Node
    right: Node


@dataclass(eq=False)
class Neg(Node):
    input: Node


@dataclass(eq=False)
class Concat(Node):
    inputs: tuple[Node, ...] = field(default_factory=tuple)


@dataclass(eq=False)
class Pad(Node):
    input: Node
    padding: Pad4
    value: float | Tensor = 0.0
    name: str = ""
    # True: pad with the value the input branch gives for a zero input (DBB's BN-and-pad);
    # ``value`` is then ignored.
    zero_response: bool = False


# ---------------------------------------------------------------------------- functions
# reduce / describe / parameters / count_params. The reducer only calls the algebra;
# ``region_eval.evaluate`` is the independent reference (torch ops on activations).

def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, (Add, Concat)):
        return tuple(node.inputs)
    if isinstance(node, Sub):
        return (node.left, node.right)
    if isinstance(node, Input):
        return ()
    return (node.input,)


def _label(node: Node) -> str:
    name = getattr(node, "name", "")
    kind = type(node).__name__
    return f"{kind} {name!r}" if name else kind


def _walk(expr: Node) -> list[Node]:
    """Nodes in post-order, each once (the expression may be a DAG)."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(expr, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for child in reversed(_children(node)):
            stack.append((child, False))
    return order


def _region_dtype_device(expr: Node):
    """dtype and device of the region's weights (convs first, then norms, then constants):
    what an identity branch is cast back to."""
    ranked = ((Conv, ("weight",)), (BatchNorm, ("weight", "running_mean")),
              (Node, ("factor", "value")))
    nodes = _walk(expr)
    for kind, attrs in ranked:
        for node in nodes:
            if not isinstance(node, kind):
                continue
            for attr in attrs:
                t = getattr(node, attr, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


class _Identity:
    """The region input, kept symbolic so that a conv on it costs no composition."""

    def __init__(self, channels: int, dtype, device) -> None:
        self.out_channels = channels
        self.dtype = dtype
        self.device = device

    def conv(self):
        return A.identity_conv(self.out_channels, dtype=self.dtype, device=self.device)


class _LazyConv:
    """A conv on the region input, cast to float64 only when needed (a following BN folds
    into it in one pass)."""

    def __init__(self, node: Conv, spec: ConvSpec) -> None:
        self.node, self.spec = node, spec
        self.out_channels = spec.out_channels
        self._conv = None

    def conv(self):
        if self._conv is None:
            self._conv = A.AffineConv.from_tensors(self.node.weight, self.node.bias, self.spec)
        return self._conv

    def fold_bn(self, bn: BatchNorm):
        """bn(conv(x)) with the float64 cast and the BN scale in one multiplication."""
        scale, shift = A.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        bn.eps, _label(bn))
        if scale.numel() != self.out_channels:
            raise NotFusable(f"has {scale.numel()} channels but follows "
                             f"{self.spec.describe()} with {self.out_channels} outputs")
        w = self.node.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        weight = w * scale.reshape(-1, 1, 1, 1)  # promotes to float64
        bias = shift if self.node.bias is None else self.node.bias * scale + shift
        return A.AffineConv(weight, bias, self.spec, dtype, w.device)


def _affine(arg):
    return arg.conv() if isinstance(arg, (_Identity, _LazyConv)) else arg


def _reduce_node(node: Node, args: list, dtype, device):
    if isinstance(node, Input):
        return _Identity(node.channels, dtype, device)
    if isinstance(node, Conv):
        spec = node.spec
        if spec.transposed:
            raise NotFusable("transposed convolution is not fused; leave it")
        if spec.layout != "NCHW":
            spec = spec.replace(layout="NCHW")
        if isinstance(args[0], _Identity):
            if args[0].out_channels != spec.in_channels:
                raise NotFusable(f"expects {spec.in_channels} input channels, the region "
                                 f"input has {args[0].out_channels}")
            spec.check_weight(tuple(node.weight.shape))
            return _LazyConv(node, spec)
        if spec.padding_mode == "zeros":
            _refuse_bias_parameter_through_padding(node.input, spec)
        return A.compose(_affine(args[0]), A.AffineConv.from_tensors(node.weight, node.bias,
                                                                      spec))
    if isinstance(node, BatchNorm):
        if isinstance(args[0], _LazyConv) and node.running_mean is not None:
            return args[0].fold_bn(node)
        return A.fold_bn(_affine(args[0]), node.running_mean, node.running_var, node.weight,
                         node.bias, node.eps, name=_label(node))
    if isinstance(node, AvgPool):
        if isinstance(args[0], _LazyConv):
            args = [args[0].conv()]
        pool = A.avg_pool_conv(args[0].out_channels, node.kernel_size, node.stride,
                               node.padding, count_include_pad=node.count_include_pad,
                               ceil_mode=node.ceil_mode, divisor_override=node.divisor_override,
                               dtype=args[0].dtype, device=args[0].device, name=_label(node))
        if isinstance(args[0], _Identity):
            return pool
        if node.count_include_pad:
            _refuse_bias_parameter_through_padding(node.input, pool.spec)
        return A.compose(_affine(args[0]), pool)
    args = [_affine(a) for a in args]
    if isinstance(node, Scale):
        return A.scale(args[0], node.factor)
    if isinstance(node, Shift):
        return A.shift(args[0], node.value)
    if isinstance(node, Add):
        return A.add(*args)
    if isinstance(node, Sub):
        return A.subtract(*args)
    if isinstance(node, Neg):
        return A.negate(args[0])
    if isinstance(node, Concat):
        return A.concat(*args)
    if isinstance(node, Pad):
        value = args[0].bias if node.zero_response else node.value
        return A.pad_output(args[0], node.padding, value, name=_label(node))
    raise NotFusable(f"{type(node).__name__} is not a linear region node")


def _refuse_bias_parameter_through_padding(inp: Node, spec: ConvSpec) -> None:
    """A zero-padding conv (or pool) after a part with a bias parameter is exact only in
    the interior; ``compose`` refuses it when the bias is non-zero. Where the bias is
    zero now (freshly initialised weights) the values agree but the bias's gradient does
    not (the border sees zeros, not the bias): the fused kernel would not follow the
    training form, so the structure decides, not the current value."""
    if not A.reads_padding(spec):
        return
    for n in _walk(inp):
        carrier = {Conv: "bias", BatchNorm: "bias", Shift: "value"}.get(type(n))
        if carrier and isinstance(getattr(n, carrier, None), torch.Tensor):
            raise NotFusable(
                f"{spec.describe()} zero-pads the output of {_label(n)}, which has "
                f"a bias parameter: the bias would pass through the zero padding (exact only "
                "in the interior, and for the bias's gradient even while it is zero); pad "
                "with the bias value (BN-and-pad) or drop the padding")


def _check_materialized(expr: Node) -> None:
    """Refuse tensors without values (``meta`` device): nothing exact can be computed."""
    for node in _walk(expr):
        for t in vars(node).values():
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                raise InputError(
                    f"{_label(node)} holds a tensor on the 'meta' device, which has no "
                    "values; materialize the model first (model.to_empty(device='cpu') "
                    "and load_state_dict) and fuse again")


def reduce(expr: Node):
    """The region as one ``AffineConv`` (float64, differentiable in the node tensors).

    Raises ``NotFusable`` naming the node whose operation would not be exact or whose
    values make the fused kernel NaN or infinite, and ``InputError`` for tensors without
    values (``meta`` device)."""

    _check_materialized(expr)
    dtype, device = _region_dtype_device(expr)
    memo: dict[int, object] = {}
    for node in _walk(expr):
        args = [memo[id(c)] for c in _children(node)]
        try:
            memo[id(node)] = _reduce_node(node, args, dtype, device)
        except NotFusable as err:
            if getattr(err, "node", None) is not None:
                raise
            new = NotFusable(f"{_label(node)}: {err}")
            new.node = node  # type: ignore[attr-defined]
            raise new from err
        except ValueError as err:  # GeometryError from ConvSpec
            new = NotFusable(f"{_label(node)}: {err}")
            new.node = node  # type: ignore[attr-defined]
            raise new from err
    out = _affine(memo[id(expr)])
    if not _finite(out):
        culprit = next((n for n in _walk(expr) if not _finite(memo[id(n)])), expr)
        err = NotFusable(f"{_label(culprit)}: gives NaN or infinite fused weights (NaN/Inf "
                         "parameters, running_var + eps <= 0, or a division by zero); fix "
                         "the weights or leave the region unfused")
        err.node = culprit  # type: ignore[attr-defined]
        raise err
    return out


def _finite(value) -> bool:
    """Whether a reduced value (identity, lazy conv or AffineConv) has finite entries."""
    if isinstance(value, _Identity):
        return True
    if isinstance(value, _LazyConv):
        tensors = (value.node.weight, value.node.bias)
    else:
        tensors = (value.weight, value.bias)
    with torch.no_grad():
        # a NaN or Inf entry makes the sum non-finite (float64 sums of weights do not overflow)
        return all(bool(torch.isfinite(t.sum())) for t in tensors if t is not None)


# ---------------------------------------------------------------------------- describe

def _describe_node(node: Node, args: list[list[str]]) -> list[str]:
    if isinstance(node, Input):
        return ["identity"]
    if isinstance(node, (Add, Concat)):
        out = [s for a in args for s in a]
        return out if isinstance(node, Add) else ["cat(" + ", ".join(out) + ")"]
    if isinstance(node, Sub):
        return args[0] + ["-" + s for s in args[1]]
    if isinstance(node, Neg):
        return ["-" + s for s in args[0]]
    if isinstance(node, Conv):
        mine = node.spec.describe()
    elif isinstance(node, BatchNorm):
        mine = "bn"
    elif isinstance(node, AvgPool):
        k = ConvSpec(1, 1, node.kernel_size).kernel_size
        mine = f"avgpool{k[0]}x{k[1]}"
    elif isinstance(node, Scale):
        mine = "scale"
    elif isinstance(node, Shift):
        mine = "shift"
    else:
        mine = "pad"
    child = args[0]
    if len(child) == 1:
        return [mine if child[0] == "identity" else f"{child[0]}+{mine}"]
    return ["(" + ", ".join(child) + f")+{mine}"]


def describe(expr: Node) -> list[str]:
    """Branch kinds, e.g. ``["conv3x3+bn", "conv1x1+bn", "bn"]``."""
    memo: dict[int, list[str]] = {}
    for node in _walk(expr):
        memo[id(node)] = _describe_node(node, [memo[id(c)] for c in _children(node)])
    return memo[id(expr)]


# ---------------------------------------------------------------------------- parameters

_TENSOR_FIELDS = {
    Conv: ("weight", "bias"),
    BatchNorm: ("weight", "bias"),
    Scale: ("factor",),
    Shift: ("value",),
    Pad: ("value",),
}


def parameters(expr: Node) -> dict[str, Tensor]:
    """The tensors the fused (weight, bias) is differentiable in, keyed
    ``"<node name>.<field>"`` (conv weight/bias, BN weight/bias, tensor scale/shift/pad
    values). BN running statistics are buffers and are not included."""

    out: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for node in _walk(expr):
        fields = _TENSOR_FIELDS.get(type(node), ())
        if not fields:
            continue
        kind = type(node).__name__.lower()
        base = getattr(node, "name", "") or f"{kind}{counts.get(kind, 0)}"
        counts[kind] = counts.get(kind, 0) + 1
        for f in fields:
            t = getattr(node, f, None)
            if not isinstance(t, torch.Tensor):
                continue
            key = f"{base}.{f}"
            if key in out and out[key] is not t:
                n = 2
                while f"{base}#{n}.{f}" in out:
                    n += 1
                key = f"{base}#{n}.{f}"
            out[key] = t
    return out


def count_params(expr: Node) -> int:
    """Number of parameter elements of the region, shared tensors counted once."""
    seen: set = set()
    total = 0
    for t in parameters(expr).values():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
    return total


#: A region whose fused conv would have more than this many times the parameters of its
#: branches (a depthwise kxk followed by a dense 1x1, say) is left as it is.
GROWTH_LIMIT = 4


def check_growth(expr: Node, fused) -> None:
    """Raise ``NotFusable`` when the fused conv (``AffineConv``) would have more than
    ``GROWTH_LIMIT`` times the parameters of the region: exact, but more compute."""
    before = count_params(expr)
    after = fused.weight.numel() + (fused.bias.numel() if fused.bias is not None else 0)
    if after > GROWTH_LIMIT * max(before, 1):
        raise NotFusable(f"fusing would multiply the parameters by {after / max(before, 1):.1f} "
                         f"({before} -> {after}): more compute than the training form")
