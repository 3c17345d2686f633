"""The public API: ``fuse``, ``fuse_onnx``, ``verify``, ``export_onnx``, ``quantize``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

    from repfuse.fx.fuse import FuseResult
    from repfuse.onnx.pipeline import OnnxFuseResult
    from repfuse.proofs.compare import Tolerance
    from repfuse.quant.report import QuantizeResult
    from repfuse.report import VerifyReport

    Inputs = torch.Tensor | tuple[Any, ...] | list[Any]
    Tol = float | tuple[float, float] | Tolerance | dict[str, float] | None


def fuse(model: nn.Module, example_inputs: Inputs, *, verify: bool = True,
         inplace: bool = False, tol: Tol = None) -> FuseResult:
    """Fuse every linear multi-branch region of ``model`` into one conv.

    ``example_inputs``: a tensor or a tuple of tensors (used to learn shapes and for the
    checks). Returns a ``FuseResult`` with ``.model`` (the fused module, eval mode) and
    ``.report`` (a ``FuseReport``: every region fused or left alone with the reason,
    parameter counts, errors and, with ``verify=True``, per-region proofs and the
    whole-model check of outputs and input gradients; ``.ok``, ``.to_dict()``).
    ``model`` is not modified unless ``inplace=True``; a model in training mode is fused
    as its eval-mode function. ``tol``: as in ``repfuse.proofs.tolerance``.
    """
    from repfuse.fx.pipeline import fuse_torch_model
    from repfuse.proofs.modes import own_mode

    with own_mode():
        return fuse_torch_model(model, example_inputs, verify=verify, inplace=inplace,
                                tol=tol)


def fuse_onnx(model: str | os.PathLike | onnx.ModelProto, *, verify: bool = True,
              tol: Tol = None) -> OnnxFuseResult:
    """Fuse the linear regions of a training-form ONNX model (a path or a ModelProto).

    Every linear region (parallel Conv branches summed by Add/Sum, BatchNormalization
    identity branches, Conv -> BatchNormalization, scales and shifts by constants,
    AveragePool, Concat on channels, Identity, constant Pad) becomes one ``Conv``.
    External data is read only from the model's folder; broken files raise
    ``InputError``. With ``verify`` each region is proved before it is rewritten (a
    failing one is left alone) and the fused model is checked with onnxruntime (graph
    optimizations disabled) against the original on random inputs; disagreement
    raises ``VerificationError`` (its ``.report`` holds the figures). Returns a result
    with ``.model`` (``onnx.ModelProto``) and ``.report`` (``FuseReport`` with node
    counts by op type before and after).
    """
    from repfuse.onnx.pipeline import fuse_onnx_model
    from repfuse.proofs.modes import own_mode

    with own_mode():
        return fuse_onnx_model(model, verify=verify, tol=tol)


def verify(reference: nn.Module, candidate: nn.Module, example_inputs: Inputs, *,
           grads: bool = True, tol: Tol = None) -> VerifyReport:
    """Check that ``candidate`` computes what ``reference`` computes.

    Runs both models in eval mode on copies of ``example_inputs`` (a tensor or a
    tuple of tensors) and compares every output and, with ``grads=True``, the input
    gradients for one seeded random upstream gradient (autograd through both models).
    Neither model is modified. ``tol``: ``None`` (table by dtype, see
    ``repfuse.proofs.TOLERANCES``), a number, ``(atol, rtol)`` or a dict. Returns a
    ``VerifyReport`` with ``.ok``, one ``Check`` per output/gradient (max abs and
    relative error) and ``.to_dict()``.
    """
    from repfuse.heap import frozen_heap
    from repfuse.proofs.model import verify_models
    from repfuse.proofs.modes import own_mode

    with own_mode(), frozen_heap():
        return verify_models(reference, candidate, example_inputs, grads=grads, tol=tol)


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike, *,
                opset: int = 18, dynamic_batch: bool = True, check: bool = True,
                tol: Tol = None) -> VerifyReport:
    """Export ``model`` to ONNX at ``path``, atomically, checked with onnxruntime.

    Uses ``torch.onnx.export`` (the torch.export-based exporter; the TorchScript one as
    a fallback, named in the report's notes) on the model in eval mode (its mode is
    restored afterwards). With ``dynamic_batch`` the first dimension of every input is
    symbolic. With ``check`` the file is run with onnxruntime (graph optimizations
    disabled) against torch on ``example_inputs``, random inputs and, when the batch is
    dynamic, another batch size; on disagreement ``VerificationError`` is raised with
    the figures and nothing is written. Returns a ``VerifyReport``.
    """
    from repfuse.onnx.export import export_onnx as _export_onnx
    from repfuse.proofs.modes import own_mode

    with own_mode():
        return _export_onnx(model, example_inputs, path, opset=opset,
                            dynamic_batch=dynamic_batch, check=check, tol=tol)


def quantize(model: nn.Module | str | os.PathLike | onnx.ModelProto, calibration: Any, *,
             example_inputs: torch.Tensor | None = None, per_channel: bool = True,
             keep_float: str | list[str] | None = "auto", target_sqnr: float = 30.0,
             mean: list[float] | None = None, std: list[float] | None = None,
             limit: int | None = None, tol: Tol = None, latency_repeat: int = 20,
             threads: int | None = None, reduce_range: bool | None = None) -> QuantizeResult:
    """Fuse, prove and quantize ``model`` to INT8 with onnxruntime (static QDQ), with the
    doctor's report of what INT8 does to each fused layer and why.

    ``model``: a torch module in training form (fused with ``fuse(verify=True)``, a
    failed proof raises ``VerificationError``; exported with ``export_onnx``, checked), or
    an ONNX file / ``ModelProto`` (fused with ``fuse_onnx`` when it has linear regions
    left, else quantized as given). ``calibration``: real inputs, preprocessed as the
    model expects: a tensor or array batch (N, C, H, W), a ``.npy`` or ``.pt`` file
    (``torch.load(weights_only=True)``) or a folder of images (resized to the input
    shape, scaled to [0, 1], normalized with ``mean`` / ``std``); ``limit`` keeps the
    first samples. ``example_inputs`` (torch): the input for fusion and its proofs
    [default: the first calibration sample]. Weights are int8 ``per_channel`` (or per
    tensor), activations uint8, MinMax calibration. ``keep_float``: ``"auto"`` (the
    most sensitive layers stay float, greedily, until the output SQNR reaches
    ``target_sqnr`` dB), ``"none"``/``None``, or a list of torch module paths / ONNX
    node names. Latency is timed with ``latency_repeat`` runs (0: not timed) on
    ``threads`` onnxruntime threads. ``reduce_range``: 7-bit weights (onnxruntime's
    ``reduce_range``); None: only where this CPU would saturate onnxruntime's uint8 x int8
    products (x86-64 without VNNI; ``repfuse.quant.cpu``), as the report's steps say.

    Returns a ``QuantizeResult``: ``.model`` (the INT8 ``onnx.ModelProto``, QDQ form, run
    with onnxruntime on the calibration data), ``.float_model`` (the fused float model)
    and ``.report`` (``QuantizeReport``: ``.ok`` (finite outputs and output SQNR at or
    above the target), ``.layers`` (per layer under its torch module path: weight range,
    weight SQNR per tensor and per channel, the share of weights rounded to zero,
    activation range, sensitivity, kept in float), ``.outliers`` (training-form BN scales
    far above their layer's median, by branch and channel), ``.output_sqnr``,
    ``.top1_agreement``, ``.latency``, ``.steps``, ``.to_dict()``). A model whose output
    falls short of the target is returned with ``.ok`` False (the CLI writes nothing).
    """
    from repfuse.quant.pipeline import quantize_model

    return quantize_model(model, calibration, example_inputs=example_inputs,
                          per_channel=per_channel, keep_float=keep_float,
                          target_sqnr=target_sqnr, mean=mean, std=std, limit=limit, tol=tol,
                          latency_repeat=latency_repeat, threads=threads,
                          reduce_range=reduce_range)
