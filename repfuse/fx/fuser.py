"""The per-module fusion pass of the fx front end.

``Fuser`` walks the traced module graphs bottom-up: it classifies nodes
(``fx.ops``), decides whether a module's whole forward is one linear region (then
its calls are linear ops of its caller, so a region spanning several modules is
fused in the smallest module that contains it), finds maximal regions
(``fx.match``), reduces them (``region.reduce``; each part once, refusals the shapes
decide without computing a kernel: ``region.Attempts``), leaves alone and reports the
ones that are blocked or not exact (cutting them in one pass from the output,
until nothing is left; ``fx.cuts``), and
writes the fused convs back (``fx.rewrite``) into the module itself (``fx.install``: it
keeps its class, attributes and hooks). Use counts and argument conformity come from the
real forward pass (``fx.reach``).
Given a ``check`` (the per-region proofs), a region's rewrite is kept only once its
proof passes; a region whose proof fails is left in its training form and reported as a
defect of repfuse.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from repfuse import region as rg
from repfuse.errors import NotFusable
from repfuse.fx.account import expression_layers, layer_kind
from repfuse.fx.cuts import cut_points
from repfuse.fx.distribute import distribute_norms
from repfuse.fx.inline import after_concat_of_convs, inline_call, should_inline
from repfuse.fx.install import install
from repfuse.fx.keep import kept_patterns
from repfuse.fx.match import Region, find_regions, ignorable_nodes
from repfuse.fx.ops import Context, LinearOp, classify, tensor_meta
from repfuse.fx.reach import Reach
from repfuse.fx.readers import copy_norms, opens_for_readers
from repfuse.fx.rewrite import (
    drop_dead,
    drop_noops,
    graph_parts,
    replace_region,
    unique_name,
)
from repfuse.fx.slicing import normalize
from repfuse.fx.trace import (
    CAPTURE,
    CAPTURE_CHANNELS_LAST,
    META,
    ModuleGraph,
    captured,
    hook_reason,
    join,
)
from repfuse.region.op import GEOMETRIC, OpKind
from repfuse.region.worth import worthwhile
from repfuse.report import RegionReport, RegionStatus, VerifyReport, proof_failed_reason

log = logging.getLogger(__name__)

#: ``check(expression, AffineConv, activation or None) -> VerifyReport``: the proof a
#: region must pass before its rewrite is kept (``repfuse.fx.pipeline`` passes the
#: per-region proofs; the front end itself never imports them).
RegionCheck = Callable[[rg.Node, object, "torch.Tensor | None"], VerifyReport]


@dataclass(eq=False)
class _Analysis:
    ops: dict
    ign: set
    pure: Region | None = None
    passthrough: bool = False
    fused: list = field(default_factory=list)


def _mark_constants(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from parameters and literals only (no activation flows in)."""
    const: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_method")
                                  and all(a in const for a in n.all_input_nodes)):
            const.add(n)
            n.meta.pop(META, None)
    return const


def _like_branches(module: nn.Module, expr: rg.Node) -> nn.Module:
    """The fused module in the memory format of the convs it replaces: a channels_last
    model keeps channels_last kernels (a kernel in the other format is converted on every
    call)."""
    kernels = [t for t in rg.parameters(expr).values() if t.dim() == 4]
    if any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
           for t in kernels):
        module.to(memory_format=torch.channels_last)
    return module


#: ``reducer(expression, shape-only reduction or None) -> AffineConv``: computes
#: ``region.reduce`` in a way a check can reuse (the proofs: differentiably, on float64
#: leaves of their own; ``repfuse.proofs.region.reduce_for_proof``), given the shape-only
#: reduction or, for a ``region.direct`` part, None; without one (or without the shapes of
#: a part that needs them), ``region.reduce`` runs without grad.
Reducer = Callable[[rg.Node, object], object]


def _reduce(expr: rg.Node, shapes=None, reducer: Reducer | None = None):
    """``(AffineConv, module)`` for a region expression; raises ``NotFusable``."""
    if reducer is not None and (shapes is not None or rg.direct(expr)):
        affine = reducer(expr, shapes)
    else:
        with torch.no_grad():
            affine = rg.reduce(expr)
    rg.check_growth(expr, affine)
    with torch.no_grad():
        return affine, _like_branches(affine.to_module(), expr)


