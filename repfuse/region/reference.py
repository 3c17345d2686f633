"""The training form of a region expression run with torch ops: the reference the proofs
compare a fused convolution against, differentiable in the node tensors (autograd on it
is the training form's backward). It runs on the model's own layouts (``F.linear`` on
the last axis of tokens, ``F.conv1d`` on sequences, the model's transposes and reshapes),
not on the canonical view the reducers use.

One evaluator per node type (registered with ``region.registry.evaluator``). This module
shares no code with ``region.reduce``: the proofs depend on the two being independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError
from repfuse.region import nodes as N
from repfuse.region.registry import EVALUATORS, evaluator
from repfuse.region.tree import children, materialized, walk


def _channel_view(value, x: Tensor, dim: int = 1):
    """A scalar or a (C,) tensor broadcast along axis ``dim`` of ``x``."""
    if isinstance(value, torch.Tensor):
        v = value.to(x.dtype)
        if v.numel() == 1:
            return v.reshape(())
        return v.reshape((-1,) + (1,) * (x.dim() - 1 - dim % x.dim()))
    return value


def _cast(t, like: Tensor):
    return None if t is None else t.to(like.dtype)


@evaluator(N.Input)
def _input(node: N.Input, args: list, x: Tensor) -> Tensor:
    return x


@evaluator(N.Conv)
def _conv(node: N.Conv, args: list, x: Tensor) -> Tensor:
    spec = node.spec
    y = args[0]
    if node.weight.dim() == 3:
        return _conv1d(node, y)
    if spec.padding_mode != "zeros" or not spec.is_symmetric_padding:
        t, b, l, r = spec.padding
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        y = F.pad(y, (l, r, t, b), mode=mode)
        spec = spec.replace(padding=0, padding_mode="zeros")    # the input is padded now
    bias = None if node.bias is None else node.bias.to(y.dtype)
    weight = node.weight.to(y.dtype)
    if _float64_depthwise(y, weight, spec.groups):
        z = _depthwise(y, weight, bias, spec)
        if z is not None:
            return z
    return F.conv2d(y, weight, bias, spec.stride, spec.torch_padding, spec.dilation,
                    spec.groups)


#: Elements of the product of unfolded windows and taps up to which a float64 depthwise
#: convolution is computed from ``F.unfold`` (``_depthwise``).
UNFOLD_ELEMENTS = 1 << 22


def _float64_depthwise(y: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether ``_depthwise`` may compute this convolution: float64 on the CPU, one input
    channel per group. aten has no float64 grouped kernel on the CPU and runs one
    convolution per group: measured, one thread, 1024 channels, 3x3, a 6x7 probe, forward
    and backward 31 ms against 10 ms with ``_depthwise`` (the proofs' probes are that small;
    at 56x56 aten is faster, hence ``UNFOLD_ELEMENTS``)."""
    return (groups > 1 and weight.shape[1] == 1 and y.dim() == 4
            and y.dtype == torch.float64 and y.device.type == "cpu")


