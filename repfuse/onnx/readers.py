"""A BatchNormalization whose output several layers read, copied into each of them (the
ONNX form of ``repfuse.fx.readers``).

What is matched: an inference-mode ``BatchNormalization`` (constant scale, bias, mean and
variance; its extra outputs unused) whose output reaches layers only through nodes that
keep its channels apart and commute with a per-channel affine map:

* ``Transpose``, ``Identity``, inference ``Dropout``, and ``Reshape`` / ``Flatten`` that
  keep the channel axis whole (the sizes before it multiply to the same number; static
  shapes);
* ``AveragePool`` on channel axis 1 whose every output is a mean of inputs: no padding
  counted in the mean (no pads, or ``count_include_pad=0``), no partial window from
  ``ceil_mode``, no dilation;
* further such ``BatchNormalization`` nodes on channel axis 1;

and every layer it reaches (a *reader*) absorbs a per-channel affine map on its input
exactly: ``MatMul`` by a constant matrix or ``Gemm`` (``transA=0``, constant ``B``) reading
the channels on the last axis, or ``Conv`` with a constant weight reading them on axis 1
without padding. The values between are read by nothing else (``Shape`` aside) and are no
graph outputs.
What must hold besides: the norm does not fold into the layer computing its input (a
``Conv``, ``MatMul`` or ``Gemm`` whose output only it reads), and it is not read directly
by one layer alone (a region folds that as it is).
What it becomes: the nodes between run on the norm's input (the norms go; the pools and
layout nodes stay, computed once), and each reader reads its own copy of the norms on its
path: ``Mul`` by their composed scale and ``Add`` of their composed shift (computed in
float64 from the norms' initializers, named after the norms), along the reader's channel
axis, so no transpose separates the copy from the reader and each reader and its copy
form a region that folds into one layer (a transpose pair around a
``BatchNormalization`` copy would start that region at the shared layout node, which the
region search does not cut past). When a layer reached does not absorb its copy,
nothing changes (``onnx.leftover`` reports the norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from repfuse.onnx.attrs import explicit_pads, ints
from repfuse.onnx.match import Constants
from repfuse.onnx.rewrite import initializer, unique_name

__all__ = ["copy_norms"]

_STANDARD = ("", "ai.onnx")
_LAYERS = frozenset({"Conv", "MatMul", "Gemm"})


@dataclass(eq=False)
class _Leaf:
    reader: ir.Node
    value: ir.Value
    axis: int
    norms: tuple[ir.Node, ...]


@dataclass(eq=False)
class _Cone:
    norm: ir.Node
    between: list[ir.Node] = field(default_factory=list)
    norms: list[ir.Node] = field(default_factory=list)
    leaves: list[_Leaf] = field(default_factory=list)


def _static(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


def _norm(node: ir.Node, consts: Constants) -> bool:
    """An inference-mode BatchNormalization on constants, its extra outputs unused."""
    if node.op_type != "BatchNormalization" or node.domain not in _STANDARD \
            or len(node.inputs) != 5 or node.inputs[0] is None:
        return False
    params = [consts(v) for v in node.inputs[1:]]
    return not node.attributes.get_int("training_mode", 0) and all(
        p is not None and p.dtype.kind == "f" for p in params) and not any(
        o.uses() or o.is_graph_output() for o in node.outputs[1:])


def _moved_axis(node: ir.Node, axis: int, consts: Constants) -> int | None:
    """The channel axis of the output of a layout node that keeps the channels whole."""
    before, after = _static(node.inputs[0]), _static(node.outputs[0])
    if before is None or after is None or node.domain not in _STANDARD:
        return None
    channels, new = before[axis], None
    if node.op_type in ("Identity", "Dropout") and before == after and not any(
            o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        new = axis
    elif node.op_type == "Transpose":
        perm = ints(node, "perm", list(range(len(before)))[::-1])
        new = perm.index(axis) if axis in perm else None
    elif node.op_type in ("Reshape", "Flatten"):
        lead = math.prod(before[:axis])
        new = next((j for j in range(len(after))
                    if math.prod(after[:j]) == lead and after[j] == channels), None)
    return new if new is not None and after[new] == channels else None


def _pool_axis(node: ir.Node, axis: int) -> int | None:
    """1 when ``node`` is an AveragePool whose every output is a mean of inputs."""
    before, after = _static(node.inputs[0]), _static(node.outputs[0])
    if node.op_type != "AveragePool" or node.domain not in _STANDARD or axis != 1 \
            or before is None or after is None:
        return None
    kernel = ints(node, "kernel_shape", [])
    n = len(kernel)
    strides = ints(node, "strides", [1] * n)
    if n == 0 or len(before) != n + 2 or ints(node, "dilations", [1] * n) != [1] * n:
        return None
    pads = explicit_pads(node, kernel, [1] * n, strides)
    if pads is None or (any(pads) and node.attributes.get_int("count_include_pad", 0)):
        return None
    floor = tuple((before[2 + i] + pads[i] + pads[n + i] - kernel[i]) // strides[i] + 1
                  for i in range(n))
    return 1 if floor == after[2:] else None


def _reader(node: ir.Node, value: ir.Value, axis: int, consts: Constants) -> bool:
    shape = _static(value)
    if node.op_type not in _LAYERS or node.domain not in _STANDARD or shape is None \
            or len(node.inputs) < 2 or node.inputs[0] is not value \
            or any(v is value for v in node.inputs[1:]):
        return False
    weight = consts(node.inputs[1])
    if weight is None or weight.dtype.kind != "f" or any(
            v is not None and consts(v) is None for v in node.inputs[2:]):
        return False
    last = len(shape) - 1
    if node.op_type == "MatMul":
        return weight.ndim == 2 and axis == last
    if node.op_type == "Gemm":
        return len(shape) == 2 and axis == 1 and not node.attributes.get_int("transA", 0)
    k = list(weight.shape[2:])
    pads = explicit_pads(node, k, ints(node, "dilations", [1] * len(k)),
                         ints(node, "strides", [1] * len(k)))
    return axis == 1 and len(shape) == weight.ndim and pads is not None and not any(pads)


def _walk(value: ir.Value, axis: int, norms: tuple, consts: Constants, cone: _Cone) -> bool:
    if value.is_graph_output():
        return False
    for user in value.consumers():
        if user.op_type == "Shape" and user.domain in _STANDARD:
            continue
        if user.inputs[0] is not value or any(v is value for v in user.inputs[1:]):
            return False
        if _reader(user, value, axis, consts):
            cone.leaves.append(_Leaf(user, value, axis, norms))
            continue
        if _norm(user, consts):
            if axis != 1:
                return False
            cone.between.append(user)
            cone.norms.append(user)
            if not _walk(user.outputs[0], 1, norms + (user,), consts, cone):
                return False
            continue
        new = _moved_axis(user, axis, consts)
        new = _pool_axis(user, axis) if new is None else new
        if new is None:
            return False
        cone.between.append(user)
        if not _walk(user.outputs[0], new, norms, consts, cone):
            return False
    return True


def _folds_back(norm: ir.Node) -> bool:
    inp = norm.inputs[0]
    producer = inp.producer()
    return producer is not None and producer.op_type in _LAYERS and all(
        u is norm for u in inp.consumers()) and not inp.is_graph_output()


def _cone(node: ir.Node, consts: Constants) -> _Cone | None:
    if not _norm(node, consts) or _folds_back(node) or _static(node.inputs[0]) is None:
        return None
    cone = _Cone(node)
    if not _walk(node.outputs[0], 1, (node,), consts, cone) or not cone.leaves:
        return None
    if not cone.between and len(cone.leaves) == 1:
        return None
    return cone


def _affine(norms: tuple[ir.Node, ...], consts: Constants) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of the norms applied in turn, in float64."""
    scale, shift = 1.0, 0.0
    for norm in norms:
        gamma, beta, mean, var = (consts(v).astype(np.float64).reshape(-1)
                                  for v in norm.inputs[1:5])
        s = gamma / np.sqrt(var + norm.attributes.get_float("epsilon", 1e-5))
        scale, shift = scale * s, shift * s + (beta - mean * s)
    return np.asarray(scale), np.asarray(shift)


