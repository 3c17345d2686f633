"""The layers INT8 quantizes with a weight, and what quantization does to each weight:
read back from the QDQ model onnxruntime wrote (``DequantizeLinear`` of the int8
initializer), compared with the float weight per output channel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class WeightedNode:
    """A node with a constant weight: ``axis`` is the weight's output-channel axis."""

    name: str
    op: str
    weight: str         # initializer name
    axis: int


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weighted_nodes(proto: onnx.ModelProto) -> list[WeightedNode]:
    """Conv / ConvTranspose / Gemm / MatMul nodes whose weight is an initializer, in graph
    order. Nodes without a name cannot be excluded from quantization and are skipped."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type not in WEIGHTED_OPS or not node.name or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in inits or len(inits[weight].dims) < 2:
            continue
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            axis = 0 if _attr(node, "transB", 0) else 1
        else:
            axis = len(inits[weight].dims) - 1
        out.append(WeightedNode(node.name, node.op_type, weight, axis))
    return out


def _dequantize(node: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    if node.input[0] not in inits:
        return None
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in inits else np.zeros_like(scale))
    if scale.ndim == 1 and q.ndim > 1:
        axis = _attr(node, "axis", 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def dequantized_weights(qdq: onnx.ModelProto, nodes: list[WeightedNode]) -> dict[str, np.ndarray]:
    """The weight each node of ``nodes`` computes with in ``qdq`` (dequantized), for the
    nodes whose weight onnxruntime quantized."""
    inits = {t.name: t for t in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    by_name = {n.name: n for n in qdq.graph.node}
    out = {}
    for wn in nodes:
        node = by_name.get(wn.name)
        if node is None or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            value = _dequantize(dq, inits)
            if value is not None:
                out[wn.name] = value
    return out


def channel_sqnr(weight: np.ndarray, quantized: np.ndarray, axis: int) -> np.ndarray:
    """SQNR (dB) of each output channel; NaN for a channel whose weights are all zero."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0).reshape(weight.shape[axis], -1)
    wq = np.moveaxis(np.asarray(quantized, dtype=np.float64), axis, 0).reshape(w.shape)
    signal = np.sum(w ** 2, axis=1)
    noise = np.sum((w - wq) ** 2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(signal / noise)
    db[noise == 0] = math.inf
    db[signal == 0] = math.nan
    return db


def zeroed(weight: np.ndarray, quantized: np.ndarray, axis: int) -> float:
    """The largest fraction, over output channels, of non-zero weights that quantize to
    zero: a channel whose scale is set by one huge weight loses all the others (its SQNR,
    dominated by that weight's energy, can still look fine)."""
    w = np.moveaxis(np.asarray(weight), axis, 0).reshape(weight.shape[axis], -1)
    wq = np.moveaxis(np.asarray(quantized), axis, 0).reshape(w.shape)
    nonzero = (w != 0).sum(axis=1)
    lost = ((w != 0) & (wq == 0)).sum(axis=1)
    fractions = lost[nonzero > 0] / nonzero[nonzero > 0]
    return float(fractions.max()) if fractions.size else 0.0


def summary(values: np.ndarray) -> tuple[float, float]:
    """(median, min) of the channels' SQNRs, ignoring all-zero channels."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(np.median(finite)), float(np.min(finite))


def absmax_channel(weight: np.ndarray, axis: int) -> int:
    """The output channel holding the largest ``|weight|`` (it sets a per-tensor scale)."""
    w = np.moveaxis(np.abs(weight), axis, 0).reshape(weight.shape[axis], -1)
    return int(np.argmax(w.max(axis=1)))


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    t = next(t for t in proto.graph.initializer if t.name == name)
    return numpy_helper.to_array(t)
