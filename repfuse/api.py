"""The public API: ``fuse``, ``fuse_onnx``, ``verify``, ``export_onnx``."""

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
    from repfuse.proofs.model import verify_models
    from repfuse.proofs.modes import own_mode

    with own_mode():
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
