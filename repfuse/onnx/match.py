"""Which ONNX nodes are linear, and the region expression each one stands for.

Rules (what is matched -> what must hold -> what it becomes):

* ``Conv(x, W[, B])`` -> W (and B) constant, 2-D, explicit or stride-1 SAME padding
  -> ``region.Conv``.
* ``BatchNormalization(x, scale, B, mean, var)`` -> all four constant, inference mode,
  extra outputs unused -> ``region.BatchNorm``.
* ``AveragePool(x)`` -> 2-D, no dilation -> ``region.AvgPool``.
* ``Mul/Div(x, c)``, ``Add/Sub(x, c)``, ``Sub(c, x)`` -> ``c`` constant, a scalar or a
  tensor varying along one axis (``(C, 1, 1)``, ``(1, C, 1, 1)``, ``(C,)`` ...) -> ``Scale``
  / ``Shift`` along that axis (+ ``Neg``; the region's layout must have its channels there).
* ``Add/Sub/Sum`` of non-constant values -> ``Add`` / ``Sub``; ``Neg`` -> ``Neg``.
* ``Concat(axis=1)`` (``axis=-1`` of 2-D and 3-D values) of non-constant values -> ``Concat``.
* ``Pad(x, pads[, value])`` -> constant mode, constant pads on H and W only -> ``Pad``.
* ``Slice(x, starts, ends[, axes, steps])`` -> constant, on H and W only, step 1, a
  static input shape -> ``Crop``.
* ``Identity`` / inference ``Dropout`` of a non-constant value -> the value itself.
* ``Gemm``, ``MatMul``, 1-D ``Conv``, ``ConvTranspose``, ``Transpose``, ``Flatten`` and
  ``Reshape`` of tokens: see ``repfuse.onnx.layers``.

Constants are initializers that are not graph inputs, ``Constant`` nodes, and the
outputs of small nodes whose inputs are all constant (``Identity``, ``Cast``,
``Shape`` of a static shape, ``Expand``, ... as the exporters emit them), evaluated
with ``onnx.reference``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError
from repfuse.onnx.attrs import channel_constant, rank
from repfuse.onnx.attrs import explicit_pads as _explicit_pads
from repfuse.onnx.attrs import ints as _ints
from repfuse.onnx.attrs import op as _op
from repfuse.onnx.attrs import tensor as _t
from repfuse.onnx.layers import LAYER_RULES, conv1d
from repfuse.region.op import LinearOp, OpKind, produced, produces

_FOLDABLE = {
    "Identity", "Cast", "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Mul",
    "Div", "Add", "Sub", "Neg", "Sqrt", "Reciprocal", "Concat", "Gather", "Slice",
    "Transpose", "ConstantOfShape", "Range", "Pow", "Flatten", "Shape",
}
_MAX_FOLD_ELEMENTS = 1 << 24


class Constants:
    """Constant values of a graph as numpy arrays (``None`` for non-constants)."""

    def __init__(self) -> None:
        self._cache: dict[int, np.ndarray | None] = {}

    def __call__(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        key = id(value)
        if key not in self._cache:
            self._cache[key] = None  # guards against cycles
            self._cache[key] = self._resolve(value)
        return self._cache[key]

    def _resolve(self, value: ir.Value) -> np.ndarray | None:
        if value.is_graph_input():
            return None
        if value.const_value is not None:
            return np.asarray(value.const_value.numpy())
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(value)
            return None if tensor is None else np.asarray(tensor.numpy())
        if node.op_type not in _FOLDABLE or node.graph is None:
            return None
        if node.op_type == "Shape":
            return _static_shape(node)
        if node.op_type == "CastLike":
            a = self(node.inputs[0])
            target = node.inputs[1].dtype if node.inputs[1] is not None else None
            if a is None or target is None:
                return None
            return a.astype(target.numpy())
        arrays = [self(v) if v is not None else None for v in node.inputs]
        if any(a is None for a, v in zip(arrays, node.inputs) if v is not None):
            return None
        return _evaluate(node, arrays, value)


def _static_shape(node: ir.Node) -> np.ndarray | None:
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None:
        return None
    dims = list(shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    picked = dims[slice(start, end)]
    if not all(isinstance(d, int) for d in picked):
        return None
    return np.asarray(picked, dtype=np.int64)


def _evaluate(node: ir.Node, arrays: list, value: ir.Value) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    if sum(int(a.size) for a in arrays if a is not None) > _MAX_FOLD_ELEMENTS:
        return None
    proto = ir.serde.serialize_node(node)
    try:
        evaluator = ReferenceEvaluator(proto)
        feeds = {n: a for n, a in zip(proto.input, arrays) if n}
        outputs = evaluator.run(None, feeds)
    except Exception:  # noqa: BLE001 - anything the evaluator cannot do stays non-constant
        return None
    result = outputs[value.index()] if value.index() is not None else outputs[0]
    if result is None or np.asarray(result).size > _MAX_FOLD_ELEMENTS:
        return None
    return np.asarray(result)


# ---------------------------------------------------------------------------- linear ops
def _negated(v: float | torch.Tensor):
    return -v


def _reciprocal(v: float | torch.Tensor):
    return 1.0 / v


@produces(rg.Conv)
def _conv(node: ir.Node, consts: Constants) -> LinearOp | None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    weight = consts(w)
    bias = consts(b) if b is not None else None
    if weight is not None and weight.ndim == 3:
        return conv1d(node, consts)
    if x is None or consts(x) is not None or weight is None or weight.ndim != 4:
        return None
    if (b is not None and bias is None) or weight.dtype.kind != "f":
        return None
    group = node.attributes.get_int("group", 1)
    kernel = list(weight.shape[2:])
    if _ints(node, "kernel_shape", kernel) != kernel:
        return None
    strides = _ints(node, "strides", [1, 1])
    dilation = _ints(node, "dilations", [1, 1])
    pads = _explicit_pads(node, kernel, dilation, strides)
    if pads is None:
        return None
    try:
        spec = ConvSpec(int(weight.shape[1]) * group, int(weight.shape[0]), tuple(kernel),
                        tuple(strides), (pads[0], pads[2], pads[1], pads[3]), tuple(dilation),
                        group)
    except GeometryError:
        return None
    wt, bt = _t(weight), (_t(bias.reshape(-1)) if bias is not None else None)
    name = node.name or ""
    return _op(node, [x], lambda a: rg.Conv(a[0], wt, bt, spec, name), OpKind.CONV)


@produces(rg.BatchNorm)
def _batchnorm(node: ir.Node, consts: Constants) -> LinearOp | None:
    x = node.inputs[0]
    params = [consts(v) for v in node.inputs[1:5]]
    if x is None or consts(x) is not None or len(params) != 4:
        return None
    if any(p is None or p.dtype.kind != "f" for p in params):
        return None
    if node.attributes.get_int("training_mode", 0):
        return None
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    scale, shift, mean, var = (_t(p.reshape(-1)) for p in params)
    eps = node.attributes.get_float("epsilon", 1e-5)
    name = node.name or ""
    return _op(node, [x], lambda a: rg.BatchNorm(a[0], mean, var, scale, shift, eps, name),
               OpKind.NORM)


@produces(rg.AvgPool)
def _avgpool(node: ir.Node, consts: Constants) -> LinearOp | None:
    x = node.inputs[0]
    kernel = _ints(node, "kernel_shape", [])
    if x is None or consts(x) is not None or len(kernel) != 2:
        return None
    if _ints(node, "dilations", [1, 1]) != [1, 1]:
        return None
    strides = _ints(node, "strides", [1, 1])
    pads = _explicit_pads(node, kernel, [1, 1], strides)
    if pads is None:
        return None
    include = bool(node.attributes.get_int("count_include_pad", 0))
    ceil = bool(node.attributes.get_int("ceil_mode", 0))
    padding = (pads[0], pads[2], pads[1], pads[3])
    name = node.name or ""
    return _op(node, [x], lambda a: rg.AvgPool(a[0], tuple(kernel), tuple(strides), padding,
                                                    include, ceil, None, name), OpKind.POOL)


@produces(rg.Add, rg.Sub, rg.Scale, rg.Shift, rg.Neg)
def _binary(node: ir.Node, consts: Constants) -> LinearOp | None:
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    left, right = node.inputs
    cl, cr = consts(left), consts(right)
    op, name = node.op_type, node.name or ""
    if cl is None and cr is None:
        if op == "Add":
            return _op(node, [left, right], lambda a: rg.Add((a[0], a[1])), OpKind.COMBINE)
        if op == "Sub":
            return _op(node, [left, right], lambda a: rg.Sub(a[0], a[1]), OpKind.COMBINE)
        return None
    if cl is not None and cr is not None:
        return None
    data, c = (right, cl) if cl is not None else (left, cr)
    found = channel_constant(c, rank(data))
    if found is None:
        return None
    value, dim = found
    if op == "Mul":
        return _op(node, [data], lambda a: rg.Scale(a[0], value, name, dim), OpKind.AFFINE)
    if op == "Div":
        if cl is not None or bool(np.any(c == 0)):
            return None
        inv = _reciprocal(value)
        return _op(node, [data], lambda a: rg.Scale(a[0], inv, name, dim), OpKind.AFFINE)
    if op == "Add":
        return _op(node, [data], lambda a: rg.Shift(a[0], value, name, dim), OpKind.AFFINE)
    if cr is not None:  # Sub(x, c)
        neg = _negated(value)
        return _op(node, [data], lambda a: rg.Shift(a[0], neg, name, dim), OpKind.AFFINE)
    return _op(node, [data], lambda a: rg.Shift(rg.Neg(a[0]), value, name, dim),
               OpKind.AFFINE)


@produces(rg.Concat, rg.Add)
def _variadic(node: ir.Node, consts: Constants) -> LinearOp | None:
    values = list(node.inputs)
    if not values or any(v is None or consts(v) is not None for v in values):
        return None
    if node.op_type == "Concat":
        axis = node.attributes.get_int("axis", 0)
        n = rank(values[0]) or 4
        axis %= n
        if axis != 1 and not (n < 4 and axis == n - 1):  # channels first, or last (2-D, 3-D)
            return None
        return _op(node, values, lambda a: rg.Concat(tuple(a), axis), OpKind.COMBINE)
    if len(values) == 1:
        return _op(node, values, lambda a: a[0], OpKind.PASS)
    return _op(node, values, lambda a: rg.Add(tuple(a)), OpKind.COMBINE)


@produces(rg.Pad)
def _pad(node: ir.Node, consts: Constants) -> LinearOp | None:
    x = node.inputs[0]
    if x is None or consts(x) is not None or node.attributes.get_string("mode", "constant") \
            != "constant":
        return None
    pads = consts(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else None
    if pads is None:
        return None
    pads = [int(p) for p in pads.reshape(-1)]
    value_in = node.inputs[2] if len(node.inputs) > 2 else None
    value = consts(value_in) if value_in is not None else np.zeros(())
    if value is None or value.size != 1:
        return None
    axes_in = node.inputs[3] if len(node.inputs) > 3 else None
    axes = [int(a) % 4 for a in consts(axes_in).reshape(-1)] if axes_in is not None \
        and consts(axes_in) is not None else ([0, 1, 2, 3] if axes_in is None else None)
    if axes is None or len(pads) != 2 * len(axes):
        return None
    full = dict.fromkeys(range(4), (0, 0))
    for i, axis in enumerate(axes):
        full[axis] = (pads[i], pads[i + len(axes)])
    if full[0] != (0, 0) or full[1] != (0, 0) or min(full[2] + full[3]) < 0:
        return None
    padding = (full[2][0], full[2][1], full[3][0], full[3][1])
    fill, name = float(value.reshape(())), node.name or ""
    return _op(node, [x], lambda a: rg.Pad(a[0], padding, fill, name), OpKind.PAD)


@produces(rg.Crop)
def _slice(node: ir.Node, consts: Constants) -> LinearOp | None:
    x = node.inputs[0]
    if x is None or consts(x) is not None or x.shape is None or len(x.shape) != 4:
        return None
    args = [consts(v) if v is not None else None for v in node.inputs[1:5]]
    if any(a is None for a, v in zip(args, node.inputs[1:5]) if v is not None):
        return None
    starts, ends = (a.reshape(-1).tolist() for a in args[:2])
    axes = args[2].reshape(-1).tolist() if len(args) > 2 and args[2] is not None \
        else list(range(len(starts)))
    steps = args[3].reshape(-1).tolist() if len(args) > 3 and args[3] is not None \
        else [1] * len(starts)
    crop = [0, 0, 0, 0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis % 4]
        if not isinstance(size, int) or step != 1 or axis % 4 not in (2, 3):
            return None
        first, stop, _ = slice(int(start), int(end)).indices(size)
        if stop <= first:
            return None
        crop[2 * (axis % 4 - 2)], crop[2 * (axis % 4 - 2) + 1] = first, size - stop
    cut, name = tuple(crop), node.name or ""
    return _op(node, [x], lambda a: rg.Crop(a[0], cut, name), OpKind.CROP)


@produces()
def _passthrough(node: ir.Node, consts: Constants) -> LinearOp | None:
    x = node.inputs[0] if node.inputs else None
    if x is None or consts(x) is not None:
        return None
    if node.op_type == "Dropout":
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = consts(node.inputs[2])
            if mode is None or bool(mode.reshape(())):
                return None
    return _op(node, [x], lambda a: a[0], OpKind.PASS)


@produces(rg.Neg)
def _neg(node: ir.Node, consts: Constants) -> LinearOp | None:
    x = node.inputs[0] if node.inputs else None
    if x is None or consts(x) is not None:
        return None
    return _op(node, [x], lambda a: rg.Neg(a[0]), OpKind.AFFINE)


_RULES = {
    "Conv": _conv, "BatchNormalization": _batchnorm, "AveragePool": _avgpool,
    "Mul": _binary, "Div": _binary, "Add": _binary, "Sub": _binary,
    "Sum": _variadic, "Concat": _variadic, "Pad": _pad, "Slice": _slice,
    "Identity": _passthrough, "Dropout": _passthrough,
    "Neg": _neg,
    **LAYER_RULES,
}


def produced_types() -> set[type[rg.Node]]:
    """Node types the rule table can produce (the region input included)."""
    return produced(_RULES.values()) | {rg.Input}


def linear_op(node: ir.Node, consts: Constants) -> LinearOp | None:
    """The node as a ``LinearOp``, or ``None`` when it is not a linear op we can use."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _RULES:
        return None
    if any(o.dtype is not None and not o.dtype.is_floating_point() for o in node.outputs[:1]):
        return None
    return _RULES[node.op_type](node, consts)
