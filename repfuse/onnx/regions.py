"""ONNX front end (onnx_ir): find linear regions, reduce each, rewrite it as one Conv.

A *region* is the set of linear nodes (see ``onnx.match``) that a value depends on,
back to exactly one non-constant input value (a value that itself joins several inputs,
such as a residual Add, is such an input for the nodes after it). Candidates are taken
from the graph's end backwards, so each region is as large as possible; a candidate is
used whole only when it reduces exactly and no value computed inside it is needed
outside (by another node or as a graph output; CastLike reading only its type does not
count), otherwise it is cut at a dominator (``suffix_cuts``) or left alone, and
reported. ``region.reduce`` turns the region's
expression into one ``AffineConv``, which is written back as one ``Conv`` node with new
initializers (ONNX pads may be asymmetric).
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir
import torch

from repfuse import region as rg
from repfuse.errors import NotFusable
from repfuse.onnx.match import Constants, linear_op
from repfuse.onnx.rewrite import (
    replace_with_conv,
    shape_only_use,
    transposed_pads,
    type_only_use,
    weighted_node,
)
from repfuse.region.op import LinearOp, OpKind, is_region_value
from repfuse.region.worth import check_growth, worth_fusing
from repfuse.report import RegionReport, RegionStatus, VerifyReport, proof_failed_reason

log = logging.getLogger(__name__)

#: ``check(expr, fused) -> VerifyReport``: a per-region proof run before rewriting.
RegionCheck = Callable[[rg.Node, object], VerifyReport]


@dataclass
class Candidate:
    """Linear nodes ending at ``sink`` and reading one non-constant ``input`` value."""

    sink: ir.Node
    nodes: list[ir.Node]
    input: ir.Value
    reason: str = ""
    node_set: set = field(default_factory=set)

    @property
    def output(self) -> ir.Value:
        return self.sink.outputs[0]

    @property
    def label(self) -> str:
        """The sink node's name, prefixed by the torch module that holds the whole
        region when the exporter recorded module scopes."""
        name = self.sink.name or self.output.name or self.sink.op_type
        module = _common_scope(self.nodes)
        return f"{module} ({name})" if module else name


_SCOPES = "pkg.torch.onnx.name_scopes"


def _scopes(node: ir.Node) -> list[str] | None:
    text = node.metadata_props.get(_SCOPES)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [str(s) for s in scopes[:-1]] if isinstance(scopes, list) else None


def _common_scope(nodes: list[ir.Node]) -> str:
    """The innermost module scope shared by every node (torch.export-based exports)."""
    return next((s for s in reversed(_common_scopes(nodes)) if s), "")


def _common_scopes(nodes: list[ir.Node]) -> list[str]:
    """The module scopes (outermost first) shared by every node that records scopes."""
    common: list[str] | None = None
    for node in nodes:
        scopes = _scopes(node)
        if scopes is None:
            continue
        if common is None:
            common = scopes
        else:
            n = 0
            while n < min(len(common), len(scopes)) and common[n] == scopes[n]:
                n += 1
            common = common[:n]
    return common or []


def linear_ops(graph: ir.Graph) -> dict[ir.Node, LinearOp]:
    """Every linear node of ``graph`` (not of its subgraphs)."""
    consts = Constants()
    ops = {}
    for node in graph:
        op = linear_op(node, consts)
        if op is not None:
            ops[node] = op
    return ops


def _worth_fusing(nodes: list[ir.Node], ops: dict[ir.Node, LinearOp]) -> bool:
    return worth_fusing(ops[n].kind for n in nodes)


def find_candidates(graph: ir.Graph, ops: dict[ir.Node, LinearOp]) -> list[Candidate]:
    """Single-input candidates worth fusing, last node first (largest regions first).

    A node's cone is itself and the cones of its linear inputs, except that a value
    whose own cone reads several inputs (a residual Add of two branches, say) is a
    boundary: the linear nodes after it (the next block's Conv -> BN) still form a
    region that reads it."""
    cones: dict[ir.Node, tuple[set, set]] = {}
    order = list(graph)
    for node in order:
        if node not in ops:
            continue
        members, leaves = {node}, set()
        for value in ops[node].inputs:
            producer = value.producer()
            if producer in cones and len(cones[producer][1]) == 1:
                members |= cones[producer][0]
                leaves |= cones[producer][1]
            else:   # a non-linear value, or one joining several inputs (a residual Add)
                leaves.add(value)
        cones[node] = (members, leaves)
    position = {n: i for i, n in enumerate(order)}
    out = []
    for node in reversed(order):
        if node not in cones:
            continue
        members, leaves = cones[node]
        if len(leaves) != 1:
            continue
        nodes = sorted(members, key=position.__getitem__)
        if not _worth_fusing(nodes, ops):
            continue
        cand = Candidate(node, nodes, next(iter(leaves)), node_set=members)
        cand.reason = _escape(cand)
        out.append(cand)
    return out


def suffix_cuts(cand: Candidate, ops: dict[ir.Node, LinearOp]) -> list[Candidate]:
    """The parts of ``cand`` after a cut, largest first: for each interior value that
    every path from the region's input to its output passes through (a dominator), the
    nodes between that value and the output, reading only that value. (The part before
    a cut is a candidate of its own: the cone of the value's producer.)"""
    out = []
    for node in cand.nodes:
        if node is cand.sink:
            continue
        cut = node.outputs[0]
        members: set = set()
        stack, reaches_input = [cand.sink], False
        while stack and not reaches_input:
            n = stack.pop()
            if n in members:
                continue
            members.add(n)
            for value in ops[n].inputs:
                if value is cut:
                    continue
                producer = value.producer()
                if producer in cand.node_set:
                    stack.append(producer)
                else:               # the region's input, reached around the cut
                    reaches_input = True
                    break
        if reaches_input or not _worth_fusing(list(members), ops):
            continue
        part = Candidate(cand.sink, [n for n in cand.nodes if n in members], cut,
                         node_set=members)
        part.reason = _escape(part)
        out.append(part)
    return sorted(out, key=lambda c: -len(c.nodes))


def _escape(cand: Candidate) -> str:
    """Why the candidate cannot be replaced (a value used outside it), or ''."""
    for node in cand.nodes:
        outputs = node.outputs if node is not cand.sink else node.outputs[1:]
        for value in outputs:
            if value.is_graph_output():
                return f"intermediate value '{value.name}' is a graph output"
            for user in value.consumers():
                if user not in cand.node_set and not type_only_use(user, value) \
                        and not shape_only_use(user, cand.node_set):
                    return (f"intermediate value '{value.name}' is also used by node "
                            f"'{user.name or user.op_type}' ({user.op_type}) outside the region")
    return ""


def _channels(value: ir.Value, cand: Candidate, ops: dict[ir.Node, LinearOp]) -> int | None:
    shape = value.shape
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int):
        return int(shape[1])
    for user in value.consumers():
        if user in cand.node_set and ops[user].kind is OpKind.CONV:
            conv = ops[user].build([rg.Input(1)])
            if isinstance(conv, (rg.Conv, rg.ConvTranspose)):
                return conv.spec.in_channels
        if user in cand.node_set and ops[user].kind is OpKind.NORM:
            return int(user.inputs[1].shape[0]) if user.inputs[1].shape is not None else None
    return None


def build_expression(cand: Candidate, ops: dict[ir.Node, LinearOp]) -> rg.Node:
    """The region expression of ``cand`` (shared sub-expressions stay shared), on an
    ``Input`` in the layout its nodes read (``region.with_input``)."""
    shape = cand.input.shape
    has_conv = any(ops[n].kind is OpKind.CONV for n in cand.nodes)
    if (shape is not None and not is_region_value(list(shape), torch.float32)) \
            or (shape is None and not has_conv):
        rank = "unknown" if shape is None else len(shape)
        raise NotFusable(f"the region input '{cand.input.name}' has rank {rank}; only 2-D to "
                         "4-D values ((N, C), tokens, sequences, images) are fused")
    dims = [d if isinstance(d, int) else -1 for d in shape] if shape is not None \
        else [-1, -1, -1, -1]
    if len(dims) == 4 and dims[1] < 1:
        dims[1] = _channels(cand.input, cand, ops) or -1

    def build(x: rg.Node) -> rg.Node:
        exprs: dict[ir.Value, rg.Node] = {cand.input: x}
        for node in cand.nodes:
            op = ops[node]
            exprs[node.outputs[0]] = op.build([exprs[v] for v in op.inputs])
        return exprs[cand.output]
    return rg.with_input(dims, build)


def _region_report(cand: Candidate, expr: rg.Node | None, status: RegionStatus, reason: str = "",
                   fused=None, proofs: VerifyReport | None = None) -> RegionReport:
    branches = rg.describe(expr) if expr is not None else sorted(
        {n.op_type for n in cand.nodes})
    report = RegionReport(path=cand.label, branches=branches, status=status, reason=reason,
                          proofs=proofs)
    if expr is not None:
        report.params_before = rg.count_params(expr)
        report.sources = rg.sources(expr)
    else:   # the nodes it holds, so that nothing else reports them again
        report.sources = [n.name for n in cand.nodes if n.name]
    if fused is not None:
        report.result = fused.describe()
        report.params_after = fused.weight.numel() + (
            fused.bias.numel() if fused.bias is not None else 0)
        report.cast_error = float(fused.cast_error())
        if proofs is not None and proofs.checks:
            report.max_abs_err = max(c.max_abs for c in proofs.checks)
            report.max_rel_err = max(c.max_rel for c in proofs.checks)
    return report


def fuse_graph(model: ir.Graph, *, check: RegionCheck | None = None,
               keep: frozenset = frozenset(),
               search: Counter | None = None) -> list[RegionReport]:
    """Fuse every linear region of ``model.graph`` in place; returns one report per region
    found (fused, skipped with the reason, or split: refused as a whole while parts of it
    are fused, each reported as a region of its own).

    A refused region is cut: the largest part after an interior dominator that reduces
    (``suffix_cuts``, grown from the output: ``_fusable_suffix``) is fused, and the part
    before it is a candidate of its own. Each part is tried once (``region.Attempts``:
    shapes first; ``search`` counts the candidates, the parts tried and the parts
    reduced). Passes
    repeat until one fuses nothing; in a later pass the Convs written by the earlier
    ones are not linear ops, so a region is also cut after a part that did fuse (a
    1x1+BN whose bias a padded depthwise conv must not see, say) and the rest, which
    reads that part's output, becomes a region of its own. Nodes in ``keep`` (the
    runtime-fused patterns, ``onnx.keep``) are never part of a region."""
    graph = model.graph
    attempt = rg.Attempts(lambda expr, _shapes: (expr, _reduce_expr(expr)), search)
    claimed: set = set()
    written: set = set()
    reports: list[RegionReport] = []
    skipped: list[tuple[set, RegionReport]] = []
    progress = True
    while progress:
        progress = False
        ops = {n: op for n, op in linear_ops(graph).items()
               if n not in written and n not in keep}
        for cand in find_candidates(graph, ops):
            if cand.node_set & claimed:
                continue
            attempt.counts["regions"] += frozenset(cand.node_set) not in attempt.outcomes
            whole = None        # the refused region's report when ``cand`` is a part of it
            try:
                if cand.reason:     # a value inside is needed outside
                    raise NotFusable(cand.reason)
                expr, fused = _reduce(cand, ops, attempt)
            except NotFusable as err:
                whole = _region_report(cand, None, RegionStatus.SPLIT, str(err))
                _note_skip(skipped, cand, whole, written)
                part = _fusable_suffix(cand, ops, claimed, attempt)
                if part is None:
                    continue
                cand, expr, fused = part
            proofs = check(expr, fused) if check is not None else None
            if proofs is not None and not proofs.ok:
                reason = proof_failed_reason(proofs)
                log.warning("region %s: %s", cand.label, reason)
                if whole is not None:
                    whole.reason += f"; the part after '{cand.input.name}': {reason}"
                    whole.proofs = proofs
                else:
                    rep = _region_report(cand, expr, RegionStatus.SKIPPED, reason, fused,
                                         proofs)
                    _note_skip(skipped, cand, rep, written)
                continue
            if whole is not None:
                whole.reason += f"; cut at '{cand.input.name}'"
            layer = replace_with_conv(graph, cand.nodes, cand.input, cand.output, fused)
            conv = weighted_node(layer)
            scopes = _common_scopes(cand.nodes)
            for node in layer if scopes else ():  # they keep the module scope it had
                node.metadata_props[_SCOPES] = repr([*scopes, node.name])
            written |= set(layer)
            claimed |= cand.node_set
            reports.append(_region_report(cand, expr, RegionStatus.FUSED, "", fused, proofs))
            reports[-1].node = conv.name
            progress = True
    for members, rep in skipped:
        if rep.status is RegionStatus.SPLIT and not members & claimed:
            rep.status = RegionStatus.SKIPPED      # no part of it fused: left alone
        if rep.status is RegionStatus.SKIPPED and not members - claimed:
            continue                    # a candidate whose nodes all went elsewhere
        reports.append(rep)
    return reports


def _reduce_expr(expr: rg.Node):
    """The fused ``AffineConv`` of a region expression; raises ``NotFusable``."""
    with torch.no_grad():
        fused = rg.reduce(expr)
    check_growth(expr, fused)
    if fused.spec.transposed:
        transposed_pads(fused.spec)     # a ConvTranspose ONNX Runtime runs
    return fused


def _reduce(cand: Candidate, ops: dict[ir.Node, LinearOp], attempt: rg.Attempts):
    """(expression, fused AffineConv) of ``cand``, tried once; raises NotFusable."""
    outcome = attempt(frozenset(cand.node_set), build_expression(cand, ops))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _fusable_suffix(cand: Candidate, ops: dict[ir.Node, LinearOp], claimed: set,
                    attempt: rg.Attempts):
    """(part, expression, fused) for the largest part of a refused ``cand`` after a cut
    (``suffix_cuts``) that reduces, or None. The parts are nested: they are tried from
    the smallest, growing while they reduce, up to the first refusal (so each candidate
    costs one refused attempt plus one per part that grows; a candidate's smallest part
    that is refused leaves it to the candidates that end before it). The part before the
    cut is tried as a candidate of its own, later in the same pass."""
    best = None
    for part in reversed(suffix_cuts(cand, ops)):
        if part.reason or part.node_set & claimed:
            if best is not None:
                break
            continue
        try:
            best = (part, *_reduce(part, ops, attempt))
        except NotFusable:
            break
    return best


def _note_skip(skipped: list, cand: Candidate, report: RegionReport,
               written: set = frozenset()) -> None:
    """Keep ``report`` unless an earlier note covers the candidate's nodes (the Convs
    written by earlier passes stand for parts of regions noted already)."""
    if any(cand.node_set - written <= members for members, _ in skipped):
        return
    skipped.append((cand.node_set, report))
