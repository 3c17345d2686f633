"""Partial quantization: which layers stay in float.

``auto``: greedy by sensitivity. Starting from every layer quantized, the most sensitive
layer still quantized (lowest output SQNR when quantized alone) is kept in float, one at a
time, until the model's output SQNR reaches the target. ``none``: every layer quantized.
Or the layers the user names (torch module paths or ONNX node names).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import onnx

from repfuse.errors import InputError
from repfuse.quant.evaluate import Scorer
from repfuse.quant.qdq import QdqQuantizer
from repfuse.quant.report import LayerReport


@dataclass
class Choice:
    """The layers kept in float (node names), the model and its output SQNR (on the
    scorer's data); ``trace``: (layers kept, SQNR) after each step of ``auto``."""

    kept: list[str]
    model: onnx.ModelProto
    sqnr: float
    trace: list[tuple[int, float]] = field(default_factory=list)


def resolve(names, layers: list[LayerReport]) -> list[str]:
    """Node names of the layers the user names by module path or node name."""
    known = {layer.module: layer.node for layer in layers if layer.module}
    known.update({layer.node: layer.node for layer in layers})
    out = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(f"keep_float: no quantized layer named {name!r}{hint}; name "
                             "layers by their module path or ONNX node name")
        out.append(known[name])
    return list(dict.fromkeys(out))


def greedy(quantizer: QdqQuantizer, layers: list[LayerReport], scorer: Scorer, *,
           per_channel: bool, target: float, start: tuple[onnx.ModelProto, float]) -> Choice:
    """Keep layers in float, most sensitive first, until the output SQNR reaches
    ``target`` (``start``: the all-INT8 model and its SQNR)."""
    order = sorted(layers, key=lambda r: r.sensitivity if r.sensitivity is not None
                   else math.inf)
    model, value = start
    kept: list[str] = []
    trace = [(0, value)]
    for layer in order:
        if value >= target:
            break
        kept.append(layer.node)
        model = quantizer.quantize(per_channel=per_channel, exclude=kept)
        value = scorer.sqnr(model)
        trace.append((len(kept), value))
    return Choice(kept, model, value, trace)
