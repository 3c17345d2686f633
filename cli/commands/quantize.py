"""``repfuse quantize``: fuse, prove, run the INT8 doctor, write a checked QDQ model."""

from __future__ import annotations

import os
from pathlib import Path

import click

from repfuse.cli.context import CheckFailed, set_stage
from repfuse.cli.int8 import early_calibration, int8_options, quantize_source
from repfuse.cli.options import output_options, tol_option
from repfuse.cli.pipeline import load_model
from repfuse.cli.render import consoles, status, write_json
from repfuse.cli.render_int8 import show_int8_report, verdict
from repfuse.cli.spec import model_options
from repfuse.io.atomic import atomic_write, check_output_path, same_file
from repfuse.io.writers import output_format, write_onnx_proto


def _speed(report) -> str:
    lat = report.latency
    if lat is None:
        return ""
    return (f"; onnxruntime {lat.float_ms:.3g} ms float -> {lat.int8_ms:.3g} ms INT8 "
            f"({lat.speedup:.2f}x)")


@click.command()
@model_options
@int8_options
@click.option("-o", "--output", required=True, metavar="OUT.onnx",
              type=click.Path(dir_okay=False), help="The INT8 model (ONNX, QDQ form).")
@click.option("--force", "-f", is_flag=True, help="Replace OUT.onnx if it exists "
              "(never an input file).")
@tol_option
@output_options
@click.pass_context
def quantize(ctx, model, int8, output, force, tol, json_path, quiet):
    """Fuse and prove the model, quantize it to INT8 with onnxruntime (QDQ: uint8
    activations, int8 weights, MinMax calibration), and write OUT.onnx when its output
    SQNR against the float model reaches --target-sqnr (exit 1 and nothing written
    otherwise).

    The report shows, per fused layer under its torch module path: the weight range, the
    weights' SQNR with per-tensor and per-channel scales, the share of weights rounded to
    zero, the activation range on the calibration data, the sensitivity (output SQNR with
    only that layer quantized) and whether it stays in float; the training-form branches
    whose BatchNorm scale is an outlier, by branch and channel; the whole model's output
    SQNR, top-1 agreement and onnxruntime latency float vs INT8.

    --calib is required: a .npy or .pt batch of preprocessed inputs, or a folder of images
    (resized to --input-shape, scaled to [0, 1], normalized with --mean/--std).

    \b
    Examples:
      repfuse quantize --arch repvgg_a0 --weights train.pth --calib images/ \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 -o repvgg_a0_int8.onnx
      repfuse quantize deploy.onnx --calib batch.npy --per-tensor -o deploy_int8.onnx
    """
    out, err = consoles(quiet)
    set_stage(ctx, "load")
    output_format(output, [".onnx"])
    calibration, model = early_calibration(model, int8)
    inputs = [*model.inputs, int8.calib]
    check_output_path(output, inputs=inputs, force=force)
    if json_path is not None:
        if same_file(json_path, output):
            raise click.UsageError("--json and -o name the same file; give two paths")
        check_output_path(json_path, inputs=inputs, force=True)
    source = load_model(ctx, model, err)
    result = quantize_source(ctx, source, err, int8, calibration, tol=tol)
    report = result.report
    show_int8_report(out, err, report, title=source.label)
    data = {"command": "quantize", "model": source.label, "kind": source.kind,
            "output": os.fspath(output), "written": False, "report": report.to_dict()}
    if not report.ok:
        if json_path:
            write_json(json_path, data, inputs=inputs)
        why = "non-finite outputs" if not report.finite else verdict(report)
        raise CheckFailed(f"INT8 model below target: {why}; nothing written (keep layers in "
                          "float with --keep-float auto, drop --per-tensor, or lower "
                          "--target-sqnr)")
    set_stage(ctx, "write")
    with status(err, f"writing {output}"):
        path = atomic_write(output, lambda tmp: write_onnx_proto(result.model, tmp),
                            force=force, inputs=inputs)
    data["written"] = True
    if json_path:
        write_json(json_path, data, inputs=inputs + [path])
    out.print(f"wrote {Path(path)} (INT8 QDQ, weights per "
              f"{'tensor' if int8.per_tensor else 'channel'}; {verdict(report)}"
              f"{_speed(report)})")
