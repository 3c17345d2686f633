"""Whole-model checks: outputs and input gradients of two models on the same example
inputs (the implementation of ``repfuse.verify``), with the tolerances and comparison of
``repfuse.proofs.compare``."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from repfuse.errors import InputError
from repfuse.proofs.compare import (
    GRAD_L2_RTOL,
    SEED,
    compare,
    compare_grad,
    failed,
    least_precise,
    tolerance,
)
from repfuse.report import Check, VerifyReport


# ----------------------------------------------------------------- nested values
def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(name, leaf) pairs of a nested tuple/list/dict; names like ``output[0]['x']``."""
    if isinstance(value, (tuple, list)):
        out = []
        for i, v in enumerate(value):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}[{k!r}]")
        return out
    return [(prefix, value)]


def as_input_tuple(example_inputs) -> tuple:
    """``example_inputs`` (a tensor or a tuple/list of values) as a tuple of arguments."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, "
                     f"got {type(example_inputs).__name__}")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every module of ``models`` in eval mode; restore each one's flag afterwards, and
    the values of its buffers (a forward may update them, e.g. ``F.batch_norm`` with
    ``training=True``)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    buffers = {id(b): (b, b.detach().clone()) for model in models for b in model.buffers()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training
        with torch.no_grad():  # only the changed ones: a copy bumps autograd's version
            for b, value in buffers.values():
                if not torch.equal(b, value):
                    b.copy_(value)


def _run(model: nn.Module, args: tuple, grads: bool):
    """Run ``model`` on fresh copies of ``args``; returns (inputs needing grad, outputs)."""
    copies, leaves = [], []
    with torch.set_grad_enabled(grads):
        for a in args:
            if isinstance(a, Tensor):
                c = a.detach().clone()
                if grads and c.is_floating_point():
                    leaves.append(c.requires_grad_(True))
                    c = c.clone()   # a non-leaf: the model may modify it in place
                copies.append(c)
            else:
                copies.append(a)
        out = model(*copies)
    return leaves, out


def _input_grads(leaves: list[Tensor], outs: list[tuple[str, Any]],
                 upstream: dict[str, Tensor]) -> list:
    """Gradients w.r.t. ``leaves`` of sum <out, upstream[name]> (None where unused)."""
    pairs = [(o, upstream[n].to(o.device, o.dtype)) for n, o in outs
             if n in upstream and isinstance(o, Tensor) and o.requires_grad]
    if not pairs or not leaves:
        return [None] * len(leaves)
    return list(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                    allow_unused=True))


def verify_models(reference: nn.Module, candidate: nn.Module, example_inputs, *,
                  grads: bool = True, tol=None) -> VerifyReport:
    """Check that ``candidate`` computes what ``reference`` computes on ``example_inputs``.

    Both models run in eval mode (their training flags are restored afterwards) on
    separate copies of the inputs; neither model, nor its ``.grad`` fields, nor the
    inputs are modified. Checks: every output leaf (nested tuples/lists/dicts of
    tensors are matched by position/key), and with ``grads=True`` the gradient with
    respect to every floating input for one random upstream gradient (seeded, the same
    for both models) through autograd. A candidate whose output does not depend on an
    input through autograd (e.g. it detaches it) gets a zero gradient there and fails.
    ``tol`` as in ``tolerance``; by default from the table by dtype, and below float64
    input gradients may instead pass on their relative L2 error (``compare_grad``).
    """
    args = as_input_tuple(example_inputs)
    report = VerifyReport()
    gen = torch.Generator().manual_seed(SEED)
    with eval_mode(reference, candidate):
        # the reference first, its graph freed before the candidate runs (peak memory)
        try:
            ref_leaves, ref_out = _run(reference, args, grads)
        except Exception as e:
            raise InputError(f"the reference model fails on example_inputs: "
                             f"{type(e).__name__}: {e}") from e
        ref_flat = flatten(ref_out, "output")
        upstream = {name: torch.randn(r.shape, generator=gen, dtype=torch.float64)
                    for name, r in ref_flat if isinstance(r, Tensor) and r.is_floating_point()}
        ref_grads = _input_grads(ref_leaves, ref_flat, upstream)
        ref_flat = [(n, r.detach() if isinstance(r, Tensor) else r) for n, r in ref_flat]
        del ref_out
        try:
            cand_leaves, cand_out = _run(candidate, args, grads)
        except Exception as e:  # a candidate that crashes is a failed check
            report.checks.append(failed("output", f"candidate raised {type(e).__name__}: {e}"))
            return report
    cand_flat = flatten(cand_out, "output")
    if [n for n, _ in ref_flat] != [n for n, _ in cand_flat]:
        report.checks.append(failed("output", (
            f"output structure differs: candidate gives {[n for n, _ in cand_flat]}, "
            f"reference {[n for n, _ in ref_flat]}")))
        return report
    dtypes = []
    comparable = {}
    for (name, r), (_, c) in zip(ref_flat, cand_flat):
        if not isinstance(r, Tensor) or not isinstance(c, Tensor):
            report.checks.append(_compare_values(name, r, c))
            continue
        report.checks.append(compare(name, r, c, tol))
        dtypes.append(r.dtype)
        if name in upstream and c.is_floating_point() and r.shape == c.shape:
            comparable[name] = c
    dtype = least_precise(*dtypes) if dtypes else torch.float64
    report.dtype = str(dtype).replace("torch.", "")
    compared = {n: (r, c) for (n, r), (_, c) in zip(ref_flat, cand_flat) if n in comparable}
    grad_names: list[str] = []
    if grads and ref_leaves:
        if not report.ok:
            report.notes.append("outputs differ; input gradients compared anyway")
        cand_grads = _input_grads(cand_leaves, list(comparable.items()),
                                  {n: upstream[n] for n in comparable})
        floating = [i for i, a in enumerate(args)
                    if isinstance(a, Tensor) and a.is_floating_point()]
        names = ["input"] if len(args) == 1 else [f"input[{i}]" for i in floating]
        grad_names = [f"grad {name}" for name in names]
        for name, leaf, rg, cg in zip(names, ref_leaves, ref_grads, cand_grads):
            rg = torch.zeros_like(leaf) if rg is None else rg
            check = compare_grad(f"grad {name}", rg,
                                 torch.zeros_like(leaf) if cg is None else cg, tol)
            if cg is None:
                check.detail = (f"candidate's outputs do not depend on {name} through "
                                f"autograd; " + check.detail).rstrip("; ")
            else:
                compared[f"grad {name}"] = (rg, cg)
            report.checks.append(check)
    if tol is None and dtype in ROUNDING_FACTOR and not report.ok:
        _judge_by_float64(report, reference, args, upstream, compared, grad_names, dtype)
    return report


#: Below float32 a deep model's own rounding can exceed the table's tolerance (repvgg_a0
#: in bfloat16 differs from itself in float64 by ~8 % of its output range). A check that
#: fails there is judged again against the reference (the training form) run in float64:
#: it passes when the candidate's (the fused model's) error is at most this factor times
#: the reference's own error in its dtype: the fused model is not less accurate than the
#: model it replaces. Fusion errors themselves are caught by the per-region proofs, which
#: run in float64.
ROUNDING_FACTOR: dict[torch.dtype, float] = {torch.float16: 2.0, torch.bfloat16: 2.0}


def _judge_by_float64(report: VerifyReport, reference: nn.Module, args: tuple, upstream: dict,
                      compared: dict, grad_names: list[str], dtype: torch.dtype) -> None:
    """Re-judge the failed checks of a float16/bfloat16 comparison against a float64
    copy of ``reference`` (see ``ROUNDING_FACTOR``); the detail gives both errors.
    ``grad_names``: the input-gradient checks, one per floating input, in order."""
    failing = [c for c in report.checks if not c.ok and c.name in compared]
    if not failing or len(failing) != len([c for c in report.checks if not c.ok]):
        return      # a structural failure (shape, non-tensor output) stays a failure
    try:
        ref64 = copy.deepcopy(reference).double()
    except Exception as e:  # noqa: BLE001 - a model that cannot be copied keeps its verdict
        report.notes.append(f"no float64 copy of the reference to judge rounding against "
                            f"({type(e).__name__}: {e})")
        return
    args64 = tuple(a.detach().double() if isinstance(a, Tensor) and a.is_floating_point()
                   else a for a in args)
    with eval_mode(ref64):
        leaves, out = _run(ref64, args64, bool(grad_names))
        flat = flatten(out, "output")
        truth = {n: t.detach() for n, t in flat if isinstance(t, Tensor)}
        if grad_names and leaves:
            g64 = _input_grads(leaves, flat, upstream)
            truth.update({n: g for n, g in zip(grad_names, g64) if g is not None})
    del ref64
    factor = ROUNDING_FACTOR[dtype]
    for check in failing:
        if check.name not in truth:
            continue
        r, c = (t.detach().to(torch.float64) for t in compared[check.name])
        exact = truth[check.name].to(torch.float64)
        if check.name.startswith("grad "):   # relative L2 (isolated ReLU-kink flips)
            norm = max(float(exact.norm()), torch.finfo(torch.float64).tiny)
            e_ref, e_cand = float((r - exact).norm()) / norm, float((c - exact).norm()) / norm
            budget, kind = max(factor * e_ref, GRAD_L2_RTOL[dtype]), "relative L2 error"
        else:
            e_ref = float((r - exact).abs().max())
            e_cand = float((c - exact).abs().max())
            t = tolerance(dtype)
            budget = max(factor * e_ref, t.atol + t.rtol * float(exact.abs().max()))
            kind = "max abs error"
        verdict = (f"against the reference run in float64 the candidate's {kind} is "
                   f"{e_cand:.3g}, the reference's own in {report.dtype} {e_ref:.3g}")
        if math.isfinite(e_cand) and e_cand <= budget:
            check.ok = True
            check.detail = f"passed on rounding: {verdict}; elementwise: {check.detail}"
        else:
            check.detail = f"{verdict} (more than {factor:g}x); {check.detail}"


def _compare_values(name: str, r, c) -> Check:
    """Non-tensor output leaves: equal type and value."""
    try:
        same = type(r) is type(c) and bool(r == c)
    except Exception:
        same = False
    inf = float("inf")
    return Check(name, 0.0 if same else inf, 0.0 if same else inf, 0.0, 0.0, same,
                 "" if same else f"{c!r} != reference {r!r}")
