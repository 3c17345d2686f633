"""``fuse_onnx``: load an ONNX model safely, fuse its linear regions, prove the result.

Each region is proved before it is rewritten (``repfuse.proofs.prove_region``: the
fused kernel against the training-form expression in float64, with input and weight
gradients); a region whose proof fails is left as it is and reported as a defect of
repfuse. The whole model
is then checked with onnxruntime (graph optimizations disabled) on random inputs
against the original graph.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch

from repfuse.errors import VerificationError, first_line
from repfuse.heap import frozen_heap
from repfuse.onnx.clean import clean
from repfuse.onnx.io import load_onnx, op_counts
from repfuse.onnx.keep import kept_nodes, kept_patterns
from repfuse.onnx.leftover import leftover_norms
from repfuse.onnx.match import Constants
from repfuse.onnx.readers import copy_norms
from repfuse.onnx.regions import fuse_graph
from repfuse.onnx.runtime import verify_onnx_pair
from repfuse.onnx.shapes import infer_shapes
from repfuse.proofs.region import prove_region
from repfuse.region.patterns import kept_note
from repfuse.report import FuseReport
from repfuse.threads import conversion_threads

log = logging.getLogger(__name__)


@dataclass
class OnnxFuseResult:
    """``model``: the fused ``onnx.ModelProto``; ``report``: a ``FuseReport``."""

    model: onnx.ModelProto
    report: FuseReport


def count_parameters(proto: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers of the main graph."""
    total = 0
    for t in proto.graph.initializer:
        if onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f":
            total += int(np.prod(t.dims, dtype=np.int64))
    return total


def _infer_shapes(proto: onnx.ModelProto, data: bytes) -> onnx.ModelProto:
    return infer_shapes(proto, data)


def fuse_onnx_model(model, *, verify: bool = True, tol=None) -> OnnxFuseResult:
    """See ``repfuse.fuse_onnx``."""
    with conversion_threads(), frozen_heap():
        return _fuse(model, verify, tol)


def _fuse(model, verify: bool, tol) -> OnnxFuseResult:
    proto, source = load_onnx(model)
    source_data = proto.SerializeToString()     # serialized once: shapes, onnxruntime
    graph_ir = ir.from_proto(_infer_shapes(proto, source_data))
    check = (lambda expr, fused: prove_region(expr, fused, tol=tol)) if verify else None
    copied = copy_norms(graph_ir.graph)
    patterns = kept_patterns(graph_ir.graph, Constants())
    for p in patterns:
        log.debug("kept %s whole: %s", p.name, ", ".join(
            v.producer().name or v.producer().op_type for v in p.values))
    search: Counter = Counter()
    regions = fuse_graph(graph_ir, check=check, keep=frozenset(kept_nodes(patterns)),
                         search=search)
    regions += leftover_norms(graph_ir.graph, regions)
    clean(graph_ir)
    fused = ir.to_proto(graph_ir)
    del fused.graph.value_info[:]
    report = FuseReport(regions=regions, params_before=count_parameters(proto),
                        params_after=count_parameters(fused), ops_before=op_counts(proto),
                        ops_after=op_counts(fused), search=dict(search))
    split = f", {len(report.split)} fused in parts" if report.split else ""
    report.notes.append(f"{len(report.fused)} region(s) fused{split}, {len(report.skipped)} "
                        f"left as they are in {source}")
    if copied:
        report.notes.append(f"{copied} BatchNormalization(s) read by several layers copied "
                            "into each reader (each reader absorbs its copy)")
    if kept_note(patterns):
        report.notes.append(kept_note(patterns))
    report.note_defects()
    overridable = {i.name for i in proto.graph.input} & {t.name for t in proto.graph.initializer}
    if overridable:
        report.notes.append(
            f"{len(overridable)} initializer(s) are also graph inputs (overridable at run time), "
            "so nodes reading them were not fused; re-export with "
            "keep_initializers_as_inputs=False to fuse them")
    fused_data = fused.SerializeToString()
    try:
        onnx.checker.check_model(fused_data)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"{source}: the fused graph fails the ONNX checker "
                                f"({first_line(exc)}); nothing written") from None
    if verify:
        report.model_checks = verify_onnx_pair(proto, fused, tol=tol,
                                               threads=torch.get_num_threads(),
                                               serialized=(source_data, fused_data))
        report.verified = True
        if not report.ok:
            failures = [c for c in report.model_checks.failures] or [
                c for r in report.regions if r.proofs is not None for c in r.proofs.failures]
            worst = max(failures, key=lambda c: c.max_rel) if failures else None
            figures = (f"{worst.name}: max abs {worst.max_abs:.3g}, max rel "
                       f"{worst.max_rel:.3g}, rtol {worst.rtol:.3g}") if worst else "see report"
            raise VerificationError(f"{source}: the fused model disagrees with the original "
                                    f"({figures})", report=report)
    return OnnxFuseResult(fused, report)
