"""``export_onnx``: torch -> ONNX with the current exporter, checked with onnxruntime
against torch, written atomically (nothing is written when the check fails)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np
import onnx
import torch

from repfuse.errors import InputError, VerificationError, first_line
from repfuse.onnx.io import save_onnx
from repfuse.onnx.runtime import compare_outputs, ort_reason, ort_session
from repfuse.proofs.model import as_input_tuple, eval_mode, flatten
from repfuse.report import VerifyReport


# ---------------------------------------------------------------------------- export
def _opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings and log records (library code never prints)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_proto(model, args: tuple, opset: int, dynamic_batch: bool) -> tuple:
    """``(proto, how)``: the torch.export-based exporter for opset >= 18 (it emits 18 and
    would have to convert down otherwise), the TorchScript exporter below that or when
    the first one fails."""
    if opset >= 18:
        shapes = tuple({0: "batch"} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                       for a in args)
        return _export_dynamo(model, args, opset, dynamic_batch, shapes)
    reason = f"it emits opset 18 and converting down to {opset} fails on common models"
    return _export_torchscript(model, args, opset, dynamic_batch, reason)


def _export_dynamo(model, args: tuple, opset: int, dynamic_batch: bool, shapes) -> tuple:
    try:
        with _quiet():
            program = torch.onnx.export(
                model, args, None, dynamo=True, verbose=False, opset_version=opset,
                dynamic_shapes=shapes if dynamic_batch else None, external_data=False)
        proto = program.model_proto
        got = _opset(proto)
        if got == opset:
            return proto, f"torch.onnx.export (dynamo), opset {opset}"
        reason = f"it produced opset {got} (its version converter failed)"
    except Exception as exc:  # noqa: BLE001 - any exporter failure falls back
        reason = f"{type(exc).__name__}: {first_line(exc)}"
    return _export_torchscript(model, args, opset, dynamic_batch, reason)


def _export_torchscript(model, args: tuple, opset: int, dynamic_batch: bool,
                        reason: str) -> tuple:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    names = [f"input_{i}" for i in range(len(tensors))]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    buf = io.BytesIO()
    try:
        with _quiet():
            torch.onnx.export(model, args, buf, dynamo=False, verbose=False,
                              opset_version=opset, input_names=names, dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"torch.onnx.export failed for {type(model).__name__}: {reason}; "
                         f"TorchScript exporter: {type(exc).__name__}: {exc}") from None
    proto = onnx.load_from_string(buf.getvalue())
    return proto, f"torch.onnx.export (TorchScript; not the dynamo exporter: {reason}), " \
                  f"opset {opset}"


def _torch_outputs(model, args: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*args)
    return [v.detach().cpu().numpy() for _, v in flatten(out) if isinstance(v, torch.Tensor)]


def _feeds(session, args: tuple) -> dict:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise InputError(f"the exported graph has {len(names)} inputs but example_inputs "
                         f"hold {len(tensors)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def _random_like(args: tuple, batch: int | None, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            shape = list(a.shape)
            if batch is not None and shape:
                shape[0] = batch
            out.append(torch.randn(shape, generator=gen, dtype=a.dtype))
        else:
            out.append(a)
    return tuple(out)


def check_export(model, args: tuple, proto: onnx.ModelProto, *, dynamic_batch: bool,
                 tol=None) -> VerifyReport:
    """onnxruntime (no graph optimizations) against torch on ``args``, random inputs of
    the same shape and, when the batch is dynamic, random inputs of another batch size."""
    try:
        session = ort_session(proto)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        half = sorted({str(t.dtype).replace("torch.", "") for t in (*model.parameters(), *args)
                       if isinstance(t, torch.Tensor)
                       and t.dtype in (torch.float16, torch.bfloat16)})
        hint = (f"the model is in {'/'.join(half)}, which onnxruntime's CPU kernels do not "
                "all support: export a float32 copy (model.float()), write .pt2 or "
                ".safetensors instead, or skip the check (check=False, CLI --no-verify)"
                if half else "skip the check with check=False (CLI --no-verify)")
        raise InputError(f"onnxruntime cannot run the exported model ({ort_reason(exc)}); "
                         f"{hint}") from None
    report = VerifyReport(notes=["torch vs onnxruntime, graph optimizations disabled"])
    cases = [("example inputs", args), ("random inputs", _random_like(args, None, 1))]
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if dynamic_batch and first is not None:
        batch = int(first.shape[0]) + 1
        cases.append((f"random inputs, batch {batch}", _random_like(args, batch, 2)))
    for label, case in cases:
        report.checks += compare_outputs(label, _torch_outputs(model, case),
                                         session.run(None, _feeds(session, case)), tol)
    return report


def export_checked(model, example_inputs, *, opset: int = 18, dynamic_batch: bool = True,
                   check: bool = True, tol=None, where: str = "the ONNX export"
                   ) -> tuple[onnx.ModelProto, VerifyReport]:
    """Export ``model`` (in eval mode) to an ``onnx.ModelProto``, checked with onnxruntime
    against torch; nothing is written. Raises ``VerificationError`` (with the report) when
    the check fails. Returns ``(proto, report)``; the checks are empty when not ``check``."""
    args = as_input_tuple(example_inputs)
    if not isinstance(opset, int) or not 7 <= opset <= 23:
        raise InputError(f"opset={opset!r} must be an int between 7 and 23")
    with eval_mode(model):
        proto, how = _export_proto(model, args, opset, dynamic_batch)
        report = VerifyReport(notes=[how])
        if check:
            checked = check_export(model, args, proto, dynamic_batch=dynamic_batch, tol=tol)
            report.checks, report.notes = checked.checks, report.notes + checked.notes
    if not report.ok:
        worst = max(report.failures, key=lambda c: c.max_rel)
        raise VerificationError(
            f"{where}: the ONNX export disagrees with torch ({worst.name}: max abs "
            f"{worst.max_abs:.3g}, max rel {worst.max_rel:.3g}, rtol {worst.rtol:.3g}); "
            "nothing written", report=report)
    return proto, report


def export_onnx(model, example_inputs, path, *, opset: int = 18, dynamic_batch: bool = True,
                check: bool = True, tol=None) -> VerifyReport:
    """Export ``model`` (in eval mode) to ONNX at ``path``, checked with onnxruntime.

    Nothing is written when the check fails (``VerificationError`` with the figures);
    the file appears atomically. Returns the checks (empty when ``check=False``)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: folder {folder} does not exist")
    proto, report = export_checked(model, example_inputs, opset=opset,
                                   dynamic_batch=dynamic_batch, check=check, tol=tol,
                                   where=os.fspath(path))
    save_onnx(proto, path)
    report.notes.append(f"written to {os.path.abspath(os.fspath(path))}")
    return report
