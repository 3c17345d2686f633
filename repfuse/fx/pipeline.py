"""``fuse`` for torch models: the fx front end fuses, proving each region before its
rewrite is kept, then the whole model is checked (``repfuse.proofs``).

The front end proper (``fx.fuse`` and below) never imports the proofs; this module (as
``repfuse.onnx.pipeline`` for ONNX) puts the two together. What ``fuse`` returns is
always proven: a region whose proof fails stays in its training form (a defect of
repfuse, reported), and a whole-model check that fails raises ``VerificationError``.
"""

from __future__ import annotations

from torch import nn

from repfuse.errors import VerificationError, first_line
from repfuse.fx.fuse import FuseResult, fuse_module
from repfuse.proofs.model import verify_models
from repfuse.proofs.region import prove_region
from repfuse.report import FuseReport
from repfuse.threads import conversion_threads


def fuse_torch_model(model: nn.Module, example_inputs, *, verify: bool = True,
                     inplace: bool = False, tol=None) -> FuseResult:
    """Fuse ``model`` (see ``repfuse.fuse``) and, with ``verify``, prove the result."""
    with conversion_threads():
        return _fuse(model, example_inputs, verify, inplace, tol)


def _fuse(model: nn.Module, example_inputs, verify: bool, inplace: bool, tol) -> FuseResult:
    def check(expr, affine, activation):
        return prove_region(expr, affine, activation, tol=tol)

    result = fuse_module(model, example_inputs, verify=verify, inplace=inplace,
                         check=check if verify else None)
    if verify:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) \
            else (example_inputs,)
        _check_model(result.report, model, result.model, tuple(args), tol)
    return result


def _check_model(report: FuseReport, model: nn.Module, fused: nn.Module, args: tuple,
                 tol) -> None:
    for region in report.fused:
        outs = [c for c in region.proofs.checks if c.name.startswith("output")] \
            or region.proofs.checks
        if outs:
            region.max_abs_err = max(c.max_abs for c in outs)
            region.max_rel_err = max(c.max_rel for c in outs)
    report.note_defects()
    try:
        report.model_checks = verify_models(model, fused, args, grads=True, tol=tol)
    except RuntimeError as err:  # e.g. the model's own in-place ops break its backward
        report.model_checks = verify_models(model, fused, args, grads=False, tol=tol)
        report.model_checks.notes.append(f"input gradients not compared: the model's "
                                         f"backward fails ({first_line(err, 200)})")
    report.verified = True
    if not report.model_checks.ok:
        worst = max(report.model_checks.failures, key=lambda c: c.max_rel)
        raise VerificationError(
            f"the fused model disagrees with the training form on the example inputs "
            f"({worst.name}: max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}; "
            f"{first_line(Exception(worst.detail), 300)}); no model returned", report=report)
