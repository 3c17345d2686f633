"""``repfuse convert``: training form in, verified inference form out."""

from __future__ import annotations

import os
from pathlib import Path

import click

from repfuse.cli.context import CheckFailed, set_stage
from repfuse.cli.options import output_options, tol_option
from repfuse.cli.pipeline import figures, figures_dict, fuse_model, load_model
from repfuse.cli.render import (
    consoles,
    failure_summary,
    region_counts,
    sci,
    show_report,
    status,
    write_json,
)
from repfuse.cli.spec import model_options
from repfuse.errors import InputError, VerificationError
from repfuse.io.atomic import atomic_write, check_output_path, same_file
from repfuse.io.writers import (
    OUTPUT_FORMATS,
    output_format,
    plain_state_dict,
    write_exported_program,
    write_onnx_proto,
    write_state_dict,
)
from repfuse.onnx.export import export_checked
from repfuse.proofs.truth import JUDGED
from repfuse.report import FuseReport


def _writer(fmt: str, source, result, x, *, check: bool, tol):
    """A function writing the fused model to a given (temporary) path in format ``fmt``."""
    if source.kind == "onnx":
        return lambda tmp: write_onnx_proto(result.model, tmp)
    fused = result.model
    if fmt == ".onnx":
        proto, _ = export_checked(fused, (x,), check=check, tol=tol)
        return lambda tmp: write_onnx_proto(proto, tmp)
    if fmt == ".pt2":
        return lambda tmp: write_exported_program(fused, (x,), tmp)
    return lambda tmp: write_state_dict(plain_state_dict(fused), tmp)


def _verified_text(report) -> str:
    if not report.verified:
        return "not verified (--no-verify)"
    checks = report.model_checks.checks if report.model_checks is not None else []
    grads = [c for c in checks if c.name.startswith("grad")]
    outs = [(r.max_rel_err, r.max_abs_err) for r in report.fused]
    outs += [(c.max_rel, c.max_abs) for c in checks if not c.name.startswith("grad")]
    parts = [f"outputs max rel err {sci(max(r for r, _ in outs))} (max abs "
             f"{sci(max(a for _, a in outs))})"] if outs else []
    if grads:
        parts.append(f"input gradients max rel err {sci(max(c.max_rel for c in grads))}")
    judged = [c.name for c in checks if c.detail.startswith(JUDGED)]
    if judged:
        parts.append(f"{', '.join(judged)} as close to the float64 result as the training "
                     "form")
    return "verified: " + "; ".join(parts) if parts else "verified"


@click.command()
@model_options
@click.option("-o", "--output", required=True, metavar="OUTPUT",
              type=click.Path(dir_okay=False),
              help="Output file; its suffix picks the format: .onnx (ONNX), .pt2 (torch.export "
                   "program), .safetensors or .pt (state dict of the fused model).")
@click.option("--force", "-f", is_flag=True, help="Replace OUTPUT if it exists "
              "(never an input file).")
@click.option("--no-verify", is_flag=True,
              help="Skip the equivalence checks (not recommended).")
@tol_option
@output_options
@click.pass_context
def convert(ctx, model, output, force, no_verify, tol, json_path, quiet):
    """Fuse every linear multi-branch region into one conv, verify, and write OUTPUT.

    The model is MODEL_FILE (.onnx; .pt2 or a pickled nn.Module with --trust-pickle) or comes
    from --arch, --factory or --timm, with weights from --weights. Without --weights, seeded
    random weights with realistic BatchNorm statistics are used (and the output says so).

    OUTPUT is written atomically, only when every check passes (exit 1 otherwise); an existing
    file is replaced only with --force, and an input file never.

    \b
    Examples:
      repfuse convert --arch repvgg_a0 --weights RepVGG-A0-train.pth -o repvgg_a0.onnx
      repfuse convert train.onnx -o deploy.onnx
      repfuse convert --factory mynets.py:build --weights last.safetensors -o deploy.pt2
    """
    out, err = consoles(quiet)
    set_stage(ctx, "load")
    fmt = output_format(output, OUTPUT_FORMATS)
    inputs = model.inputs
    check_output_path(output, inputs=inputs, force=force)
    if model.is_onnx and fmt != ".onnx":
        raise InputError(f"an ONNX model can only be written as .onnx, not {fmt}; "
                         "give an output ending in .onnx")
    if json_path is not None:
        if same_file(json_path, output):
            raise click.UsageError("--json and -o name the same file; give two paths")
        check_output_path(json_path, inputs=inputs, force=True)

    source = load_model(ctx, model, err)
    if source.kind == "onnx" and fmt != ".onnx":
        raise InputError(f"an ONNX model can only be written as .onnx, not {fmt}; "
                         "give an output ending in .onnx")

    def data_of(report, rows):
        return {"command": "convert", "model": source.label, "kind": source.kind,
                "input_shape": list(source.input_shape), "output": os.fspath(output),
                "format": fmt, "notes": source.notes, "figures": figures_dict(rows),
                "written": False, "report": report.to_dict()}

    try:
        result, x = fuse_model(ctx, source, err, verify=not no_verify, tol=tol,
                               seed=model.seed, message="fusing" + (
                                   "" if no_verify else " and verifying each region"))
    except VerificationError as exc:   # the report, then exit 1 (repfuse.cli.main)
        if isinstance(exc.report, FuseReport):
            rows = [("parameters", exc.report.params_before, exc.report.params_after)]
            show_report(out, err, source, exc.report, rows, checked=True)
            if json_path:
                write_json(json_path, data_of(exc.report, rows), inputs=inputs)
        raise
    report = result.report
    rows = figures(source, result, x, macs=False)
    data = data_of(report, rows)

    show_report(out, err, source, report, rows, checked=not no_verify)

    if not report.ok:
        if json_path:
            write_json(json_path, data, inputs=inputs)
        raise CheckFailed(f"verification failed: {failure_summary(report)}; nothing written")

    set_stage(ctx, "write")
    write = _writer(fmt, source, result, x, check=not no_verify, tol=tol)
    with status(err, f"writing {output}"):
        path = atomic_write(output, write, force=force, inputs=inputs)
    data["written"] = True
    if json_path:
        write_json(json_path, data, inputs=inputs + [path])
    params = next((a for n, _, a in rows if n == "parameters"), None)
    out.print(f"wrote {Path(path)} ({OUTPUT_FORMATS[fmt]}; {region_counts(report)}; "
              f"{params:,} parameters; {_verified_text(report)})")
