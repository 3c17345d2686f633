"""Equivalence proofs: tolerances, numerical comparisons and whole-model checks.

One table of tolerances by dtype (``TOLERANCES``), one comparison (``compare``)
that every proof uses, and ``verify_models``: outputs and input gradients of two
models on the same example inputs (the implementation of ``repfuse.verify``).
Per-region proofs (outputs, input gradients and the weight-gradient mapping of
one fused region, computed with the ``repfuse.core`` kernels) are in
``repfuse.proofs_region`` and re-exported here as ``prove_region``.

Error figures (reported for every check):

* ``max_abs = max |candidate - reference|`` over all elements;
* ``max_rel = max_abs / max(max |reference|, tiny)``: the largest error relative to
  the largest reference magnitude. Unlike an elementwise ratio it does not blow up
  where the reference is (close to) zero, so it is robust on real activations.

A check passes when ``max_abs <= atol + rtol * max |reference|``. Comparisons are
computed in float64; the tolerance is that of the less precise of the two dtypes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from repfuse.errors import InputError
from repfuse.report import Check, VerifyReport


class Tolerance(NamedTuple):
    """Absolute and relative tolerance: pass iff max_abs <= atol + rtol * max|reference|."""

    atol: float
    rtol: float


#: The one table of tolerances, by dtype. float64 is what the per-region proofs run in
#: (exact arithmetic up to summation-order rounding); the others cover models run in
#: their own dtype, where the fused and the training form round differently.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-4),
    torch.float16: Tolerance(atol=1e-3, rtol=1e-2),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=5e-2),
}

#: Whole-model input gradients below float64: the largest relative L2 error
#: ||candidate - reference|| / ||reference|| accepted when the elementwise criterion
#: fails. The input gradient of a ReLU network is discontinuous: rounding differences of
#: the order of the output tolerance flip the few units whose pre-activation lies within
#: rounding of zero, which changes single gradient entries by O(1) (measured on repvgg_b3
#: and mobileone_s0 at 224x224 in float32: 0.2-0.5% relative L2, up to 2% elementwise,
#: the same as the training form in float32 against itself in float64). Detached inputs,
#: missing branches or wrong backward passes give errors of order 1 and still fail.
GRAD_L2_RTOL: dict[torch.dtype, float] = {
    torch.float32: 5e-2,
    torch.float16: 2e-1,
    torch.bfloat16: 3e-1,
}

_PRECISION_ORDER = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: Seed of the random upstream gradients and probe inputs (proofs are reproducible).
SEED = 0


def tolerance(dtype: torch.dtype = torch.float32, tol=None) -> Tolerance:
    """The tolerance for ``dtype``, or the one ``tol`` asks for.

    ``tol`` may be ``None`` (the table entry for ``dtype``), a number (used as both
    atol and rtol), a pair ``(atol, rtol)``, a ``Tolerance`` or a dict with keys
    ``atol``/``rtol`` (a missing key falls back to the table).
    """
    base = TOLERANCES.get(dtype)
    if base is None:
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            base = Tolerance(0.0, 0.0)
        else:
            raise InputError(f"tolerance: no tolerance for dtype={dtype}; pass tol=(atol, rtol)")
    if tol is None:
        return base
    if isinstance(tol, Tolerance):
        return tol
    if isinstance(tol, bool):
        raise InputError(f"tol={tol!r} must be a number, (atol, rtol) or a dict")
    if isinstance(tol, (int, float)):
        return _checked(Tolerance(float(tol), float(tol)))
    if isinstance(tol, dict):
        unknown = set(tol) - {"atol", "rtol"}
        if unknown:
            raise InputError(f"tol has unknown keys {sorted(unknown)}; use 'atol' and 'rtol'")
        return _checked(Tolerance(float(tol.get("atol", base.atol)),
                                  float(tol.get("rtol", base.rtol))))
    if isinstance(tol, (tuple, list)) and len(tol) == 2:
        return _checked(Tolerance(float(tol[0]), float(tol[1])))
    raise InputError(f"tol={tol!r} must be a number, (atol, rtol) or a dict")


def _checked(t: Tolerance) -> Tolerance:
    if not (t.atol >= 0 and t.rtol >= 0):
        raise InputError(f"tol={tuple(t)} must be non-negative")
    return t


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise floating dtype among ``dtypes`` (float64 if none is floating)."""
    worst = torch.float64
    for d in dtypes:
        if d in _PRECISION_ORDER and _PRECISION_ORDER.index(d) > _PRECISION_ORDER.index(worst):
            worst = d
    return worst


