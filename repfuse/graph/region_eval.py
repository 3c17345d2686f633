"""The training form of a region expression (``repfuse.graph.region``) run with torch
ops: the reference the proofs compare a fused convolution against, and differentiable
in the node tensors (autograd on it is the training form's backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from repfuse.core.spec import ConvSpec
from repfuse.graph.region import (
    Add,
    AvgPool,
    BatchNorm,
    Concat,
    Conv,
    Input,
    Neg,
    Node,
    Pad,
    Scale,
    Shift,
    Sub,
    _children,
    _walk,
)


def _channel_view(value, x: Tensor):
    if isinstance(value, torch.Tensor):
        v = value.to(x.dtype)
        return v.reshape(-1, 1, 1) if v.numel() > 1 else v.reshape(())
    return value


def _cast(t, like: Tensor):
    return None if t is None else t.to(like.dtype)


def _evaluate_node(node: Node, args: list, x: Tensor) -> Tensor:
    if isinstance(node, Input):
        return x
    if isinstance(node, Conv):
        spec = node.spec
        y = args[0]
        if spec.padding_mode != "zeros":
            t, b, l, r = spec.padding
            y = F.pad(y, (l, r, t, b), mode=spec.padding_mode)
            pad = (0, 0)
        elif not spec.is_symmetric_padding:
            t, b, l, r = spec.padding
            y = F.pad(y, (l, r, t, b))
            pad = (0, 0)
        else:
            pad = spec.torch_padding
        bias = None if node.bias is None else node.bias.to(y.dtype)
        return F.conv2d(y, node.weight.to(y.dtype), bias, spec.stride, pad, spec.dilation,
                        spec.groups)
    if isinstance(node, BatchNorm):
        y = args[0]
        stats = node.running_mean is not None and node.running_var is not None
        return F.batch_norm(y, _cast(node.running_mean, y), _cast(node.running_var, y),
                            _cast(node.weight, y), _cast(node.bias, y), not stats, 0.0,
                            node.eps)
    if isinstance(node, AvgPool):
        y = args[0]
        geo = ConvSpec(1, 1, node.kernel_size, node.kernel_size if node.stride is None
                       else node.stride, node.padding)
        kernel, stride = geo.kernel_size, geo.stride
        t, b, l, r = geo.padding
        if t == b and l == r:
            return F.avg_pool2d(y, kernel, stride, (t, l), node.ceil_mode,
                                node.count_include_pad, node.divisor_override)
        padded = F.pad(y, (l, r, t, b))
        total = F.avg_pool2d(padded, kernel, stride, 0, node.ceil_mode, True,
                             divisor_override=1)
        if node.divisor_override:
            return total / node.divisor_override
        if node.count_include_pad:
            return total / (kernel[0] * kernel[1])
        ones = F.pad(torch.ones_like(y[:1, :1]), (l, r, t, b))
        count = F.avg_pool2d(ones, kernel, stride, 0, node.ceil_mode, True,
                             divisor_override=1)
        return total / count
    if isinstance(node, Scale):
        return args[0] * _channel_view(node.factor, args[0])
    if isinstance(node, Shift):
        return args[0] + _channel_view(node.value, args[0])
    if isinstance(node, Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(node, Sub):
        return args[0] - args[1]
    if isinstance(node, Neg):
        return -args[0]
    if isinstance(node, Concat):
        return torch.cat(args, 1)
    if isinstance(node, Pad):
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
    raise TypeError(f"{type(node).__name__} is not a region node")


def evaluate(expr: Node, x: Tensor) -> Tensor:
    """The region's training form applied to ``x`` with torch ops (the reference)."""
    memo: dict[int, Tensor] = {}
    for node in _walk(expr):
        memo[id(node)] = _evaluate_node(node, [memo[id(c)] for c in _children(node)], x)
    return memo[id(expr)]
