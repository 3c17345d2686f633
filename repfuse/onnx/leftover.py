"""Account for the normalizations a fused ONNX graph still holds: each one that no region
report covers is reported as left alone, with what is next to it, so that a report never
says "0 left alone" over a graph that still normalizes."""

from __future__ import annotations

import onnx_ir as ir

from repfuse.report import RegionReport, RegionStatus

NORMS = frozenset({"BatchNormalization"})
#: ops that join several values: a norm after one of them would have to move into the parts
JOINS = frozenset({"Concat", "Add", "Sum", "Sub"})


def _why(node: ir.Node) -> str:
    value = node.inputs[0]
    producer = value.producer() if value is not None else None
    readers = sorted({u.op_type for u in node.outputs[0].consumers()}) or ["the graph output"]
    if producer is not None and producer.op_type in JOINS and sum(
            v is not None and v.const_value is None for v in producer.inputs) > 1:
        return (f"it normalizes the output of {producer.op_type} '{producer.name}', which "
                f"joins {len(producer.inputs)} values, and feeds {', '.join(readers)}: the "
                "ONNX front end does not move a norm into the parts of a join (the torch "
                "front end does for a concat of convs)")
    before = producer.op_type if producer is not None else "a graph input"
    return (f"nothing linear next to it that it can fold into (after {before}, before "
            f"{', '.join(readers)})")


def leftover_norms(graph: ir.Graph, reports: list[RegionReport]) -> list[RegionReport]:
    """A left-alone report for each norm node of ``graph`` that no report names."""
    named = {s for r in reports for s in r.sources} | {r.path for r in reports}
    return [RegionReport(path=n.name or n.op_type, branches=["bn"], status=RegionStatus.SKIPPED,
                         reason=_why(n), sources=[n.name])
            for n in graph if n.op_type in NORMS and n.name not in named]
