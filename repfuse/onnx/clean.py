"""Leave nothing in a fused graph that a graph cleaner (onnxslim, onnxsim) would remove.

After the regions are rewritten, onnx_ir's passes lift Constant nodes into initializers
and remove Identity nodes (exporters copy shared parameters through them); Conv biases
that are all zero are dropped (adding zero changes nothing); initializers with equal
contents are merged, and nodes, initializers and opset imports that nothing uses are
removed. Graph inputs and outputs keep their names, and an
initializer that is also a graph input (overridable at run time) is never touched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

_UNWRAP = ir.passes.Sequential(
    common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
    common.IdentityEliminationPass(),
)
_PRUNE = ir.passes.Sequential(
    common.DeduplicateInitializersPass(),
    common.RemoveUnusedNodesPass(),
    common.RemoveUnusedOpsetsPass(),
)


def drop_zero_biases(graph: ir.Graph) -> int:
    """Remove the bias input of every Conv whose bias is an all-zero initializer."""
    dropped = 0
    for node in graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if bias is None or bias.is_graph_input() or bias.const_value is None:
            continue
        if not np.any(bias.const_value.numpy()):
            node.resize_inputs(2)
            dropped += 1
    return dropped


def _mend_identity_shapes(graph: ir.Graph) -> None:
    """An Identity copies its input: where the output's declared shape has another rank
    (a graph output declared with the wrong rank, which onnxruntime merges leniently), the
    input's shape is the right one, and the elimination pass would refuse the mismatch."""
    for node in graph:
        if node.op_type != "Identity" or not node.inputs or node.inputs[0] is None:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if src.shape is not None and dst.shape is not None and len(src.shape) != len(dst.shape):
            dst.shape = src.shape


def clean(model: ir.Model) -> None:
    """Clean ``model`` in place (see the module docstring)."""
    _mend_identity_shapes(model.graph)
    _UNWRAP(model)
    drop_zero_biases(model.graph)
    _PRUNE(model)
