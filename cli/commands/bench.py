"""``repfuse bench``: latency of the training form against the fused form."""

from __future__ import annotations

import contextlib
import copy
import textwrap
from pathlib import Path

import click
import torch
from rich.table import Table

from repfuse.cli.context import CheckFailed, set_stage
from repfuse.cli.measure import paired_latency_ms
from repfuse.cli.options import output_options
from repfuse.cli.pipeline import fuse_model, load_model
from repfuse.cli.render import (
    before_after_table,
    consoles,
    failure_summary,
    status,
    write_json,
)
from repfuse.cli.spec import model_options
from repfuse.errors import InputError, first_line
from repfuse.io.atomic import atomic_write, check_output_path, same_file
from repfuse.onnx.export import export_checked


def _need_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed; "
                         "pip install 'repfuse[plot]'") from None
    return plt


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ort_runner(proto, threads):
    from repfuse.onnx.runtime import ort_session

    session = ort_session(proto, optimize=True, threads=threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _export(model, x):
    return export_checked(model, (x,), check=False)[0]


def _torch_rows(source, fused, x, opts, notes):
    rows = []
    train = source.model
    rows.append(("torch eager, NCHW", *paired_latency_ms(train, x, fused, x, **opts)))
    cl = torch.channels_last
    train_cl = copy.deepcopy(train).to(memory_format=cl)
    fused_cl = copy.deepcopy(fused).to(memory_format=cl)
    x_cl = x.contiguous(memory_format=cl)
    rows.append(("torch eager, channels_last",
                 *paired_latency_ms(train_cl, x_cl, fused_cl, x_cl, **opts)))
    return rows


def _ort_rows(source, result, x, opts, threads, notes):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        notes.append("onnxruntime not installed: ONNX Runtime row skipped "
                     "(pip install 'repfuse[onnxruntime]')")
        return []
    try:
        if source.kind == "onnx":
            train_proto, fused_proto = source.model, result.model
            shape = source.input_shape
        else:
            train_proto, fused_proto = _export(source.model, x), _export(result.model, x)
            shape = tuple(x.shape)
        xa = torch.randn(shape, generator=torch.Generator().manual_seed(0)).numpy()
        train_run = _ort_runner(train_proto, threads)
        fused_run = _ort_runner(fused_proto, threads)
        return [("ONNX Runtime (all graph optimizations)",
                 *paired_latency_ms(train_run, xa, fused_run, xa, **opts))]
    except Exception as exc:   # a backend that cannot run the model is a note, not a failure
        notes.append(f"ONNX Runtime row skipped: {type(exc).__name__}: {first_line(exc)}")
        return []


def _table(rows, title: str) -> Table:
    table = before_after_table(title, "backend", ("training form (ms)", "fused (ms)", "speedup"))
    for name, before, after in rows:
        table.add_row(name, f"{before:.3f}", f"{after:.3f}", f"{before / after:.2f}x")
    return table


def _plot(plt, rows, title: str, path, force: bool, inputs) -> None:
    lines = textwrap.wrap(title, 80)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.25 * len(lines) + 0.9 * len(rows)))
    ys = range(len(rows))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], [r[1] for r in rows], h, label="training form")
    ax.barh([y + h / 2 for y in ys], [r[2] for r in rows], h, label="fused")
    for y, r in zip(ys, rows):   # the speed-up beside each pair
        ax.annotate(f"{r[1] / r[2]:.2f}x" if r[2] > 0 else "", (max(r[1], r[2]), y),
                    xytext=(4, 0), textcoords="offset points", va="center")
    ax.set_yticks(list(ys), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("median latency (ms)")
    ax.margins(x=0.12)
    fig.suptitle("\n".join(lines), x=0.02, ha="left", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), force=force,
                     inputs=inputs)
    finally:
        plt.close(fig)


@click.command()
@model_options
@click.option("--repeat", "-r", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="Timed runs per measurement (the median is reported).")
@click.option("--warmup", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Threads for torch and ONNX Runtime [default: torch's current setting].")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX Runtime measurement.")
@click.option("--plot", metavar="FILE.png", type=click.Path(dir_okay=False),
              help="Also draw the table as a bar chart (needs matplotlib: repfuse[plot]).")
@click.option("--force", "-f", is_flag=True, help="Replace the --plot file if it exists.")
@output_options
@click.pass_context
def bench(ctx, model, repeat, warmup, threads, no_onnx, plot, force, json_path, quiet):
    """Latency of the training form against the fused form: torch eager (NCHW and
    channels_last) and ONNX Runtime when installed; median of --repeat runs, the two forms
    timed alternately in one process so that both see the same machine load.

    Takes the same model options as `repfuse convert`; the fused model is verified first.

    \b
    Examples:
      repfuse bench --arch repvgg_a0 --input-shape 1,3,224,224 --threads 2
      repfuse bench train.onnx --plot bench.png
    """
    out, err = consoles(quiet)
    set_stage(ctx, "load")
    inputs = model.inputs
    plt = None
    if plot is not None:
        plt = _need_matplotlib()
        if Path(plot).suffix.lower() != ".png":
            raise InputError(f"--plot {plot!r}: give a .png file name")
        check_output_path(plot, inputs=inputs, force=force)
    if json_path is not None:
        if plot is not None and same_file(json_path, plot):
            raise click.UsageError("--json and --plot name the same file; give two paths")
        check_output_path(json_path, inputs=inputs, force=True)
    source = load_model(ctx, model, err)
    result, x = fuse_model(ctx, source, err, verify=True, seed=model.seed,
                           message="fusing and verifying")
    if not result.report.ok:
        raise CheckFailed(f"verification failed: {failure_summary(result.report)}; "
                          "not benchmarking a model that differs")

    set_stage(ctx, "bench")
    opts = {"repeat": repeat, "warmup": warmup}
    notes: list[str] = []
    rows = []
    with _threads(threads), status(err, "timing"):
        if source.kind == "torch":
            rows += _torch_rows(source, result.model, x, opts, notes)
        if not no_onnx:
            rows += _ort_rows(source, result, x, opts, threads or torch.get_num_threads(), notes)
    if not rows:
        raise InputError("nothing to measure: an ONNX model needs onnxruntime "
                         "(drop --no-onnx or install onnxruntime)")
    n_threads = threads or torch.get_num_threads()
    title = (f"{source.label}, input {','.join(map(str, source.input_shape))}, "
             f"{n_threads} thread(s), median of {repeat}")
    out.print(_table(rows, title))
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    if plt is not None:
        _plot(plt, rows, title, plot, force, inputs)
        out.print(f"wrote {plot}")
    if json_path:
        write_json(json_path, {
            "command": "bench", "model": source.label, "input_shape": list(source.input_shape),
            "threads": n_threads, "repeat": repeat, "notes": notes,
            "rows": [{"backend": n, "training_ms": b, "fused_ms": a, "speedup": b / a}
                     for n, b, a in rows]}, inputs=inputs)
