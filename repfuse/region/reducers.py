"""``reduce``: a region expression as one ``AffineConv``, with the algebra only.

One reducer per node type (registered with ``region.registry.reducer``); the reference
evaluator (``region.reference``) shares no code with them, so the proofs compare two
independent computations. Reducers work on the canonical (N, C, H, W) view of the
region's values (``region.layout``): a Linear is a 1x1 conv, a Conv1d a conv with one
row, a change of layout the identity; the result records the region's value layout.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from repfuse import algebra as A
from repfuse.core.spec import ConvSpec
from repfuse.errors import InputError, NotFusable
from repfuse.region import layout as L
from repfuse.region import nodes as N
from repfuse.region.registry import REDUCERS, reducer
from repfuse.region.tree import (
    children,
    dtype_device,
    label,
    materialized,
    node_tensors,
    own_tensors,
    region_input,
    substitute,
    walk,
)


@dataclass
class _Context:
    """What a reducer may need besides its node and arguments: the region's dtype and
    device (an identity branch is cast to them)."""

    dtype: torch.dtype
    device: torch.device
    #: ids of the nodes whose value is globally pooled (read after the pool)
    pooled: set = field(default_factory=set)
    #: ids of the tensors the expression holds (a reducer never writes into them); None:
    #: a reducer writes into no tensor
    held: set | None = None
    #: the reduced values that nodes still to be reduced read, by the id of their node
    waiting: dict = field(default_factory=dict)

    def writable(self, t: torch.Tensor) -> bool:
        """Whether a reducer may write into ``t``: a tensor this reduction made (not one the
        expression holds, not a view, not a leaf that requires grad) that no value still to
        be read shares (a node read by several, as a region expression is a DAG). The memo
        of a reduction that wrote in place no longer holds each node's own value
        (``reduce`` reduces again without writing to find the node a non-finite kernel
        comes from)."""
        if self.held is None or id(t) in self.held or t._base is not None \
                or (t.is_leaf and t.requires_grad):
            return False
        memory = t.untyped_storage().data_ptr()
        return all(memory not in _memories(v) for v in self.waiting.values())


def _memories(value) -> set:
    """The storages a reduced value's tensors lie in."""
    if isinstance(value, _LazyConv):
        held = [value.weight, value.bias] + ([] if value._conv is None else
                                             [value._conv.weight, value._conv.bias])
    elif isinstance(value, _Identity):
        held = []
    else:
        held = [value.weight, value.bias]
    return {t.untyped_storage().data_ptr() for t in held if t is not None}


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
    into it in one pass). ``weight`` is the node's (a 4-D view of a Linear's or a
    Conv1d's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> None:
        self.weight, self.bias, self.spec = weight, bias, spec
        self.out_channels = spec.out_channels
        self._conv = None

    def conv(self):
        if self._conv is None:
            self._conv = A.AffineConv.from_tensors(self.weight, self.bias, self.spec)
        return self._conv

    def fold_bn(self, bn: N.BatchNorm):
        """bn(conv(x)) with the float64 cast and the BN scale in one multiplication."""
        scale, shift = A.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        bn.eps, label(bn))
        if scale.numel() != self.out_channels:
            raise NotFusable(f"has {scale.numel()} channels but follows "
                             f"{self.spec.describe()} with {self.out_channels} outputs")
        w = self.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        if A.shapes_only(w):
            return self.conv().replace(dtype=dtype)
        if w.dtype == torch.float64 or (torch.is_grad_enabled() and (
                w.requires_grad or scale.requires_grad)):
            weight = A.scale_rows(w, scale)  # (with autograd, a cast scaled in place is copied)
        else:   # cast, then scaled in place: a product promoting float32 runs 3x slower
            weight = w.to(torch.float64).mul_(scale.reshape(-1, 1, 1, 1))
        bias = shift if self.bias is None else self.bias * scale + shift
        return A.AffineConv(weight, bias, self.spec, dtype, w.device)


def _affine(arg):
    return arg.conv() if isinstance(arg, (_Identity, _LazyConv)) else arg


