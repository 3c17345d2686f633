"""Reading ONNX nodes in the region's terms: attributes, constants as tensors, padding,
per-channel constants (shared by the rule tables ``onnx.match`` and ``onnx.layers``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from repfuse.region.op import LinearOp, OpKind


def op(node: ir.Node, inputs: list[ir.Value], build, kind: OpKind) -> LinearOp:
    """The ``LinearOp`` of ``node`` reading ``inputs``."""
    return LinearOp(kind, inputs, build, label=node.name or "", source=[node])


def tensor(array: np.ndarray) -> torch.Tensor:
    """A constant as a torch tensor of its own."""
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def ints(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else list(default)


def rank(value: ir.Value | None) -> int | None:
    """The rank of ``value``, when shape inference knows it."""
    return None if value is None or value.shape is None else len(value.shape)


def channel_constant(c: np.ndarray, data_rank: int | None = None
                     ) -> tuple[float | torch.Tensor, int] | None:
    """``(value, axis)``: a scalar (axis 1), or a (C,) tensor and the axis of the data
    (of ``data_rank``, 4 when unknown) it runs along, from a constant broadcast against the
    data that varies along one axis other than the batch; else None. (Whether that axis is
    the channel axis is the region layout's to decide.)"""
    data_rank = 4 if data_rank is None else data_rank
    if c.dtype.kind != "f" or c.ndim > data_rank:
        return None
    if c.size == 1:
        return float(c.reshape(())), 1
    full = (1,) * (data_rank - c.ndim) + tuple(c.shape)
    axes = [k for k, n in enumerate(full) if n != 1]
    if len(axes) != 1 or axes[0] == 0:
        return None
    return tensor(c.reshape(-1)), axes[0]


def explicit_pads(node: ir.Node, kernel: list[int], dilation: list[int],
                  strides: list[int]) -> list[int] | None:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end, ...] of a conv or pool with
    ``len(kernel)`` spatial axes, or None when they depend on the input size."""
    n = len(kernel)
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return ints(node, "pads", [0] * 2 * n)
    if auto == "VALID":
        return [0] * 2 * n
    if any(s != 1 for s in strides):
        return None
    begin, end = [], []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        small, large = total // 2, total - total // 2
        begin.append(large if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else large)
    return begin + end


def constant_weights(node: ir.Node, consts, ndim: int):
    """``(x, weight, bias)`` of a Conv-like node: a non-constant input, a floating constant
    ``ndim``-D weight and an optional constant bias (None when absent); None otherwise."""
    x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    weight, bias = consts(w), (consts(b) if b is not None else None)
    if x is None or consts(x) is not None or weight is None or weight.ndim != ndim \
            or weight.dtype.kind != "f" or (b is not None and bias is None):
        return None
    return x, weight, bias