def _release(attempt: rg.Attempts) -> None:
    """Drop what a reducer attached to the kernels of parts tried (``AffineConv.carried``:
    the proofs' differentiable reduction, freed once their proof ran): a part is proven
    only when it is chosen, and then its reduction is made again if needed."""
    for outcome in attempt.outcomes.values():
        if isinstance(outcome, tuple):
            outcome[0].carried = None


def _last(module: nn.Module) -> nn.Module:
    """The layer a fused module ends with (after its pad or pool modules)."""
    return module[-1] if isinstance(module, nn.Sequential) and len(module) else module


def _free_path(graph: fx.Graph, target: str) -> bool:
    """Whether the fused conv may keep the path ``target`` of the conv it replaces: a
    plain name, or a dotted one (the conv of an inlined submodule, ``conv1.0``) whose
    prefixes are only containers in the new module, not modules the graph still calls or
    reads (installing the conv there would change a module in use)."""
    if "." not in target:
        return True
    parts = target.split(".")
    prefixes = {".".join(parts[:k]) for k in range(1, len(parts))}
    return not any(n.op in ("call_module", "get_attr") and n.target in prefixes
                   for n in graph.nodes)


def _absorbed(graph: fx.Graph, module: nn.Module, r: Region, prefix: str) -> bool:
    """Whether region ``r`` replaces all of module ``prefix``: every read of it or of
    anything in it (calls, parameter reads) left in ``graph`` is a member of ``r`` or feeds
    only members (its forward was inlined into the region), and each of its parameters
    and buffers is under one of those reads (nothing the rewrite would keep is lost)."""
    members = set(r.nodes)
    read = set()
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and (
                n.target == prefix or n.target.startswith(prefix + ".")):
            if n not in members and not (n.op == "get_attr" and n.users
                                         and set(n.users) <= members):
                return False
            read.add(n.target)
    try:
        sub = module.get_submodule(prefix)
    except AttributeError:
        return False
    held = [f"{prefix}.{k}" for k, _ in (*sub.named_parameters(), *sub.named_buffers())]
    return all(any(h == t or h.startswith(t + ".") for t in read) for h in held)


def _kept_name(graph: fx.Graph, module: nn.Module, r: Region, linear: bool) -> str | None:
    """The user's name the fused layer takes (see ``_free_path``), or None: that of the
    region's one module call (a conv or Linear, or a module whose whole forward is
    linear), or, for a Linear replacing several (a head and its distillation head), of
    the first; lifted to the module that held it when the region replaces all of that
    module (an inlined ``head`` whose norm and Linear it fused: ``head``, not ``head.l``),
    so that the user's attribute stays a callable layer."""
    calls = [n for n in r.nodes if r.ops[n].kind in (OpKind.CONV, OpKind.MODULE)]
    if not calls or (len(calls) > 1 and not linear) or calls[0].op != "call_module":
        return None
    target = calls[0].target
    if not _free_path(graph, target):
        return None
    parts = target.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if not _absorbed(graph, module, r, prefix):
            break
        target = prefix
    return target