def refuse_bias_through_padding(inp: N.Node, spec: ConvSpec) -> None:
    """A zero-padding conv (or pool) after a part with a bias parameter is exact only in
    the interior; ``compose`` refuses it when the bias is non-zero. Where the bias is
    zero now (freshly initialised weights) the values agree but the bias's gradient does
    not (the border sees zeros, not the bias): the fused kernel would not follow the
    training form, so the structure (each node type's ``bias_carrier``) decides, not the
    current value."""
    if not A.reads_padding(spec):
        return
    for n in walk(inp):
        carrier = n.bias_carrier
        if carrier and isinstance(getattr(n, carrier, None), torch.Tensor):
            raise NotFusable(
                f"{spec.describe()} zero-pads the output of {label(n)}, which has "
                f"a bias parameter: the bias would pass through the zero padding (exact only "
                "in the interior, and for the bias's gradient even while it is zero); pad "
                "with the bias value (BN-and-pad) or drop the padding")


# ---------------------------------------------------------------------------- reducers
@reducer(N.Input)
def _input(node: N.Input, args: list, ctx: _Context):
    return _Identity(node.channels, ctx.dtype, ctx.device)


def _forward_conv(node: N.Node, weight: torch.Tensor, bias, spec: ConvSpec, arg):
    """A (4-D) forward conv applied to the reduced value ``arg``."""
    if spec.transposed:
        raise NotFusable(f"{spec.describe()} is transposed but held by a forward conv node")
    if spec.layout != "NCHW":
        spec = spec.replace(layout="NCHW")
    if isinstance(arg, _Identity):
        if arg.out_channels != spec.in_channels:
            raise NotFusable(f"expects {spec.in_channels} input channels, the region "
                             f"input has {arg.out_channels}")
        spec.check_weight(tuple(weight.shape))
        return _LazyConv(weight, bias, spec)
    if spec.padding_mode == "zeros":
        refuse_bias_through_padding(node.input, spec)
    return A.compose(_affine(arg), A.AffineConv.from_tensors(weight, bias, spec))


@reducer(N.Conv)
def _conv(node: N.Conv, args: list, ctx: _Context):
    weight = node.weight.unsqueeze(2) if node.weight.dim() == 3 else node.weight  # Conv1d
    return _forward_conv(node, weight, node.bias, node.spec, args[0])


@reducer(N.Linear)
def _linear(node: N.Linear, args: list, ctx: _Context):
    o, i = node.weight.shape
    return _forward_conv(node, node.weight.reshape(o, i, 1, 1), node.bias, ConvSpec(i, o, 1),
                         args[0])


@reducer(N.ConvTranspose)
def _conv_transpose(node: N.ConvTranspose, args: list, ctx: _Context):
    spec = node.spec if node.spec.layout == "NCHW" else node.spec.replace(layout="NCHW")
    if not spec.transposed:
        raise NotFusable(f"{spec.describe()} is not transposed but held by a transposed node")
    deconv = A.AffineConv.from_tensors(node.weight, node.bias, spec)
    if isinstance(args[0], _Identity):
        if args[0].out_channels != spec.in_channels:
            raise NotFusable(f"expects {spec.in_channels} input channels, the region "
                             f"input has {args[0].out_channels}")
        return deconv
    if not A.shift_passes_transposed(spec):
        for n in walk(node.input):
            carrier = n.bias_carrier
            if carrier and isinstance(getattr(n, carrier, None), torch.Tensor):
                raise NotFusable(
                    f"{spec.describe()} (padding {spec.padding}) after {label(n)}, which has "
                    "a bias parameter: a per-channel shift before a transposed convolution "
                    "reaches its outputs through a number of taps that differs between "
                    "stride phases and at the borders (it is a bias only for stride 1 and "
                    "padding >= dilation * (kernel - 1)), so it cannot be folded")
    return A.compose(_affine(args[0]), deconv)


def _track_pooling(node: N.Node, ctx: _Context) -> None:
    """Record whether ``node``'s value is read after a global pool; branches combined
    must agree."""
    inputs = [id(c) in ctx.pooled for c in children(node)]
    if isinstance(node, N.Unflatten):
        inputs = inputs[:1]
    if any(inputs) and not all(inputs):
        raise NotFusable("combines a globally pooled value with one that is not")
    if isinstance(node, N.GlobalPool) or any(inputs):
        ctx.pooled.add(id(node))


def _pointwise(arg) -> bool:
    spec = None if isinstance(arg, _Identity) else arg.spec
    return spec is None or (spec.kernel_size == (1, 1) and spec.stride == (1, 1)
                            and max(spec.padding) == 0 and not spec.transposed)


@reducer(N.Transpose, N.Unflatten)
def _relayout(node: N.Node, args: list, ctx: _Context):
    return args[0]


