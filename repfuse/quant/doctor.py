"""The quantization doctor: per weighted layer of the fused model, what INT8 does to it.

- weights: range, the channel holding the largest |w|, and SQNR per output channel with
  per-tensor and with per-channel scales, read back from onnxruntime's QDQ models;
- activations: the layer's output range over the calibration data;
- sensitivity: the model's output SQNR when only this layer is quantized;
- the training-form branches whose BN scale is an outlier of the layer (``bnscale``).
"""

from __future__ import annotations

import numpy as np
import onnx

from repfuse.onnx.runtime import ort_session
from repfuse.quant.bnscale import BranchScales, outliers
from repfuse.quant.evaluate import Scorer
from repfuse.quant.qdq import QdqQuantizer
from repfuse.quant.report import LayerReport
from repfuse.quant.weights import (
    WeightedNode,
    absmax_channel,
    channel_sqnr,
    dequantized_weights,
    initializer,
    summary,
    zeroed,
)


def activation_ranges(proto: onnx.ModelProto, nodes: list[WeightedNode], name: str,
                      data: np.ndarray, *, batch: int = 16) -> dict[str, tuple[float, float]]:
    """(min, max) of each node's output over ``data`` (the float model, unoptimized)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    by_name = {n.name: n for n in probe.graph.node}
    outputs = {o.name for o in probe.graph.output}
    wanted = {wn.name: by_name[wn.name].output[0] for wn in nodes}
    for value in wanted.values():
        if value not in outputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(
                value, onnx.TensorProto.FLOAT, None))
            outputs.add(value)
    sess = ort_session(probe)
    names = list(dict.fromkeys(wanted.values()))
    low = {v: np.inf for v in names}
    high = {v: -np.inf for v in names}
    for i in range(0, len(data), batch):
        for value, out in zip(names, sess.run(names, {name: data[i:i + batch]})):
            low[value] = min(low[value], float(np.min(out)))
            high[value] = max(high[value], float(np.max(out)))
    return {node: (low[v], high[v]) for node, v in wanted.items()}


def sensitivities(quantizer: QdqQuantizer, nodes: list[WeightedNode], scorer: Scorer, *,
                  per_channel: bool) -> dict[str, float]:
    """Output SQNR (dB) with only each node quantized."""
    return {wn.name: scorer.sqnr(quantizer.quantize(per_channel=per_channel, only=[wn.name]))
            for wn in nodes}


def _weight_figures(weight: np.ndarray, axis: int, deq: np.ndarray | None) -> tuple:
    """(median SQNR, worst SQNR, worst zeroed fraction) of the channels."""
    if deq is None:
        return float("nan"), float("nan"), float("nan")
    return (*summary(channel_sqnr(weight, deq, axis)), zeroed(weight, deq, axis))


def layer_reports(float_proto: onnx.ModelProto, nodes: list[WeightedNode],
                  modules: dict[str, str], per_tensor: onnx.ModelProto,
                  per_channel: onnx.ModelProto, ranges: dict[str, tuple[float, float]],
                  sensitivity: dict[str, float],
                  branch_scales: dict[str, list[BranchScales]]) -> list[LayerReport]:
    """One ``LayerReport`` per node, in graph order."""
    tensor_w = dequantized_weights(per_tensor, nodes)
    channel_w = dequantized_weights(per_channel, nodes)
    out = []
    for wn in nodes:
        weight = initializer(float_proto, wn.weight).astype(np.float64)
        t_med, t_min, t_zero = _weight_figures(weight, wn.axis, tensor_w.get(wn.name))
        c_med, c_min, c_zero = _weight_figures(weight, wn.axis, channel_w.get(wn.name))
        module = modules.get(wn.name, "")
        act = ranges.get(wn.name, (float("nan"), float("nan")))
        scales = branch_scales.get(module) or branch_scales.get(wn.name) or []
        out.append(LayerReport(
            node=wn.name, module=module, op=wn.op, weight_shape=list(weight.shape),
            weight_min=float(weight.min()), weight_max=float(weight.max()),
            weight_absmax_channel=absmax_channel(weight, wn.axis),
            weight_sqnr_tensor_median=t_med, weight_sqnr_tensor_min=t_min,
            weight_sqnr_channel_median=c_med, weight_sqnr_channel_min=c_min,
            weight_zeroed_tensor=t_zero, weight_zeroed_channel=c_zero,
            act_min=act[0], act_max=act[1], sensitivity=sensitivity.get(wn.name),
            outliers=outliers(module or wn.name, scales)))
    return out
