"""``fuse`` for torch models: the fx front end fuses, proving each region before its
rewrite is kept, then the whole model is checked (``repfuse.proofs``).

The front end proper (``fx.fuse`` and below) never imports the proofs; this module (as
``repfuse.onnx.pipeline`` for ONNX) puts the two together. What ``fuse`` returns is
always proven: a region whose proof fails stays in its training form (a defect of
repfuse, reported), and a whole-model check that fails raises ``VerificationError``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from repfuse import region as rg
from repfuse.errors import VerificationError, first_line
from repfuse.fx.fuse import FuseResult, fuse_module
from repfuse.heap import frozen_heap
from repfuse.proofs.exact import float64_copy
from repfuse.proofs.model import verify_float64, verify_models
from repfuse.proofs.modes import own_mode
from repfuse.proofs.region import prove_region, reduce_for_proof
from repfuse.report import FuseReport
from repfuse.threads import conversion_threads


def fuse_torch_model(model: nn.Module, example_inputs, *, verify: bool = True,
                     inplace: bool = False, tol=None) -> FuseResult:
    """Fuse ``model`` (see ``repfuse.fuse``) and, with ``verify``, prove the result."""
    with conversion_threads(), frozen_heap():
        return _fuse(model, example_inputs, verify, inplace, tol)


def _fuse(model: nn.Module, example_inputs, verify: bool, inplace: bool, tol) -> FuseResult:
    def check(expr, affine, activation):
        return prove_region(expr, affine, activation, tol=tol)

    result = fuse_module(model, example_inputs, verify=verify, inplace=inplace,
                         check=check if verify else None,
                         reducer=reduce_for_proof if verify else None)
    if verify:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) \
            else (example_inputs,)
        _check_model(result.report, model, result.model, tuple(args), tol, result.kernels)
    result.kernels = []     # they hold the training form's tensors: not kept past the check
    return result


def _check_model(report: FuseReport, model: nn.Module, fused: nn.Module, args: tuple,
                 tol, exact: list[tuple[str, rg.Node]]) -> None:
    for region in report.fused:
        outs = [c for c in region.proofs.checks if c.name.startswith("output")] \
            or region.proofs.checks
        if outs:
            region.max_abs_err = max(c.max_abs for c in outs)
            region.max_rel_err = max(c.max_rel for c in outs)
    report.note_defects()
    truth: dict = {}    # the training form's float64 run, when the check makes it
    try:
        report.model_checks = verify_models(model, fused, args, grads=True, tol=tol,
                                            truth=truth)
    except RuntimeError as err:  # e.g. the model's own in-place ops break its backward
        truth.clear()
        report.model_checks = verify_models(model, fused, args, grads=False, tol=tol,
                                            truth=truth)
        report.model_checks.notes.append(f"input gradients not compared: the model's "
                                         f"backward fails ({first_line(err, 200)})")
    report.verified = True
    if not report.model_checks.ok and tol is None:
        _judge_by_exact_kernels(report, model, fused, args, exact, truth or None)
    if not report.model_checks.ok:
        worst = max(report.model_checks.failures, key=lambda c: c.max_rel)
        raise VerificationError(
            f"the fused model disagrees with the training form on the example inputs "
            f"({worst.name}: max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}; "
            f"{first_line(Exception(worst.detail), 300)}); no model returned", report=report)


def _judge_by_exact_kernels(report: FuseReport, model: nn.Module, fused: nn.Module,
                            args: tuple, exact: list[tuple[str, rg.Node]],
                            truth: dict | None = None) -> None:
    """A whole-model check that failed in the model's dtype, judged once more: the fused
    model's stored weights must be exactly its proven float64 kernels cast to its dtype,
    and the fused structure run in float64 with those exact kernels must match the
    training form run in float64 to the float64 tolerances. Then every region and the
    wiring are proven, and what differs as run is the rounding of the stored weights,
    which this input amplifies (through a discrete selection such as TopK, whose near-ties
    a rounding flips, or an ill-conditioned path): the failed checks pass, with a note.
    With a user tolerance, or when any of this does not hold, the verdict stands.
    ``truth``: the training form's float64 run the check made (``verify_models``), reused."""
    checks = report.model_checks
    if not exact or any(not math.isfinite(c.max_abs) for c in checks.failures) or any(
            not math.isfinite(r.cast_error) for r in report.fused):
        return
    try:
        with own_mode():
            fused64 = float64_copy(fused)
            for path, expr in exact:
                stored = fused.get_submodule(path)
                kernel = dataclasses.replace(rg.reduce(expr), dtype=torch.float64).to_module()
                if not _stores(stored, kernel):
                    return
                fused64.get_submodule(path).load_state_dict(kernel.state_dict())
        grads = any(c.name.startswith("grad ") for c in checks.checks)
        exact_checks = verify_float64(model, fused64, args, grads=grads, truth=truth)
    except Exception as err:  # noqa: BLE001 - the verdict stands
        checks.notes.append(f"the fused structure could not be run with exact kernels "
                            f"({type(err).__name__}: {first_line(err, 200)})")
        return
    if not exact_checks.ok:
        return
    worst = max(exact_checks.checks, key=lambda c: c.max_rel, default=None)
    figures = f"max rel {worst.max_rel:.3g}" if worst else "no checks"
    checks.notes = [n for n in checks.notes    # the outputs no longer differ
                    if not n.startswith("outputs differ; input gradients compared")]
    for c in checks.failures:
        c.ok = True
        c.detail = (f"passed: the fused structure with its exact float64 kernels matches the "
                    f"training form run in float64 ({figures}); as run, rounding the fused "
                    f"weights to {checks.dtype} moves this check; " + c.detail)
    checks.notes.append(
        f"outputs or input gradients differ from the training form's beyond the "
        f"{checks.dtype} criterion at this input, but the fused model's weights are exactly "
        f"its proven float64 kernels cast to {checks.dtype}, and with the exact kernels the "
        f"fused structure matches the training form run in float64 ({figures}): the "
        f"difference is the rounding of the stored weights, amplified by the model at this "
        f"input (a discrete selection such as TopK whose near-tie the rounding flips, or "
        f"an ill-conditioned path)")


def _stores(stored: nn.Module, kernel: nn.Module) -> bool:
    """Whether ``stored`` holds exactly ``kernel``'s (float64) values cast to its dtype."""
    want, have = kernel.state_dict(), stored.state_dict()
    return want.keys() == have.keys() and all(
        torch.equal(want[k].to(have[k].dtype), have[k]) for k in want)
