"""``repfuse inspect``: what would be fused, into what, and what it saves. Writes nothing."""

from __future__ import annotations

import click
from repfuse.cli.context import set_stage
from repfuse.cli.options import model_options, output_options
from repfuse.cli.pipeline import figures, figures_dict, fuse_source
from repfuse.cli.render import (
    consoles,
    ops_table,
    region_counts,
    region_tables,
    status,
    summary_table,
    write_json,
)
from repfuse.cli.source import load_source

from repfuse.io import check_output_path


@click.command()
@model_options
@output_options
@click.pass_context
def inspect(ctx, model_file, arch, factory, timm_name, weights, trust_pickle, input_shape, seed,
            json_path, quiet):
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
    inputs = [p for p in (model_file, weights) if p]
    if json_path is not None:
        check_output_path(json_path, inputs=inputs, force=True)
    with status(err, "loading the model"):
        source = load_source(model_file=model_file, arch=arch, factory=factory,
                             timm_name=timm_name, weights=weights, input_shape=input_shape,
                             trust_pickle=trust_pickle, seed=seed)
    for note in source.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    set_stage(ctx, "fuse")
    with status(err, "finding and reducing linear regions"):
        result, x = fuse_source(source, verify=False, seed=seed)
    report = result.report
    rows = figures(source, result, x)

    for table in region_tables(report, title=source.label, checked=False):
        out.print(table)
    if source.kind == "onnx" and (report.ops_before or report.ops_after):
        out.print(ops_table(report.ops_before, report.ops_after))
    out.print(summary_table(rows))
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    out.print(f"{region_counts(report, 'would be fused')} "
              f"(input shape {','.join(map(str, source.input_shape))})")
    if json_path:
        write_json(json_path, {"command": "inspect", "model": source.label, "kind": source.kind,
                               "input_shape": list(source.input_shape), "notes": source.notes,
                               "figures": figures_dict(rows), "report": report.to_dict()},
                   inputs=inputs)
