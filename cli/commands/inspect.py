"""``repfuse inspect``: what would be fused, into what, and what it saves; with ``--int8``
the INT8 doctor's tables instead. Writes nothing."""

from __future__ import annotations

import click

from repfuse.cli.context import set_stage
from repfuse.cli.int8 import Int8Spec, early_calibration, int8_options, quantize_source
from repfuse.cli.options import output_options
from repfuse.cli.pipeline import figures, figures_dict, fuse_model, load_model
from repfuse.cli.render import (
    consoles,
    region_counts,
    show_report,
    write_json,
)
from repfuse.cli.render_int8 import show_int8_report
from repfuse.cli.spec import model_options
from repfuse.io.atomic import check_output_path


@click.command()
@model_options
@click.option("--int8", "int8_doctor", is_flag=True,
              help="Show the INT8 doctor's tables (as `repfuse quantize` does, with the same "
                   "INT8 options; needs --calib) instead of the regions.")
@int8_options
@output_options
@click.pass_context
def inspect(ctx, model, int8_doctor, int8, json_path, quiet):
    """Show the linear regions of a model, what each becomes, and what is left alone (and why),
    with parameters and MACs before and after. Writes nothing (except --json).

    Takes the same model options as `repfuse convert`. With --int8 and --calib: what INT8
    does to each fused layer and why (see `repfuse quantize`), without writing a model.

    \b
    Examples:
      repfuse inspect --arch mobileone_s0 --input-shape 1,3,224,224
      repfuse inspect train.onnx --json regions.json
      repfuse inspect train.onnx --int8 --calib batch.npy --per-tensor
    """
    out, err = consoles(quiet)
    set_stage(ctx, "load")
    inputs = [*model.inputs, *([int8.calib] if int8.calib else [])]
    calibration = None
    if int8_doctor:
        calibration, model = early_calibration(model, int8)
    elif int8 != Int8Spec():
        raise click.UsageError("--calib and the other INT8 options need --int8")
    if json_path is not None:
        check_output_path(json_path, inputs=inputs, force=True)
    source = load_model(ctx, model, err)
    if int8_doctor:
        report = quantize_source(ctx, source, err, int8, calibration).report
        show_int8_report(out, err, report, title=source.label)
        if json_path:
            write_json(json_path, {"command": "inspect --int8", "model": source.label,
                                   "kind": source.kind, "report": report.to_dict()},
                       inputs=inputs)
        return
    result, x = fuse_model(ctx, source, err, verify=False, seed=model.seed,
                           message="finding and reducing linear regions")
    report = result.report
    rows = figures(source, result, x)

    show_report(out, err, source, report, rows, checked=False)
    out.print(f"{region_counts(report, 'would be fused')} "
              f"(input shape {','.join(map(str, source.input_shape))})")
    if json_path:
        write_json(json_path, {"command": "inspect", "model": source.label, "kind": source.kind,
                               "input_shape": list(source.input_shape), "notes": source.notes,
                               "figures": figures_dict(rows), "report": report.to_dict()},
                   inputs=inputs)
