"""Rich rendering of reports; the library returns reports, only the CLI prints."""

from __future__ import annotations

import contextlib
import json
import os

from rich.console import Console
from rich.table import Table

from repfuse.io.atomic import atomic_write
from repfuse.report import LayerStatus, RegionStatus


def consoles(quiet: bool) -> tuple[Console, Console]:
    """(stdout console for results, stderr console for progress and notes)."""
    out = Console(quiet=quiet, highlight=False, soft_wrap=False)
    err = Console(stderr=True, quiet=quiet, highlight=False)
    return out, err


def status(err: Console, text: str):
    """A spinner on a terminal, one dim line otherwise; nothing when quiet."""
    if err.quiet:
        return contextlib.nullcontext()
    if err.is_terminal:
        return err.status(text)
    err.print(f"[dim]{text}[/dim]")
    return contextlib.nullcontext()


def human(n: float | int | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _change(before, after) -> str:
    if not before or after is None:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def compact_branches(branches: list[str]) -> str:
    """``["conv3x3+bn", "conv3x3+bn", "bn"]`` -> ``"2x conv3x3+bn + bn"`` (first-seen order)."""
    counts: dict[str, int] = {}
    for b in branches:
        counts[b] = counts.get(b, 0) + 1
    return " + ".join(f"{n}x {b}" if n > 1 else b for b, n in counts.items())


def region_tables(report, *, title: str = "Regions", checked: bool = True) -> list[Table]:
    """The fused regions (where, what branches, what each became, params, error) and,
    when some were left alone, a second table of those with the reason."""
    tables = []
    fused = [r for r in report.regions if r.status is RegionStatus.FUSED]
    skipped = [r for r in report.regions if r.status is not RegionStatus.FUSED]  # alone or split
    if fused or not skipped:
        table = Table(title=f"{title}: fused regions", title_justify="left")
        table.add_column("region", overflow="fold", min_width=12)
        table.add_column("branches", overflow="fold", min_width=14, ratio=1)
        table.add_column("becomes", overflow="fold", min_width=8)
        table.add_column("params", justify="right", no_wrap=True)
        if checked:
            table.add_column("max abs err", justify="right", no_wrap=True)
        for r in fused:
            cells = [r.path or "(model)", compact_branches(r.branches), r.result or "conv",
                     f"{human(r.params_before)} -> {human(r.params_after)}"]
            if checked:
                cells.append(sci(r.max_abs_err) if r.ok
                             else f"[red]FAILED {sci(r.max_abs_err)}[/red]")
            table.add_row(*cells)
        tables.append(table)
    if skipped:
        table = Table(title=f"{title}: not fused as a whole", title_justify="left")
        table.add_column("region", overflow="fold", min_width=12)
        table.add_column("branches", overflow="fold", min_width=14, ratio=1)
        table.add_column("outcome", no_wrap=True)
        table.add_column("because", overflow="fold", min_width=20, ratio=2)
        for r in skipped:
            outcome = "fused in parts" if r.status is RegionStatus.SPLIT else "left alone"
            table.add_row(r.path or "(model)", compact_branches(r.branches), outcome, r.reason)
        tables.append(table)
    return tables


def region_counts(report, fused_verb: str = "fused") -> str:
    """``"80 region(s) fused, 3 fused in parts, 20 left alone, 2 layer(s) not reached;
    convs 120 -> 80, norms 100 -> 0"`` (no split / not-reached part if none, no counts
    where unknown). Left alone: regions, and norm layers outside them."""
    split = f", {len(report.split)} fused in parts" if report.split else ""
    missed = len(report.layers_with(LayerStatus.NOT_REACHED))
    unreached = f", {missed} layer(s) not reached" if missed else ""
    counts = "; " + ", ".join(f"{name} {b} -> {a}" for name, (b, a) in report.counts().items()) \
        if report.counts() else ""
    return (f"{len(report.fused)} region(s) {fused_verb}{split}, {report.left_alone} left "
            f"alone{unreached}{counts}")


def layer_table(report, *, title: str = "Layers", limit: int = 40) -> Table | None:
    """The conv and norm layers that were not fused and could have been (norms left as they
    are, layers not reached), with the reason; None when there are none."""
    in_regions = {p for r in report.skipped for p in r.layers}
    rows = [layer for layer in report.layers if layer.path not in in_regions and (
        layer.status is LayerStatus.NOT_REACHED
        or (layer.status is LayerStatus.LEFT_ALONE and layer.kind == "norm"))]
    if not rows:
        return None
    table = Table(title=f"{title}: layers not fused", title_justify="left")
    table.add_column("layer", overflow="fold", min_width=12)
    table.add_column("type", overflow="fold")
    table.add_column("outcome", no_wrap=True)
    table.add_column("because", overflow="fold", min_width=20, ratio=2)
    for layer in rows[:limit]:
        table.add_row(layer.path, layer.type, str(layer.status), layer.reason)
    if len(rows) > limit:
        table.add_row("...", "", "", f"{len(rows) - limit} more in the JSON report")
    return table


def before_after_table(title: str, first: str, columns: tuple[str, str, str]) -> Table:
    """A table with a left-justified first column and three right-justified ones."""
    table = Table(title=title, title_justify="left")
    table.add_column(first)
    for name in columns:
        table.add_column(name, justify="right")
    return table


def summary_table(rows: list[tuple[str, object, object]], *, title: str = "Model") -> Table:
    table = before_after_table(title, "", ("training form", "fused", "change"))
    for name, before, after in rows:
        if isinstance(before, dict) or isinstance(after, dict):
            continue
        table.add_row(name, human(before), human(after),
                      _change(before, after) if isinstance(before, (int, float)) else "")
    return table


def ops_table(before: dict[str, int], after: dict[str, int]) -> Table:
    table = Table(title="ONNX nodes by op type", title_justify="left")
    table.add_column("op")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for op in sorted(set(before) | set(after)):
        table.add_row(op, str(before.get(op, 0)), str(after.get(op, 0)))
    return table


def checks_table(checks, *, title: str = "Checks") -> Table:
    table = Table(title=title, title_justify="left")
    for col, just in (("check", "left"), ("max abs", "right"), ("max rel", "right"),
                      ("atol", "right"), ("rtol", "right"), ("", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for c in checks:
        table.add_row(c.name, sci(c.max_abs), sci(c.max_rel), sci(c.atol), sci(c.rtol),
                      "[green]ok[/green]" if c.ok else "[red]MISMATCH[/red]")
    return table


def failure_summary(report) -> str:
    """A one-line account of what failed in a fuse or verify report."""
    parts = []
    for r in getattr(report, "regions", []):
        if not r.ok:
            fails = r.proofs.failures if r.proofs is not None else []
            what = ", ".join(f"{c.name} max abs {c.max_abs:.3g} > {c.atol:.3g}"
                             for c in fails[:2]) or f"max abs {r.max_abs_err:.3g}"
            parts.append(f"region {r.path}: {what}")
    checks = getattr(report, "model_checks", None)
    failures = checks.failures if checks is not None else getattr(report, "failures", [])
    for c in failures[:3]:
        parts.append(f"{c.name}: max abs {c.max_abs:.3g} (atol {c.atol:.3g}), "
                     f"max rel {c.max_rel:.3g} (rtol {c.rtol:.3g})")
    return "; ".join(parts[:4]) or "the checks did not pass"


def write_json(path: str | os.PathLike, data: dict, *, inputs=()) -> None:
    """Write a report as JSON, atomically (an existing report file is replaced)."""
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")

    atomic_write(path, write, force=True, inputs=inputs)


def show_report(out, err, source, report, rows, *, checked: bool) -> None:
    """The tables every fusing command prints: fused and not-fused regions, ONNX op counts,
    the model summary, then the report's notes (on stderr)."""
    for table in region_tables(report, title=source.label, checked=checked):
        out.print(table)
    layers = layer_table(report, title=source.label)
    if layers is not None:
        out.print(layers)
    if source.kind == "onnx" and (report.ops_before or report.ops_after):
        out.print(ops_table(report.ops_before, report.ops_after))
    out.print(summary_table(rows))
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    for region in getattr(report, "defects", []):
        err.print(f"[bold red]repfuse defect:[/bold red] region {region.path}: {region.reason}")