class Fuser:
    def __init__(self, root: nn.Module, found: Reach, capture: bool,
                 check: RegionCheck | None = None, reducer: Reducer | None = None) -> None:
        self.root = root
        self.found = found
        self.graphs = {k: u for k, u in found.units.items() if u.graph is not None}
        self.capture = capture
        self.check = check
        self.reducer = reducer
        self.proofs: dict[frozenset, VerifyReport] = {}   # a chosen region's passed proof
        self.paths = {id(m): p for p, m in root.named_modules()}
        self.path_counts = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.plain = {k: found.plain(u.module) for k, u in self.graphs.items()}
        self.analyses: dict[int, _Analysis] = {}
        self.rewritten: set[int] = set()
        self.inlined: set[int] = set()
        self.reports: list[RegionReport] = []
        self.kernels: list[tuple[str, rg.Node]] = []   # (fused module path, expression)
        self.kept: list = []        # runtime-fused patterns left whole (fx.keep)
        #: the region search's work: regions found ("regions"), parts tried ("attempts"),
        #: parts reduced with values ("reductions": the others were refused by shapes)
        self.search: Counter = Counter()

    # ------------------------------------------------------------------ helpers
    def shared(self, m: nn.Module) -> str:
        """Why ``m`` must not be fused away: used more than once, or hooked."""
        hooked = hook_reason(m, self.paths.get(id(m), ""))
        if hooked:
            return hooked
        n_paths, n_calls = self.path_counts[id(m)], self.found.uses(m)
        if n_paths > 1 or n_calls > 1:
            path = self.paths.get(id(m), type(m).__name__)
            return (f"module {path} is used {max(n_paths, n_calls)} times; fusing one use "
                    "would change the others (give each use its own module)")
        return ""

    def _summary(self, mg: ModuleGraph):
        """The linear-op maker for calls of ``mg``'s module, or None if it is not linear."""
        if not self.plain.get(id(mg.module), False):
            return None
        an = self.analyze(mg)
        hooked = hook_reason(mg.module, mg.path)
        if an.passthrough:
            def passthrough(inp):
                if tensor_meta(inp) is None:
                    return None
                return LinearOp(OpKind.PASS, [inp], lambda xs: xs[0], hooked)
            return passthrough
        if an.pure is None:
            return None
        region = an.pure

        def make(inp):
            meta = tensor_meta(inp)
            if meta is None or meta[0] != tensor_meta(region.input)[0]:
                return None
            return LinearOp(OpKind.MODULE, [inp], lambda xs: region.build(xs[0]),
                            region.blocked or hooked)
        return make

    def analyze(self, mg: ModuleGraph) -> _Analysis:
        """Classify ``mg``'s nodes and decide whether its forward is one linear region."""
        key = id(mg.module)
        if key in self.analyses:
            return self.analyses[key]
        self.analyses[key] = _Analysis({}, set())  # guards recursion
        graph = mg.graph
        for n in list(graph.nodes):
            if n.op == "call_module":
                sub = mg.module.get_submodule(n.target)
                sub_mg = self.graphs.get(id(sub))
                single = self.plain.get(id(sub), False) and not self.shared(sub)
                if should_inline(n, mg.module, sub_mg, single) and (
                        self._summary(sub_mg) is None or after_concat_of_convs(n, mg.module)) \
                        or single and sub_mg is not None and sub_mg.graph is not None and \
                        opens_for_readers(n, mg.module, sub_mg.graph, sub, self.shared):
                    mg.constants.update({f"{n.target}.{k}": t      # read under their path
                                         for k, t in sub_mg.constants.items()})
                    inline_call(graph, n, sub_mg.graph)
                    self.inlined.add(id(sub))
        normalize(graph)
        distribute_norms(graph, mg.module)
        copy_norms(graph, mg.module, self.shared)
        const = _mark_constants(graph)
        summaries = {}
        for n in graph.nodes:
            if n.op == "call_module":
                sub = mg.module.get_submodule(n.target)
                sub_mg = self.graphs.get(id(sub))
                if sub_mg is not None and sub_mg.graph is not None and id(sub) not in summaries:
                    summaries[id(sub)] = self._summary(sub_mg)
        summaries = {k: v for k, v in summaries.items() if v is not None}
        ctx = Context(mg.module, mg.path, summaries, self.shared, const, mg.constants)
        ops = {}
        for n in graph.nodes:
            if n in const:
                continue
            try:
                op = classify(n, ctx)
            except (ValueError, NotFusable) as err:  # impossible geometry: not linear
                log.debug("fx: %s not linear: %s", n.name, err)
                op = None
            if op is not None:
                ops[n] = op
        for pattern in kept_patterns(graph, ctx):     # runtime-fused: left whole
            self.kept.append(pattern)
            for n in pattern.values:
                ops.pop(n, None)
        ign = ignorable_nodes(graph)
        an = _Analysis(ops, ign)
        self._check_pure(mg, an, const)
        self.analyses[key] = an
        return an

    def _check_pure(self, mg: ModuleGraph, an: _Analysis, const: set) -> None:
        graph = mg.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        out = next(n for n in graph.nodes if n.op == "output")
        if not placeholders or mg.n_inputs != 1 or not isinstance(out.args[0], fx.Node):
            return
        x, v = placeholders[0], out.args[0]
        if any(n.users and n.users.keys() - an.ign for n in placeholders[1:]):
            return
        if v is x:
            an.passthrough = all(n.op in ("placeholder", "output", "get_attr") or n in an.ign
                                 or n in const for n in graph.nodes)
            return
        regions = find_regions(graph, an.ops, set(), an.ign, mg.module)
        r = next((r for r in regions if r.output is v), None)
        if r is None or r.input is not x:
            return
        members = set(r.nodes)
        if all(n in members or n.op in ("placeholder", "output", "get_attr") or n in an.ign
               or n in const for n in graph.nodes):
            an.pure = r

    # ------------------------------------------------------------------ rewriting
    def _report_skip(self, path: str, expr, reason: str,
                     status: RegionStatus = RegionStatus.SKIPPED) -> RegionReport:
        try:
            branches = rg.describe(expr)
        except Exception:  # noqa: BLE001 - a description must never stop fusion
            branches = []
        for r in self.reports:
            if r.path == path and r.status is not RegionStatus.FUSED:
                # a part of a region refused before (same output): one entry, one outcome
                if reason not in r.reason:
                    r.reason = f"{r.reason}; then {' + '.join(branches)}: {reason}"
                if status is RegionStatus.SPLIT:
                    r.status = RegionStatus.SPLIT
                return r
        self.reports.append(RegionReport(path=path, branches=branches, status=status,
                                         reason=reason, layers=expression_layers(expr)))
        return self.reports[-1]

    def _decide(self, mg: ModuleGraph, an: _Analysis) -> list[tuple]:
        """Regions of ``mg`` to fuse: (region, expression, (AffineConv, module)); regions
        that are blocked or not exact are reported and split until none is left: cut
        at interior nodes so that parts of it fuse (``fx.cuts``), or, when no cut helps,
        made smaller from the output."""
        barriers: set[fx.Node] = set()
        cuts: set[fx.Node] = set()
        attempt = rg.Attempts(functools.partial(_reduce, reducer=self.reducer),
                              self.search)  # each part tried once
        while True:
            regions = find_regions(mg.graph, an.ops, barriers, an.ign, mg.module, cuts)
            if not cuts and not barriers:
                self.search["regions"] += sum(not r.is_passthrough for r in regions)
            chosen, restart = [], False
            for r in regions:
                if r.is_passthrough:
                    continue
                expr = r.expr()
                if not worthwhile(expr):
                    continue
                where = join(mg.path, r.output.name)
                if r.blocked:
                    self._report_skip(where, expr, r.blocked)
                    barriers |= {n for n in r.nodes if r.ops[n].blocked}
                    restart = True
                    break
                result = attempt(frozenset(r.nodes), expr)
                if isinstance(result, Exception):
                    found = cut_points(r, attempt)
                    _release(attempt)   # the parts tried there are not proven now
                    kinds = [r.ops[n].kind for n in r.nodes]
                    if kinds.count(OpKind.MODULE) != 1 or set(kinds) - {OpKind.MODULE,
                                                                          OpKind.PASS}:
                        # (a lone submodule call reports itself when it is fused alone)
                        if not found:
                            self._report_skip(where, expr, str(result))
                        else:
                            names = ", ".join(join(mg.path, c.name) for c in reversed(found))
                            self._report_skip(where, expr, f"{result}; cut after {names}",
                                              RegionStatus.SPLIT)
                    if found:
                        cuts.update(found)
                    else:
                        geometric = {n for n in r.nodes if r.ops[n].kind in GEOMETRIC}
                        barriers |= geometric or {r.output}
                    restart = True
                    break
                if not self._proven(mg, r, expr, result[0]):
                    barriers |= set(r.nodes)    # left in its training form
                    restart = True
                    break
                chosen.append((r, expr, result))
            if not restart:
                return chosen

    def _proven(self, mg: ModuleGraph, r: Region, expr, affine) -> bool:
        """Whether region ``r`` may be rewritten: no ``check``, or its proof passes (kept for
        its report); a failing proof is reported as a defect of repfuse (once)."""
        key = frozenset(r.nodes)
        if self.check is None or key in self.proofs:
            return True
        last = rg.region_input(expr).layout == "NHWC"
        proofs = self.check(expr, affine,
                            captured(r.input, CAPTURE_CHANNELS_LAST if last else CAPTURE))
        if proofs.ok:
            self.proofs[key] = proofs
            return True
        where = join(mg.path, r.output.name)
        reason = proof_failed_reason(proofs)
        log.warning("region %s: %s", where, reason)
        self._report_skip(where, expr, reason).proofs = proofs
        return False

    def rewrite(self, mg: ModuleGraph) -> None:
        """Fuse the regions of ``mg``'s module (and, below it, of the modules it calls)."""
        if id(mg.module) in self.rewritten or mg.graph is None:
            return
        self.rewritten.add(id(mg.module))
        if mg.module is not self.root and not self.plain.get(id(mg.module), False) or \
                id(mg.module) in self.found.changed_args:
            self._rewrite_children(mg, set())
            return
        an = self.analyze(mg)
        chosen = self._decide(mg, an)
        absorbed: set[fx.Node] = set()
        graph_regions = []
        for r, expr, (affine, module) in chosen:
            absorbed |= set(r.nodes)
            only = r.nodes[0] if len(r.nodes) == 1 else None
            if only is not None and only.op == "call_module" and \
                    r.ops[only].kind is OpKind.MODULE:
                # a lone call of a module whose whole forward is the region: that module
                # is rewritten (it keeps its class and attributes), the call stays
                child_mg = self.graphs[id(mg.module.get_submodule(only.target))]
                self.rewritten.add(id(child_mg.module))
                pure = self.analyze(child_mg).pure
                if frozenset(r.nodes) in self.proofs:   # the call's proof is the forward's
                    self.proofs[frozenset(pure.nodes)] = self.proofs[frozenset(r.nodes)]
                self._rewrite_graph(child_mg, [(pure, expr, affine, module)])
            else:
                graph_regions.append((r, expr, affine, module))
        self._rewrite_children(mg, absorbed)
        if graph_regions:
            self._rewrite_graph(mg, graph_regions)

    def _rewrite_children(self, mg: ModuleGraph, absorbed: set) -> None:
        for n in mg.graph.nodes:
            if n.op == "call_module" and n not in absorbed:
                sub_mg = self.graphs.get(id(mg.module.get_submodule(n.target)))
                if sub_mg is not None:
                    self.rewrite(sub_mg)

    def _rewrite_graph(self, mg: ModuleGraph, regions) -> None:
        graph, module = mg.graph, mg.module
        before = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
        taken = {t.split(".")[0] for t in before} | {
            k for store in (module._modules, module._parameters, module._buffers, vars(module))
            for k, v in store.items() if v is not None}
        new_modules: dict[str, nn.Module] = {}
        renamed: dict[fx.Node, fx.Node] = {}   # a fused output read by a later region
        for r, expr, affine, module_new in regions:
            if r.input in renamed:
                r = dataclasses.replace(r, input=renamed[r.input])
            before_ops, layer, after_ops = graph_parts(module_new)
            linear = isinstance(_last(layer), nn.Linear)
            name = _kept_name(graph, module, r, linear) or unique_name(
                taken | set(new_modules), "reparam_linear" if linear else "reparam_conv")
            new_modules[name] = layer
            taken.add(name)
            renamed[r.output] = replace_region(graph, r, name, before_ops, after_ops)
            self._record(join(mg.path, name), r, expr, affine)
        drop_noops(graph, module)
        drop_dead(graph, module)
        install(module, before, graph, new_modules, mg.constants)

    def _module_layers(self, r: Region) -> set[str]:
        """Paths of the conv and norm modules a region's ops are or hold."""
        out = set()
        for n in r.nodes:
            for m in r.ops[n].source:
                base = self.paths.get(id(m), "")
                out |= {join(base, p) for p, sub in m.named_modules() if layer_kind(sub)}
        return out

    def _record(self, path: str, r: Region, expr, affine) -> None:
        module_params = affine.weight.numel() + affine.bias.numel()
        proofs = self.proofs.get(frozenset(r.nodes))
        layers = sorted(set(expression_layers(expr)) | self._module_layers(r))
        report = RegionReport(path=path, branches=rg.describe(expr), result=affine.describe(),
                              params_before=rg.count_params(expr), params_after=module_params,
                              cast_error=affine.cast_error(), layers=layers,
                              proofs=proofs, sources=rg.sources(expr))
        self.reports.append(report)
        self.kernels.append((path, expr))
