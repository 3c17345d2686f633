"""The INT8 options ``quantize`` and ``inspect --int8`` share (one ``Int8Spec``), and the
step behind both: calibration data in, ``repfuse.quantize`` on the loaded model."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass

import click

import repfuse
from repfuse.cli.context import set_stage
from repfuse.cli.render import status
from repfuse.cli.source import Source
from repfuse.cli.spec import ModelSpec
from repfuse.errors import InputError

#: Calibration samples used unless --calib-limit says otherwise.
DEFAULT_CALIB_LIMIT = 256


@dataclass(frozen=True)
class Int8Spec:
    """How to quantize, as the user gave it."""

    calib: str | None = None
    per_tensor: bool = False
    keep_float: str | tuple[str, ...] = "auto"
    target_sqnr: float = 30.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    calib_limit: int = DEFAULT_CALIB_LIMIT
    reduce_range: bool | None = None


def _floats(ctx, param, value):
    if value is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers like 0.485,0.456,0.406") from None


def _keep(ctx, param, value):
    if value in ("auto", "none"):
        return value
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise click.BadParameter("give auto, none, or layer names separated by commas")
    return names


_DECORATORS = [
    click.option("--calib", metavar="PATH", type=click.Path(exists=True),
                 help="Calibration data (required): a .npy / .pt batch of preprocessed inputs "
                      "(N,C,H,W), or a folder of images resized to --input-shape."),
    click.option("--per-tensor", is_flag=True,
                 help="One INT8 scale per weight tensor [default: one per output channel]."),
    click.option("--keep-float", default="auto", show_default=True, callback=_keep,
                 metavar="auto|none|NAME,...",
                 help="Layers left in float: auto (the most sensitive first, until the output "
                      "SQNR reaches --target-sqnr), none, or module paths / ONNX node names."),
    click.option("--target-sqnr", type=float, default=30.0, show_default=True, metavar="DB",
                 help="Output SQNR (dB) the INT8 model must reach against the float model on "
                      "the calibration data; below it nothing is written."),
    click.option("--mean", callback=_floats, metavar="M[,M,M]",
                 help="Images: per-channel mean subtracted after scaling pixels to [0, 1]."),
    click.option("--std", callback=_floats, metavar="S[,S,S]",
                 help="Images: per-channel standard deviation dividing them after --mean."),
    click.option("--calib-limit", type=click.IntRange(min=1), default=DEFAULT_CALIB_LIMIT,
                 show_default=True, metavar="N", help="Use at most N calibration samples."),
    click.option("--reduce-range/--full-range", default=None,
                 help="7-bit / 8-bit INT8 weights [default: 7-bit only where this CPU "
                      "(x86-64 without VNNI) saturates onnxruntime's uint8 x int8 products]."),
]
_FIELDS = ("calib", "per_tensor", "keep_float", "target_sqnr", "mean", "std", "calib_limit",
           "reduce_range")


def int8_options(fn):
    """Add the INT8 options to a command; it receives them as ``int8: Int8Spec``."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        spec = Int8Spec(**{k: kwargs.pop(k) for k in _FIELDS})
        return fn(*args, int8=spec, **kwargs)

    for dec in reversed(_DECORATORS):
        command = dec(command)
    return command


def require_calibration(spec: Int8Spec) -> None:
    if spec.calib is None:
        raise InputError("--calib is required: give a .npy / .pt batch of real inputs or a "
                         "folder of images (random calibration data gives meaningless scales)")


def early_calibration(model: ModelSpec, spec: Int8Spec):
    """``(calibration, model)``: an array file is read before the model, and gives a torch
    model without --input-shape its input shape; a folder of images is read later, resized
    to the loaded model's input shape (calibration None)."""
    require_calibration(spec)
    if os.path.isdir(spec.calib):
        return None, model
    if spec.mean is not None or spec.std is not None:
        raise click.UsageError("--mean/--std normalize a folder of images; a calibration "
                               "array must already hold the model's inputs")
    from repfuse.quant.calibration import load_calibration

    shape = model.input_shape if not model.is_onnx else None
    calibration = load_calibration(spec.calib, shape, limit=spec.calib_limit)
    if model.input_shape is None and not model.is_onnx:
        model = dataclasses.replace(model, input_shape=(1, *calibration.data.shape[1:]))
    return calibration, model


def quantize_source(ctx, source: Source, err, spec: Int8Spec, calibration=None, *, tol=None,
                    latency_repeat: int = 20):
    """``repfuse.quantize`` on the loaded model (stage ``quantize``), calibrated on
    ``calibration`` or, when None, on the folder of images resized to its input shape."""
    from repfuse.quant.calibration import load_calibration

    if calibration is None:
        calibration = load_calibration(spec.calib, source.input_shape, mean=spec.mean,
                                       std=spec.std, limit=spec.calib_limit)
    for note in calibration.notes:
        err.print(f"[yellow]note:[/yellow] calibration: {note}")
    set_stage(ctx, "quantize")
    keep = list(spec.keep_float) if isinstance(spec.keep_float, tuple) else spec.keep_float
    with status(err, "fusing, proving, calibrating and running the INT8 doctor"):
        return repfuse.quantize(source.model, calibration, per_channel=not spec.per_tensor,
                                keep_float=keep, target_sqnr=spec.target_sqnr, tol=tol,
                                latency_repeat=latency_repeat,
                                reduce_range=spec.reduce_range)
