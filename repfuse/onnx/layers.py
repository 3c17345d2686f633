"""ONNX rules for the layers beyond 2-D Conv / BatchNormalization (in ``onnx.match``'s
table): Gemm and MatMul, 1-D Conv, ConvTranspose, and the transposes and reshapes around
them.

Rules (what is matched -> what must hold -> what it becomes):

* ``Gemm(A, B[, C])`` -> B (and C) constant, ``transA = 0``, C one value per output
  (or a scalar) -> ``Linear`` with ``alpha * B`` (transposed unless ``transB``) and
  ``beta * C``.
* ``MatMul(x, W)`` -> W a constant matrix on the right -> ``Linear`` (no bias; a following
  ``Add`` of a constant is a ``Shift`` along the last axis).
* ``Conv(x, W[, B])`` with a 3-D weight -> W (and B) constant, explicit or stride-1 SAME
  padding -> ``Conv`` with a one-row spec (a 1-D conv).
* ``ConvTranspose(x, W[, B])`` -> W (and B) constant, 2-D, explicit pads, no
  ``output_shape`` -> ``ConvTranspose``.
* ``Transpose(x, perm)`` -> (0, 2, 1), (0, 2, 3, 1) or (0, 3, 1, 2) -> ``Transpose``.
* ``GlobalAveragePool``, ``ReduceMean`` over H and W -> ``GlobalPool``; ``Flatten(axis=1)``,
  ``Reshape(x, [-1, C])``, ``Squeeze(x, [2, 3])`` of the pooled (N, C, 1, 1) ->
  ``Flatten(start=1)``.
* ``Flatten(x, axis=rank - 1)``, ``Reshape(x, [-1, C])`` of tokens -> ``Flatten``;
  ``Reshape(y, Shape(x))`` and ``Reshape(y, [-1, L, C])`` back to the tokens ``y`` was
  flattened from -> ``Unflatten``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError, NotFusable
from repfuse.onnx.attrs import constant_weights, explicit_pads, ints, op, rank, tensor
from repfuse.region.op import LinearOp, OpKind, produces

__all__ = ["LAYER_RULES", "conv1d"]


def _activation(value: ir.Value | None, consts) -> bool:
    return value is not None and consts(value) is None


@produces(rg.Linear)
def _gemm(node: ir.Node, consts) -> LinearOp | None:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    weight, bias = consts(b), (consts(c) if c is not None else None)
    if not _activation(a, consts) or weight is None or weight.ndim != 2 \
            or weight.dtype.kind != "f" or node.attributes.get_int("transA", 0):
        return None
    if c is not None and (bias is None or bias.dtype.kind != "f"):
        return None
    alpha = node.attributes.get_float("alpha", 1.0)
    beta = node.attributes.get_float("beta", 1.0)
    w = weight if node.attributes.get_int("transB", 0) else weight.T
    out = w.shape[0]
    if bias is not None:
        if bias.size not in (1, out) or (bias.ndim == 2 and bias.shape[0] != 1):
            return None
        bias = np.broadcast_to(bias.reshape(-1), (out,)) * beta
    wt = tensor(w * alpha if alpha != 1.0 else w)
    bt = tensor(bias) if bias is not None else None
    name = node.name or ""
    return op(node, [a], lambda x: rg.Linear(x[0], wt, bt, name), OpKind.CONV)


@produces(rg.Linear)
def _matmul(node: ir.Node, consts) -> LinearOp | None:
    x, w = node.inputs[0], node.inputs[1]
    weight = consts(w)
    if not _activation(x, consts) or weight is None or weight.ndim != 2 \
            or weight.dtype.kind != "f":
        return None
    wt, name = tensor(weight.T), node.name or ""
    return op(node, [x], lambda a: rg.Linear(a[0], wt, None, name), OpKind.CONV)


def conv1d(node: ir.Node, consts) -> LinearOp | None:
    """A ``Conv`` with a 3-D weight (called by ``onnx.match``'s Conv rule)."""
    found = constant_weights(node, consts, 3)
    if found is None:
        return None
    x, weight, bias = found
    group = node.attributes.get_int("group", 1)
    k = int(weight.shape[2])
    strides, dilation = ints(node, "strides", [1]), ints(node, "dilations", [1])
    pads = explicit_pads(node, [k], dilation, strides)
    if pads is None or ints(node, "kernel_shape", [k]) != [k]:
        return None
    try:
        spec = ConvSpec.one_row(int(weight.shape[1]) * group, int(weight.shape[0]), k,
                                strides[0], (pads[0], pads[1]), dilation[0], group)
    except GeometryError:
        return None
    wt, bt = tensor(weight), (tensor(bias.reshape(-1)) if bias is not None else None)
    name = node.name or ""
    return op(node, [x], lambda a: rg.Conv(a[0], wt, bt, spec, name), OpKind.CONV)


@produces(rg.ConvTranspose)
def _conv_transpose(node: ir.Node, consts) -> LinearOp | None:
    found = constant_weights(node, consts, 4)
    if found is None:
        return None
    x, weight, bias = found
    if node.attributes.get("output_shape") is not None or \
            node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        return None
    kernel = list(weight.shape[2:])
    if ints(node, "kernel_shape", kernel) != kernel:
        return None
    pads = ints(node, "pads", [0, 0, 0, 0])
    try:
        spec = ConvSpec.from_weight(
            tuple(weight.shape), stride=tuple(ints(node, "strides", [1, 1])),
            padding=(pads[0], pads[2], pads[1], pads[3]),
            dilation=tuple(ints(node, "dilations", [1, 1])),
            groups=node.attributes.get_int("group", 1), transposed=True,
            output_padding=tuple(ints(node, "output_padding", [0, 0])))
    except GeometryError:
        return None
    wt, bt = tensor(weight), (tensor(bias.reshape(-1)) if bias is not None else None)
    name = node.name or ""
    return op(node, [x], lambda a: rg.ConvTranspose(a[0], wt, bt, spec, name), OpKind.CONV)


@produces(rg.Transpose)
def _transpose(node: ir.Node, consts) -> LinearOp | None:
    x = node.inputs[0]
    perm = tuple(ints(node, "perm", []))
    if not _activation(x, consts) or perm not in ((0, 2, 1), (0, 2, 3, 1), (0, 3, 1, 2)):
        return None
    return op(node, [x], lambda a: rg.Transpose(a[0], perm), OpKind.PASS)


def _flattened_from(expr: rg.Node) -> rg.Node:
    """The tokens the (N * L, C) value ``expr`` was flattened from, through the nodes of
    one input between them."""
    node = expr
    while not isinstance(node, rg.Flatten):
        inputs = rg.children(node)
        if len(inputs) != 1:
            raise NotFusable("a reshape back to tokens whose flattening is not in the region")
        node = inputs[0]
    return node.input


def _flatten_op(node: ir.Node, x: ir.Value) -> LinearOp:
    return op(node, [x], lambda a: rg.Flatten(a[0]), OpKind.PASS)


def _pooled_map(x: ir.Value) -> bool:
    """An (N, C, 1, 1) value."""
    return rank(x) == 4 and tuple(x.shape[2:]) == (1, 1) and isinstance(x.shape[1], int)


def _squeeze_op(node: ir.Node, x: ir.Value) -> LinearOp:
    return op(node, [x], lambda a: rg.Flatten(a[0], 1), OpKind.PASS)


@produces(rg.Flatten)
def _flatten(node: ir.Node, consts) -> LinearOp | None:
    x = node.inputs[0]
    n = rank(x)
    if not _activation(x, consts) or n not in (3, 4):
        return None
    axis = node.attributes.get_int("axis", 1) % n
    if axis == 1 and _pooled_map(x):
        return _squeeze_op(node, x)
    return _flatten_op(node, x) if axis == n - 1 else None


@produces(rg.Flatten)
def _squeeze(node: ir.Node, consts) -> LinearOp | None:
    x = node.inputs[0]
    axes = consts(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else np.asarray(ints(node, "axes", []))
    if not _activation(x, consts) or not _pooled_map(x) or axes is None:
        return None
    return _squeeze_op(node, x) if sorted(int(a) % 4 for a in axes.reshape(-1)) == [2, 3] \
        else None


def _global_pool_op(node: ir.Node, x: ir.Value, keepdim: bool) -> LinearOp:
    name = node.name or ""
    return op(node, [x], lambda a: rg.GlobalPool(a[0], keepdim, name), OpKind.PASS)


@produces(rg.GlobalPool)
def _global_average_pool(node: ir.Node, consts) -> LinearOp | None:
    x = node.inputs[0]
    return _global_pool_op(node, x, True) if _activation(x, consts) and rank(x) == 4 else None


@produces(rg.GlobalPool)
def _reduce_mean(node: ir.Node, consts) -> LinearOp | None:
    x = node.inputs[0]
    axes = consts(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else np.asarray(ints(node, "axes", []))
    if not _activation(x, consts) or rank(x) != 4 or axes is None \
            or sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
        return None
    return _global_pool_op(node, x, bool(node.attributes.get_int("keepdims", 1)))


@produces(rg.Flatten, rg.Unflatten)
def _reshape(node: ir.Node, consts) -> LinearOp | None:
    """Tokens (N, L, C) to (N * L, C) and back (see the module docstring)."""
    x, target = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    n, shape = rank(x), x.shape if x is not None else None
    if not _activation(x, consts) or target is None or shape is None:
        return None
    channels = shape[n - 1]
    dims = consts(target)
    if dims is None:        # Reshape(y, Shape(x)): back to the shape of x
        source = target.producer()
        if source is None or source.op_type != "Shape" or source.attributes \
                or rank(source.inputs[0]) not in (3, 4) or n != 2:
            return None
        like = source.inputs[0]
        last = like.shape[-1]
        if not isinstance(last, int) or (isinstance(channels, int) and last != channels):
            return None
        return op(node, [x, like], lambda a: rg.Unflatten(a[0], a[1]), OpKind.PASS)
    if not isinstance(channels, int) or 0 in dims.reshape(-1):  # 0: copy a dimension
        return None
    dims = [int(d) for d in dims.reshape(-1)]
    if _pooled_map(x) and len(dims) == 2 and dims[1] == shape[1] and (
            dims[0] == -1 or dims[0] == shape[0]):
        return _squeeze_op(node, x)
    rows = shape[:-1]
    if n in (3, 4) and len(dims) == 2 and dims[1] == channels and (
            dims[0] == -1 or all(isinstance(d, int) for d in rows)
            and dims[0] == int(np.prod(rows))):
        return _flatten_op(node, x)
    source = _flattening_source(x, consts)
    if n == 2 and len(dims) in (3, 4) and dims[-1] == channels and source is not None \
            and (dims[0] == -1 or dims[0] == source[0]) and list(source[1:-1]) == dims[1:-1]:
        return op(node, [x], lambda a: rg.Unflatten(a[0], _flattened_from(a[0])),
                  OpKind.PASS)
    return None


def _flattening_source(x: ir.Value, consts, steps: int = 32):
    """The shape of the tokens the 2-D value ``x`` was flattened from (back through nodes
    with one non-constant input), or None."""
    node = x.producer()
    while node is not None and steps > 0:
        steps -= 1
        if node.op_type in ("Flatten", "Reshape") and rank(node.inputs[0]) in (3, 4) \
                and rank(node.outputs[0]) == 2:
            return node.inputs[0].shape
        data = [v for v in node.inputs if v is not None and consts(v) is None]
        if len(data) != 1:
            return None
        node = data[0].producer()
    return None


LAYER_RULES = {
    "Gemm": _gemm, "MatMul": _matmul, "ConvTranspose": _conv_transpose,
    "Transpose": _transpose, "Flatten": _flatten, "Reshape": _reshape,
    "GlobalAveragePool": _global_average_pool, "ReduceMean": _reduce_mean,
    "Squeeze": _squeeze,
}
