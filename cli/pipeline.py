"""The steps convert / inspect / bench share: load the model, fuse it, gather its figures."""

from __future__ import annotations

import inspect as pyinspect

import repfuse
from repfuse.cli.context import set_stage
from repfuse.cli.measure import count_macs, count_params
from repfuse.cli.render import status
from repfuse.cli.source import Source


def _accepts(fn, name: str) -> bool:
    try:
        params = pyinspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def fuse_source(source: Source, *, verify: bool, tol=None, seed: int = 0):
    """``repfuse.fuse`` (torch) or ``repfuse.fuse_onnx`` (ONNX) on the source's model.

    Returns ``(result, example_input)``; the example input is None for ONNX sources.
    """
    if source.kind == "onnx":
        kwargs = {"verify": verify}
        if tol is not None and _accepts(repfuse.fuse_onnx, "tol"):
            kwargs["tol"] = tol
        return repfuse.fuse_onnx(source.model, **kwargs), None
    x = source.example_input(seed)
    return repfuse.fuse(source.model, x, verify=verify, tol=tol), x


def load_model(ctx, model, err) -> Source:
    """Load the model a ``ModelSpec`` names (stage ``load``: errors are input errors) and
    show its notes."""
    set_stage(ctx, "load")
    with status(err, "loading the model"):
        source = model.load()
    for note in source.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    return source


def fuse_model(ctx, source: Source, err, *, verify: bool, message: str, tol=None,
               seed: int = 0):
    """``fuse_source`` under a status line (stage ``fuse``); returns ``(result, x)``."""
    set_stage(ctx, "fuse")
    with status(err, message):
        return fuse_source(source, verify=verify, tol=tol, seed=seed)


def figures(source: Source, result, x, *, macs: bool = True) -> list[tuple[str, object, object]]:
    """(name, training form, fused) rows: parameters, MACs for torch models, convs and
    norms."""
    report = result.report
    layers = [(name, b, a) for name, (b, a) in report.counts().items()]
    if source.kind == "onnx":
        return [("parameters", report.params_before, report.params_after),
                ("nodes", sum(report.ops_before.values()), sum(report.ops_after.values())),
                *layers]
    before, after = count_params(source.model), count_params(result.model)
    rows = [("parameters", before, after)]
    if macs:
        rows.append(("MACs", count_macs(source.model, x), count_macs(result.model, x)))
    return rows + layers


def figures_dict(rows) -> dict:
    return {name.lower(): {"before": b, "after": a} for name, b, a in rows}