def compare(name: str, reference: Tensor, candidate: Tensor, tol=None) -> Check:
    """Compare ``candidate`` with ``reference``; return a ``Check`` with every figure.

    ``max_abs = max |candidate - reference|``; ``max_rel = max_abs / max(max|reference|,
    tiny)``. Passes iff shapes match, non-finite values sit at the same places with the
    same values, and ``max_abs <= atol + rtol * max|reference|``. ``tol`` as in
    ``tolerance``; ``None`` takes the table entry of the less precise dtype.
    """
    t = tolerance(least_precise(reference.dtype, candidate.dtype), tol)
    if tuple(reference.shape) != tuple(candidate.shape):
        return Check(name, float("inf"), float("inf"), t.atol, t.rtol, False,
                     f"shape {tuple(candidate.shape)} != reference {tuple(reference.shape)}")
    a = reference.detach().to(torch.float64)
    b = candidate.detach().to(a.device, torch.float64)
    if a.numel() == 0:
        return Check(name, 0.0, 0.0, t.atol, t.rtol, True, "empty")
    detail = ""
    max_abs = float(torch.linalg.vector_norm(a - b, float("inf")))
    lo, hi = torch.aminmax(a)
    scale = max(-float(lo), float(hi))
    if not (math.isfinite(max_abs) and math.isfinite(scale)):   # rare: inspect non-finites
        finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
        same_nonfinite = (a == b) | (torch.isnan(a) & torch.isnan(b))
        bad_nonfinite = (finite_a != finite_b) | (~finite_a & ~finite_b & ~same_nonfinite)
        if bool(bad_nonfinite.any()):
            count = int(bad_nonfinite.sum())
            return Check(name, float("inf"), float("inf"), t.atol, t.rtol, False,
                         f"{count} element(s) non-finite in only one of the two (or different)")
        both = finite_a & finite_b
        detail = f"{int((~both).sum())} matching non-finite element(s) ignored"
        a, b = a[both], b[both]
        if a.numel() == 0:
            return Check(name, 0.0, 0.0, t.atol, t.rtol, True, detail)
        max_abs = float((a - b).abs().max())
        scale = float(a.abs().max())
        if not (math.isfinite(max_abs) and math.isfinite(scale)):
            return Check(name, float("inf"), float("inf"), t.atol, t.rtol, False,
                         "difference overflows float64")
    max_rel = max_abs / max(scale, torch.finfo(torch.float64).tiny)
    ok = max_abs <= t.atol + t.rtol * scale
    if not ok and not detail:
        where = int((a - b).abs().argmax())
        detail = f"worst at flat index {where}: reference {a.flatten()[where].item():.6g}, " \
                 f"candidate {b.flatten()[where].item():.6g}"
    return Check(name, max_abs, max_rel, t.atol, t.rtol, ok, detail)


def compare_grad(name: str, reference: Tensor, candidate: Tensor, tol=None) -> Check:
    """``compare`` for whole-model input gradients: below float64 (and with ``tol``
    None) a check that fails elementwise still passes when the relative L2 error is at
    most ``GRAD_L2_RTOL`` of the dtype; the detail then says so and gives the figure."""
    check = compare(name, reference, candidate, tol)
    dtype = least_precise(reference.dtype, candidate.dtype)
    if check.ok or tol is not None or dtype not in GRAD_L2_RTOL \
            or tuple(reference.shape) != tuple(candidate.shape):
        return check
    a = reference.detach().to(torch.float64)
    b = candidate.detach().to(a.device, torch.float64)
    norm = float(a.norm())
    l2 = float((a - b).norm()) / max(norm, torch.finfo(torch.float64).tiny)
    if math.isfinite(l2) and l2 <= GRAD_L2_RTOL[dtype]:
        check.ok = True
        check.detail = (f"passed on relative L2 error {l2:.3g} <= {GRAD_L2_RTOL[dtype]:g} "
                        f"({dtype}: isolated ReLU-kink flips under rounding); "
                        f"elementwise: {check.detail}")
    else:
        check.detail = f"relative L2 error {l2:.3g}; {check.detail}".rstrip("; ")
    return check


def failed(name: str, detail: str, tol: Tolerance | None = None) -> Check:
    """A check that could not be computed (structure mismatch, exception): not ok."""
    t = tol or Tolerance(0.0, 0.0)
    return Check(name, float("inf"), float("inf"), t.atol, t.rtol, False, detail)


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


def prove_region(expr, fused, example_activation=None, *, tol=None,
                 module: bool = False) -> VerifyReport:
    """Per-region proofs; see ``repfuse.proofs_region.prove_region``."""
    from repfuse.proofs_region import prove_region as _prove_region

    return _prove_region(expr, fused, example_activation, tol=tol, module=module)
