"""Which torch module each weighted ONNX node came from, so that the doctor speaks of
``stage1.1.reparam_conv``, not of ``node_conv2d_2``.

Three kinds of evidence, strongest first: the node's weight equals the module's weight
bit for bit (independent of the exporter); the module scope torch's exporter records in
the node's metadata (``pkg.torch.onnx.name_scopes``; repfuse's ONNX rewrite gives fused
Convs the scope of what they replaced); the initializer's name (``<module>.weight``).
"""

from __future__ import annotations

import ast
import hashlib

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from repfuse.quant.weights import WeightedNode

SCOPES = "pkg.torch.onnx.name_scopes"


def scope_of(node: onnx.NodeProto) -> str:
    """The innermost module scope recorded for ``node`` ("" when there is none)."""
    for prop in node.metadata_props:
        if prop.key != SCOPES:
            continue
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            return ""
        if isinstance(scopes, list) and len(scopes) >= 2:
            return str(scopes[-2])
    return ""


def _digest(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array.shape, hashlib.sha1(array.tobytes()).hexdigest()


def _module_weights(model: torch.nn.Module) -> dict[tuple, list[str]]:
    """Digest of each module's weight (and of its transpose, for MatMul) -> module paths."""
    out: dict[tuple, list[str]] = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        w = weight.detach().to("cpu", torch.float32).contiguous().numpy()
        out.setdefault(_digest(w), []).append(path)
        if w.ndim == 2:
            out.setdefault(_digest(w.T), []).append(path)
    return out


def module_paths(proto: onnx.ModelProto, nodes: list[WeightedNode],
                 model: torch.nn.Module | None = None) -> dict[str, str]:
    """Node name -> torch module path, for the nodes it can be told (others are absent).
    With ``model`` (the torch module that was exported) a path must name one of its
    modules; the weights decide between candidates."""
    by_name = {n.name: n for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    modules = dict(model.named_modules()) if model is not None else None
    digests = _module_weights(model) if model is not None else {}
    out = {}
    for wn in nodes:
        from_name = wn.weight[:-len(".weight")] if wn.weight.endswith(".weight") else ""
        named = [p for p in (scope_of(by_name[wn.name]), from_name)
                 if p and (modules is None or p in modules)]
        matches = digests.get(_digest(numpy_helper.to_array(inits[wn.weight])), []) \
            if digests else []
        if len(matches) == 1:
            out[wn.name] = matches[0]
        elif matches:
            agreed = [p for p in named if p in matches]
            if agreed:
                out[wn.name] = agreed[0]
        elif named:
            out[wn.name] = named[0]
    return out
