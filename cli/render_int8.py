"""Rich tables of the INT8 doctor's report (``repfuse.quantize``)."""

from __future__ import annotations

import math

from rich.table import Table


def _db(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    if math.isinf(x):
        return "exact" if x > 0 else "-inf"
    return f"{x:.1f}"


def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _range(low: float, high: float) -> str:
    return f"{_num(low)}..{_num(high)}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.0f}%"


def layer_table(report, *, title: str) -> Table:
    """One row per weighted layer: weight range; median weight SQNR over the output
    channels with per-tensor / per-channel scales; the worst channel's share of weights
    rounded to zero (tensor / channel scales); activation range; sensitivity. The worst
    channel's SQNR is in the JSON report."""
    mode = "channel" if report.per_channel else "tensor"
    table = Table(title=f"{title}: INT8 doctor (weights per {mode})", title_justify="left",
                  caption="t/c: with per-tensor / per-channel weight scales; SQNR: dB, median "
                          "channel; zeroed: worst channel's share of weights rounded to 0; "
                          "alone: output SQNR (dB) with only this layer INT8; (float): kept "
                          "in float; !: a cause is listed below",
                  caption_justify="left")
    table.add_column("layer", overflow="fold", min_width=14, ratio=1)
    for name in ("weights", "SQNR t/c", "zeroed t/c", "activations", "alone"):
        table.add_column(name, justify="right", no_wrap=True)
    worst = min((r.sensitivity for r in report.layers if r.sensitivity is not None),
                default=None)
    for r in report.layers:
        name = r.name + (" [cyan](float)[/cyan]" if r.kept_float else "") + (
            " [red]![/red]" if r.outliers else "")
        alone = _db(r.sensitivity)
        if r.sensitivity is not None and r.sensitivity == worst:
            alone = f"[bold]{alone}[/bold]"
        table.add_row(
            name, _range(r.weight_min, r.weight_max),
            f"{_db(r.weight_sqnr_tensor_median)}/{_db(r.weight_sqnr_channel_median)}",
            f"{_pct(r.weight_zeroed_tensor)}/{_pct(r.weight_zeroed_channel)}",
            _range(r.act_min, r.act_max), alone)
    return table


def outlier_table(report) -> Table | None:
    """Training-form branches whose BN scale is an outlier of their fused layer."""
    if not report.outliers:
        return None
    table = Table(title="Cause: training-form BatchNorm scales far above their layer's median",
                  title_justify="left")
    for col, just in (("fused layer", "left"), ("branch", "left"), ("channel", "right"),
                      ("scale", "right"), ("x median", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for o in report.outliers:
        table.add_row(o.layer, o.branch, str(o.channel), f"{o.scale:.4g}", f"{o.ratio:.0f}x")
    return table


def summary_table(report) -> Table:
    """Output SQNR (every layer INT8, and as chosen), top-1 agreement, latency."""
    table = Table(title="INT8 model", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("output SQNR, every layer INT8", f"{_db(report.output_sqnr_all_int8)} dB")
    kept = len(report.kept_float)
    table.add_row(f"output SQNR, {kept} layer(s) in float" if kept else "output SQNR",
                  f"{_db(report.output_sqnr)} dB (target {report.target_sqnr:g})")
    if report.top1_agreement is not None:
        table.add_row("top-1 agreement with float", f"{report.top1_agreement * 100:.1f}%")
    lat = report.latency
    if lat is not None:
        table.add_row("onnxruntime latency, float", f"{lat.float_ms:.3g} ms")
        if lat.all_int8_ms is not None:
            table.add_row("onnxruntime latency, every layer INT8",
                          f"{lat.all_int8_ms:.3g} ms ({lat.float_ms / lat.all_int8_ms:.2f}x)")
        table.add_row("onnxruntime latency, this INT8 model",
                      f"{lat.int8_ms:.3g} ms ({lat.speedup:.2f}x)")
    return table


def int8_tables(report, *, title: str) -> list[Table]:
    tables = [layer_table(report, title=title), outlier_table(report), summary_table(report)]
    return [t for t in tables if t is not None]


def show_int8_report(out, err, report, *, title: str) -> None:
    """The doctor's tables on ``out``; what was done (steps, notes) on ``err``."""
    for table in int8_tables(report, title=title):
        out.print(table)
    for line in report.steps + report.notes:
        err.print(f"[yellow]note:[/yellow] {line}")


def verdict(report) -> str:
    """One line: the output SQNR against the target, agreement, what stayed in float."""
    kept = (f"; kept in float: {', '.join(report.kept_float)}" if report.kept_float
            else "; every layer INT8")
    agree = (f", top-1 agreement {report.top1_agreement * 100:.1f}%"
             if report.top1_agreement is not None else "")
    return (f"output SQNR {_db(report.output_sqnr)} dB (target {report.target_sqnr:g})"
            f"{agree}{kept}")