def _copies(graph: ir.Graph, leaf: _Leaf, value: ir.Value, consts: Constants) -> list[ir.Node]:
    """``value * scale + shift`` along the reader's channel axis (``Mul``, ``Add``)."""
    scale, shift = _affine(leaf.norms, consts)
    rank = len(_static(value))
    shape = (-1,) + (1,) * (rank - 1 - leaf.axis)
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    names = "+".join(n.name or "bn" for n in leaf.norms)
    base = f"{names}.copy_for_{leaf.reader.name or leaf.reader.op_type}"
    s = initializer(graph, scale.reshape(shape).astype(dtype), unique_name(graph, f"{base}.scale"))
    t = initializer(graph, shift.reshape(shape).astype(dtype), unique_name(graph, f"{base}.shift"))
    mul = ir.node("Mul", [value, s], name=unique_name(graph, f"{base}.mul"))
    add = ir.node("Add", [mul.outputs[0], t], name=unique_name(graph, f"{base}.add"))
    for node in (mul, add):
        node.outputs[0].shape = ir.Shape(list(_static(value)))
        node.outputs[0].type = value.type
    return [mul, add]


def _rewrite(graph: ir.Graph, cone: _Cone, consts: Constants) -> None:
    norms = [cone.norm, *cone.norms]
    raw = {n.outputs[0]: n.inputs[0] for n in norms}
    for leaf in cone.leaves:
        value = leaf.value
        while value in raw:
            value = raw[value]
        new = _copies(graph, leaf, value, consts)
        graph.insert_before(leaf.reader, new)
        leaf.reader.replace_input_with(0, new[-1].outputs[0])
    for norm in reversed(norms):
        norm.outputs[0].replace_all_uses_with(norm.inputs[0])
        graph.remove(norm, safe=True)


def copy_norms(graph: ir.Graph, consts: Constants | None = None) -> int:
    """Rewrite every match in ``graph`` (see the module docstring); returns how many norms
    were copied into their readers."""
    consts = consts or Constants()
    done = 0
    for node in list(graph):
        if node.graph is not graph:     # removed as part of an earlier cone
            continue
        cone = _cone(node, consts)
        if cone is not None:
            _rewrite(graph, cone, consts)
            done += 1
    return done