def _depthwise(y: Tensor, weight: Tensor, bias, spec: ConvSpec) -> Tensor | None:
    """``F.conv2d`` with one input channel per group (``groups`` = input channels, any
    channel multiplier) and ``spec``'s symmetric zero padding, stride and dilation, as the
    input's unfolded windows times each channel's taps; None where that product would have
    more than ``UNFOLD_ELEMENTS`` elements or the output would be empty."""
    n, c = y.shape[:2]
    out, _, kh, kw = weight.shape
    try:
        oh, ow = spec.output_size(y.shape[-2:])
    except GeometryError:   # an empty output: F.conv2d reports it as it always has
        return None
    if n * out * kh * kw * oh * ow > UNFOLD_ELEMENTS:
        return None
    cols = F.unfold(y, (kh, kw), dilation=spec.dilation, padding=spec.torch_padding,
                    stride=spec.stride)
    taps = weight.reshape(1, c, out // c, kh * kw, 1)
    z = (cols.reshape(n, c, 1, kh * kw, oh * ow) * taps).sum(3).reshape(n, out, oh, ow)
    return z if bias is None else z + bias.reshape(1, -1, 1, 1)


def _conv1d(node: N.Conv, y: Tensor) -> Tensor:
    """A Conv1d (spec with one row: kernel (1, K), padding (0, 0, left, right))."""
    spec = node.spec
    _, _, left, right = spec.padding
    if spec.padding_mode != "zeros" or left != right:
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        y = F.pad(y, (left, right), mode=mode)
        left = 0
    bias = None if node.bias is None else node.bias.to(y.dtype)
    return F.conv1d(y, node.weight.to(y.dtype), bias, spec.stride[1], left, spec.dilation[1],
                    spec.groups)


@evaluator(N.ConvTranspose)
def _conv_transpose(node: N.ConvTranspose, args: list, x: Tensor) -> Tensor:
    """torch's transposed convolution without padding, then the per-side crop (output
    padding past the end reads nothing: zeros, then the bias)."""
    spec, y = node.spec, args[0]
    full = F.conv_transpose2d(y, node.weight.to(y.dtype), None, spec.stride, 0, 0,
                              spec.groups, spec.dilation)
    t, b, l, r = spec.padding
    oh, ow = spec.output_padding
    full = F.pad(full, (0, max(0, ow - r), 0, max(0, oh - b)))
    out = full[:, :, t:full.shape[2] - max(0, b - oh), l:full.shape[3] - max(0, r - ow)]
    return out if node.bias is None else out + node.bias.to(y.dtype).reshape(-1, 1, 1)


@evaluator(N.Linear)
def _linear(node: N.Linear, args: list, x: Tensor) -> Tensor:
    y = args[0]
    bias = None if node.bias is None else node.bias.to(y.dtype)
    return F.linear(y, node.weight.to(y.dtype), bias)


@evaluator(N.Transpose)
def _transpose(node: N.Transpose, args: list, x: Tensor) -> Tensor:
    return args[0].permute(*node.perm)


@evaluator(N.Flatten)
def _flatten(node: N.Flatten, args: list, x: Tensor) -> Tensor:
    return args[0].flatten(1) if node.start == 1 else args[0].flatten(0, -2)


@evaluator(N.GlobalPool)
def _global_pool(node: N.GlobalPool, args: list, x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(args[0], 1) if node.keepdim else args[0].mean((-2, -1))


@evaluator(N.Unflatten)
def _unflatten(node: N.Unflatten, args: list, x: Tensor) -> Tensor:
    return args[0].reshape(*args[1].shape[:-1], args[0].shape[-1])


@evaluator(N.BatchNorm)
def _batch_norm(node: N.BatchNorm, args: list, x: Tensor) -> Tensor:
    y = args[0]
    stats = node.running_mean is not None and node.running_var is not None
    return F.batch_norm(y, _cast(node.running_mean, y), _cast(node.running_var, y),
                        _cast(node.weight, y), _cast(node.bias, y), not stats, 0.0, node.eps)


@evaluator(N.AvgPool)
def _avg_pool(node: N.AvgPool, args: list, x: Tensor) -> Tensor:
    y = args[0]
    geo = ConvSpec(1, 1, node.kernel_size, node.kernel_size if node.stride is None
                   else node.stride, node.padding)
    kernel, stride = geo.kernel_size, geo.stride
    t, b, l, r = geo.padding
    if t == b and l == r:
        return F.avg_pool2d(y, kernel, stride, (t, l), node.ceil_mode,
                            node.count_include_pad, node.divisor_override)
    padded = F.pad(y, (l, r, t, b))
    total = F.avg_pool2d(padded, kernel, stride, 0, node.ceil_mode, True, divisor_override=1)
    if node.divisor_override:
        return total / node.divisor_override
    if node.count_include_pad:
        return total / (kernel[0] * kernel[1])
    ones = F.pad(torch.ones_like(y[:1, :1]), (l, r, t, b))
    count = F.avg_pool2d(ones, kernel, stride, 0, node.ceil_mode, True, divisor_override=1)
    return total / count


@evaluator(N.Scale)
def _scale(node: N.Scale, args: list, x: Tensor) -> Tensor:
    return args[0] * _channel_view(node.factor, args[0], node.dim)


@evaluator(N.Shift)
def _shift(node: N.Shift, args: list, x: Tensor) -> Tensor:
    return args[0] + _channel_view(node.value, args[0], node.dim)


@evaluator(N.Add)
def _add(node: N.Add, args: list, x: Tensor) -> Tensor:
    out = args[0]
    for a in args[1:]:
        out = out + a
    return out


@evaluator(N.Sub)
def _sub(node: N.Sub, args: list, x: Tensor) -> Tensor:
    return args[0] - args[1]


@evaluator(N.Neg)
def _neg(node: N.Neg, args: list, x: Tensor) -> Tensor:
    return -args[0]


@evaluator(N.Concat)
def _concat(node: N.Concat, args: list, x: Tensor) -> Tensor:
    return torch.cat(args, node.dim)


@evaluator(N.Pad)
def _pad(node: N.Pad, args: list, x: Tensor) -> Tensor:
    y = args[0]
    t, b, l, r = ConvSpec(1, 1, 1, padding=node.padding).padding
    if node.zero_response:
        response = evaluate(node.input, torch.zeros_like(x[:1]))
        value = response[0, :, response.shape[2] // 2, response.shape[3] // 2]
    else:
        value = node.value
    padded = F.pad(y, (l, r, t, b))
    mask = F.pad(torch.zeros_like(y[:1, :1]), (l, r, t, b), value=1.0)
    return padded + mask * _channel_view(value, y)


@evaluator(N.Crop)
def _crop(node: N.Crop, args: list, x: Tensor) -> Tensor:
    y = args[0]
    t, b, l, r = node.crop
    return y[:, :, t:y.shape[2] - b, l:y.shape[3] - r]


def evaluate(expr: N.Node, x: Tensor) -> Tensor:
    """The region's training form applied to ``x`` with torch ops (the reference);
    computed values are evaluated from their sources as they are."""
    expr = materialized(expr)
    memo: dict[int, Tensor] = {}
    for node in walk(expr):
        rule = EVALUATORS.get(type(node))
        if rule is None:
            raise TypeError(f"{type(node).__name__} is not a region node")
        memo[id(node)] = rule(node, [memo[id(c)] for c in children(node)], x)
    return memo[id(expr)]