@reducer(N.GlobalPool)
def _global_pool(node: N.GlobalPool, args: list, ctx: _Context):
    """The mean over positions commutes with what came before only when that is pointwise;
    the fused layer then reads the pooled input (``AffineConv.pooled``)."""
    if id(node.input) in ctx.pooled:
        raise NotFusable("pools a value that is pooled already")
    if not _pointwise(args[0]):
        raise NotFusable(f"averages the positions of a value computed by "
                         f"{_affine(args[0]).describe()}, which is not pointwise: the mean does "
                         "not commute with it")
    return args[0]


@reducer(N.Flatten)
def _flatten(node: N.Flatten, args: list, ctx: _Context):
    if node.start == 1:
        if id(node.input) not in ctx.pooled:
            raise NotFusable("flattens the positions of a value that is not pooled to 1x1")
        return args[0]
    if not _pointwise(args[0]):
        raise NotFusable(f"merges the positions of a value computed by "
                         f"{_affine(args[0]).describe()}, which is not pointwise")
    return args[0]


@reducer(N.BatchNorm)
def _batch_norm(node: N.BatchNorm, args: list, ctx: _Context):
    if isinstance(args[0], _LazyConv) and node.running_mean is not None:
        return args[0].fold_bn(node)
    return A.fold_bn(_affine(args[0]), node.running_mean, node.running_var, node.weight,
                     node.bias, node.eps, name=label(node))


@reducer(N.AvgPool)
def _avg_pool(node: N.AvgPool, args: list, ctx: _Context):
    arg = args[0].conv() if isinstance(args[0], _LazyConv) else args[0]
    pool = A.avg_pool_conv(arg.out_channels, node.kernel_size, node.stride, node.padding,
                           count_include_pad=node.count_include_pad, ceil_mode=node.ceil_mode,
                           divisor_override=node.divisor_override, dtype=arg.dtype,
                           device=arg.device, name=label(node))
    if isinstance(arg, _Identity):
        return pool
    if node.count_include_pad:
        refuse_bias_through_padding(node.input, pool.spec)
    return A.compose(_affine(arg), pool)


@reducer(N.Scale)
def _scale(node: N.Scale, args: list, ctx: _Context):
    return A.scale(_affine(args[0]), node.factor)


@reducer(N.Shift)
def _shift(node: N.Shift, args: list, ctx: _Context):
    return A.shift(_affine(args[0]), node.value)


@reducer(N.Add)
def _add(node: N.Add, args: list, ctx: _Context):
    return A.add(*[_affine(a) for a in args], writable=ctx.writable)


@reducer(N.Sub)
def _sub(node: N.Sub, args: list, ctx: _Context):
    return A.subtract(*[_affine(a) for a in args])


@reducer(N.Neg)
def _neg(node: N.Neg, args: list, ctx: _Context):
    return A.negate(_affine(args[0]))


@reducer(N.Concat)
def _concat(node: N.Concat, args: list, ctx: _Context):
    return A.concat(*[_affine(a) for a in args])


@reducer(N.Pad)
def _pad(node: N.Pad, args: list, ctx: _Context):
    arg = _affine(args[0])
    value = arg.bias if node.zero_response else node.value
    return A.pad_output(arg, node.padding, value, name=label(node))


@reducer(N.Crop)
def _crop(node: N.Crop, args: list, ctx: _Context):
    return A.crop_output(_affine(args[0]), node.crop, name=label(node))


# ---------------------------------------------------------------------------- reduce
def _check_materialized(expr: N.Node) -> None:
    """Refuse tensors without values (``meta`` device): nothing exact can be computed."""
    for node in walk(expr):
        for t in own_tensors(node):
            if t.device.type == "meta":
                raise InputError(
                    f"{label(node)} holds a tensor on the 'meta' device, which has no "
                    "values; materialize the model first (model.to_empty(device='cpu') "
                    "and load_state_dict) and fuse again")


def _located(node: N.Node, err: Exception) -> NotFusable:
    return NotFusable(f"{label(node)}: {err}", node=node)


