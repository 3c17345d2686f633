"""The doctor's look at the training form: BatchNorm scales ``|gamma| / sqrt(var + eps)``
of the branches each fused layer was folded from.

A channel whose scale is far above the layer's median (a dead channel's identity BN:
its running variance collapses, so 1 / sqrt(var + eps) approaches 1 / sqrt(eps) ~ 316)
becomes a huge weight in the fused kernel, and a per-tensor INT8 scale sized for it
rounds every other channel's weights to a few levels. Such channels are named with the
branch they come from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from repfuse.quant.mapping import scope_of
from repfuse.quant.report import BranchOutlier

#: A BN scale more than this many times the median of its fused layer is an outlier.
OUTLIER_FACTOR = 50.0


@dataclass
class BranchScales:
    branch: str
    scales: np.ndarray


def _scales(weight, var, eps: float) -> np.ndarray:
    var = np.asarray(var, dtype=np.float64)
    gamma = np.ones_like(var) if weight is None else np.asarray(weight, dtype=np.float64)
    return np.abs(gamma) / np.sqrt(var + eps)


def torch_branch_scales(model: torch.nn.Module, names: list[str]) -> list[BranchScales]:
    """The scales of the BatchNorm modules among ``names`` (module paths of ``model``)."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        bn = modules.get(name)
        if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        weight = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else None
        out.append(BranchScales(name, _scales(weight, bn.running_var.detach().double().cpu(),
                                              bn.eps)))
    return out


def onnx_branch_scales(proto: onnx.ModelProto, names: list[str]) -> list[BranchScales]:
    """The scales of the BatchNormalization nodes among ``names`` (node names of
    ``proto``), each named by its module scope when the exporter recorded one."""
    inits = {t.name: t for t in proto.graph.initializer}
    wanted = set(names)
    out = []
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization" or node.name not in wanted:
            continue
        if not all(i in inits for i in (node.input[1], node.input[4])):
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        out.append(BranchScales(scope_of(node) or node.name,
                                _scales(numpy_helper.to_array(inits[node.input[1]]),
                                        numpy_helper.to_array(inits[node.input[4]]), eps)))
    return out


def outliers(layer: str, branches: list[BranchScales],
             factor: float = OUTLIER_FACTOR) -> list[BranchOutlier]:
    """Channels whose scale exceeds ``factor`` times the median of every scale of the
    layer's branches, largest first."""
    if not branches:
        return []
    every = np.concatenate([b.scales for b in branches])
    positive = every[every > 0]
    if positive.size == 0:
        return []
    median = float(np.median(positive))
    found = [BranchOutlier(layer, b.branch, int(c), float(b.scales[c]), median)
             for b in branches for c in np.flatnonzero(b.scales > factor * median)]
    return sorted(found, key=lambda o: -o.scale)
