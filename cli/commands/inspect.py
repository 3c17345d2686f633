"""``repfuse inspect``: what would be fused, into what, and what it saves. Writes nothing."""

from __future__ import annotations

import click

from repfuse.cli.context import set_stage
from repfuse.cli.options import output_options
from repfuse.cli.pipeline import figures, figures_dict, fuse_model, load_model
from repfuse.cli.render import (
    consoles,
    region_counts,
    show_report,
    write_json,
)
from repfuse.cli.spec import model_options
from repfuse.io.atomic import check_output_path


@click.command()
@model_options
@output_options
@click.pass_context
def inspect(ctx, model, json_path, quiet):
    """Show the linear regions of a model, what each becomes, and what is left alone (and why),
    with parameters and MACs before and after. Writes nothing (except --json).

    Takes the same model options as `repfuse convert`.

    \b
    Examples:
      repfuse inspect --arch mobileone_s0 --input-shape 1,3,224,224
      repfuse inspect train.onnx --json regions.json
    """
    out, err = consoles(quiet)
    set_stage(ctx, "load")
    inputs = model.inputs
    if json_path is not None:
        check_output_path(json_path, inputs=inputs, force=True)
    source = load_model(ctx, model, err)
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