def reduce(expr: N.Node):
    """The region as one ``AffineConv`` (float64, differentiable in the node tensors).

    Computed values (``region.computed``) are evaluated from float64 copies of their
    sources, differentiably. Raises ``NotFusable`` (its ``.node`` is the offending node,
    with its computed values evaluated) naming the node whose operation would not be exact
    or whose values make the fused kernel NaN or infinite, and ``InputError`` for tensors
    without values (``meta`` device)."""
    _check_materialized(expr)
    ctx = _Context(*dtype_device(expr))
    original, expr = expr, materialized(expr, exact=True)
    ctx.held = {id(t) for t in node_tensors(expr)}
    out = _reduce_nodes(expr, ctx)[0]
    if not _finite(out):
        # each node's own value, from a reduction that writes into none of them
        memo = _reduce_nodes(expr, _Context(ctx.dtype, ctx.device))[1]
        culprit = next((n for n in walk(expr) if not _finite(memo[id(n)])), expr)
        raise NotFusable(f"{label(culprit)}: gives NaN or infinite fused weights (NaN/Inf "
                         "parameters, running_var + eps <= 0, or a division by zero); fix "
                         "the weights or leave the region unfused", node=culprit)
    if expr is not original:  # computed values were evaluated in float64: cast back to
        out = out.replace(dtype=ctx.dtype)  # the dtype they have in the model
    return out


def reduce_shapes(expr: N.Node):
    """``reduce`` run on the shapes only: the same reducers on ``meta`` copies of the
    region's tensors, so no kernel is computed. Gives an ``AffineConv`` whose weight and
    bias have the fused shapes (on ``meta``), or raises the ``NotFusable`` / geometry
    error that ``reduce`` would raise for a reason the shapes and the structure decide
    (channels, grids, padding a bias would cross, layouts). Conditions on values (a zero
    bias, a pad value equal to the bias, finite weights) are taken to hold: ``reduce``
    decides them. Its ``dtype`` is the one ``reduce`` gives."""
    tensors = node_tensors(expr)
    meta = {id(t): t.detach().to("meta") for t in tensors if t.device.type != "meta"}
    shapes = substitute(expr, meta)
    dtype = dtype_device(shapes)[0]
    expr = materialized(shapes, exact=True)
    out = _reduce_nodes(expr, _Context(*dtype_device(expr)))[0]
    return out if expr is shapes else out.replace(dtype=dtype)  # as ``reduce`` casts back


def _reduce_nodes(expr: N.Node, ctx: _Context):
    """(the reduced output, memo of each node's reduced value by ``id``)."""
    memo: dict[int, object] = {}
    layouts: dict[int, str] = {}
    order = walk(expr)
    reads = Counter(id(c) for node in order for c in children(node))
    for node in order:
        args = [memo[id(c)] for c in children(node)]
        for c in children(node):
            reads[id(c)] -= 1
            if not reads[id(c)]:
                ctx.waiting.pop(id(c), None)
        rule = REDUCERS.get(type(node))
        if rule is None:
            raise NotFusable(f"{type(node).__name__} is not a linear region node", node=node)
        try:
            layouts[id(node)] = node.out_layout([layouts[id(c)] for c in children(node)])
            _track_pooling(node, ctx)
            memo[id(node)] = rule(node, args, ctx)
            if reads[id(node)]:
                ctx.waiting[id(node)] = memo[id(node)]
        except NotFusable as err:
            if err.node is not None:
                raise
            raise _located(node, err) from err
        except ValueError as err:  # GeometryError from ConvSpec
            raise _located(node, err) from err
    out = _affine(memo[id(expr)])
    layout, inp = layouts[id(expr)], region_input(expr).layout
    pooled = id(expr) in ctx.pooled
    if pooled and not _pointwise(out):
        raise NotFusable(f"the region pools its input and gives {out.describe()}, which is "
                         "not pointwise; cut it at the pool", node=expr)
    merged = inp in ("NLC", "NHWC") and layout == "NC" and _pointwise(out)
    permuted = (inp, layout) in L.MOVES
    if layout != inp and not merged and not permuted and not (pooled and inp == "NCHW"):
        raise NotFusable(f"the region reads a {inp} value and gives a {layout} one; only a "
                         "move of the channel axis is kept after the fused layer; cut it "
                         "where the layout changes", node=expr)
    out.value_layout = layout
    out.input_layout = inp if merged or permuted else ""
    out.pooled = pooled
    return out, memo


def _finite(value) -> bool:
    """Whether a reduced value (identity, lazy conv or AffineConv) has finite entries."""
    if isinstance(value, _Identity):
        return True
    if isinstance(value, _LazyConv):
        tensors = (value.weight, value.bias)
    else:
        tensors = (value.weight, value.bias)
    with torch.no_grad():
        # a NaN or Inf entry makes the sum non-finite (float64 sums of weights do not overflow)
        return all(math.isfinite(t.sum().item()) for t in tensors if t is not None)


__all__ = ["REDUCERS", "reduce", "reduce_shapes", "refuse_bias_through_padding"]
