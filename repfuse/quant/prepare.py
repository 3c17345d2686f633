"""From what the user gives to a fused, proven float ONNX model ready to quantize.

A torch module (training form) is fused and proven (``repfuse.fuse`` with its proofs; a
failed proof raises ``VerificationError``), then exported as ``repfuse.export_onnx`` does
(checked with onnxruntime against torch). An ONNX model is fused with ``repfuse.fuse_onnx`` when it
still has linear regions (each proven, the result checked with onnxruntime). Either way
the BatchNorm scales of the branches each fused layer came from are kept for the doctor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnx
import torch

from repfuse.errors import InputError, VerificationError
from repfuse.fx.pipeline import fuse_torch_model
from repfuse.onnx.export import export_checked
from repfuse.onnx.io import load_onnx
from repfuse.onnx.pipeline import fuse_onnx_model
from repfuse.quant.bnscale import BranchScales, onnx_branch_scales, torch_branch_scales
from repfuse.quant.calibration import Calibration, load_calibration
from repfuse.quant.qdq import quantized_ops
from repfuse.report import FuseReport


@dataclass
class Prepared:
    """The fused float model and what the doctor needs to know of its origin."""

    proto: onnx.ModelProto
    label: str
    calibration: Calibration
    fused_module: torch.nn.Module | None = None
    fuse_report: FuseReport | None = None
    steps: list[str] = field(default_factory=list)
    #: fused layer (torch module path, or ONNX node name) -> its branches' BN scales
    branch_scales: dict[str, list[BranchScales]] = field(default_factory=dict)


def _failure(report: FuseReport) -> str:
    failures = [c for r in report.regions if r.proofs is not None for c in r.proofs.failures]
    failures += report.model_checks.failures if report.model_checks is not None else []
    if not failures:
        return "see the report"
    worst = max(failures, key=lambda c: c.max_rel)
    return f"{worst.name}: max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}"


def _fused_text(report: FuseReport) -> str:
    split = f", {len(report.split)} fused in parts" if report.split else ""
    return f"{len(report.fused)} region(s) fused{split}, {len(report.skipped)} left alone"


def _example(example_inputs, calibration: Calibration) -> torch.Tensor:
    if example_inputs is None:
        return torch.from_numpy(calibration.data[:1].copy())
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise InputError("example_inputs must be one tensor: INT8 calibration supports models "
                         "with one input")
    return args[0]


_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized",
                      "torch.ao.nn.intrinsic.quantized", "torch.ao.quantization.fake_quantize")


def _check_torch_model(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if type(module).__module__.startswith(_QUANTIZED_MODULES):
            raise InputError(f"the model is already quantized (module '{name or '(root)'}' is "
                             f"{type(module).__module__}.{type(module).__name__}); give the "
                             "float training-form model")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_quantized or t.dtype in (torch.qint8, torch.quint8, torch.qint32):
            raise InputError(f"the model is already quantized (tensor '{name}' is "
                             f"{t.dtype}); give the float training-form model")


def prepare_torch(model: torch.nn.Module, calibration, example_inputs, *, mean=None, std=None,
                  limit=None, tol=None) -> Prepared:
    """Fuse and prove ``model``, export the fused model to ONNX (checked)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, a path or an onnx.ModelProto, "
                         f"got {type(model).__name__}")
    _check_torch_model(model)
    shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else None
    calib = load_calibration(calibration, shape, mean=mean, std=std, limit=limit)
    x = _example(example_inputs, calib)
    calib = load_calibration(calib, tuple(x.shape))
    # the proofs differentiate: the same verdict whatever the caller's grad mode
    with torch.inference_mode(False), torch.enable_grad():
        return _fuse_and_export(model, x.detach().clone(), calib, tol)


def _fuse_and_export(model: torch.nn.Module, x: torch.Tensor, calib: Calibration,
                     tol) -> Prepared:
    result = fuse_torch_model(model, x, verify=True, tol=tol)
    report = result.report
    if not report.ok:
        raise VerificationError(f"the fused model disagrees with the training form "
                                f"({_failure(report)}); nothing quantized", report=report)
    label = f"{type(model).__name__} (torch module)"
    steps = [f"fused and proved: {_fused_text(report)}"]
    proto, exported = export_checked(result.model, (x.to(torch.float32),), tol=tol,
                                     where="the fused model's ONNX export")
    steps.append(f"exported with {exported.notes[0]}, checked with onnxruntime against torch")
    scales = {r.path: torch_branch_scales(model, r.sources) for r in report.fused}
    return Prepared(proto, label, calib, result.model, report, steps,
                    {k: v for k, v in scales.items() if v})


def _static_shape(proto: onnx.ModelProto) -> tuple | None:
    """The input shape the calibration must match (batch 1), or None when a non-batch
    dimension is symbolic (then any shape the model runs on is accepted)."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"the model has {len(inputs)} inputs; INT8 calibration supports "
                         "models with one input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if not shape or any(d is None for d in shape[1:]):
        return None
    return (1, *shape[1:])


def prepare_onnx(model, calibration, *, mean=None, std=None, limit=None,
                 tol=None) -> Prepared:
    """Load ``model`` (path or ModelProto); fuse it with ``fuse_onnx`` when it has linear
    regions left."""
    proto, source = load_onnx(model)
    found = quantized_ops(proto)
    if found:
        raise InputError(f"{source} is already quantized (it has {', '.join(found)} nodes); "
                         "give the float model")
    calib = load_calibration(calibration, _static_shape(proto), mean=mean, std=std,
                             limit=limit)
    result = fuse_onnx_model(proto, verify=True, tol=tol)
    report = result.report
    label = f"{os.path.basename(source)} (ONNX)" if source != "ONNX model" else source
    if not report.fused:
        return Prepared(proto, label, calib, None, report,
                        ["no linear regions left to fuse: quantized as given"])
    steps = [f"fused with fuse_onnx and proved: {_fused_text(report)}; checked with "
             "onnxruntime against the original"]
    scales = {r.node: onnx_branch_scales(proto, r.sources) for r in report.fused}
    return Prepared(result.model, label, calib, None, report, steps,
                    {k: v for k, v in scales.items() if v})


def prepare(model, calibration, *, example_inputs=None, mean=None, std=None, limit=None,
            tol=None) -> Prepared:
    """``prepare_torch`` or ``prepare_onnx`` by the kind of ``model``."""
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        if example_inputs is not None:
            raise InputError("example_inputs is for torch models; an ONNX model declares its "
                             "input shape")
        return prepare_onnx(model, calibration, mean=mean, std=std, limit=limit, tol=tol)
    return prepare_torch(model, calibration, example_inputs, mean=mean, std=std, limit=limit,
                         tol=tol)

