"""The whole-model criterion below float64: each model judged against the reference run in
float64 (the truth).

Below float64 a model's outputs differ from what its own weights compute exactly by the
rounding of its dtype; in a deep model, or one with ill-conditioned batch norms, by more
than any fixed tolerance, and a fused model rounds differently from the training form it
replaces. So a check that the table's direct comparison rejects is judged against the
truth, the reference (the training form) run in float64 on the same inputs and upstream
gradient. The candidate (the fused model) passes it when::

    error(candidate) <= FACTOR * error(reference) + slack

``error`` is the distance to the truth in the check's measure (below) and ``slack`` the
table's tolerance (``atol + rtol * max|reference|`` per element, or the user's ``tol``) in
that measure: the candidate must be about as close to the truth as the reference is in its
own dtype. The reference's own error is the yardstick, so a reference far from its float64
run (rounding over a deep model, an inaccurate kernel) is named in the report's notes and
does not make a candidate that is closer to the truth fail.

The route does not change the verdict: by the triangle inequality ``error(candidate) <=
d(candidate, reference) + error(reference)``, and a candidate within the slack of the
reference in every element is within the slack in every measure used here; so a check
that passes the direct comparison passes the criterion, and the float64 run is made only
for the checks that do not.

Measures, by check:

* floating outputs: the largest absolute error. Outputs are continuous in the inputs and
  weights; their rounding errors are dense and their maximum is a stable statistic, while a
  localized fault (a wrong border, one wrong channel) shows at full size. After a discrete
  selection a row that rounding moved moves the maximum of either model by a whole row.
* integer and boolean outputs (argmax, TopK indices, masks): the number of elements that
  differ from the truth, slack 0: an index the candidate's rounding flips counts as much as
  one the reference's rounding flips.
* input gradients: the L2 norm, with the candidate's error the smaller of its gradient as
  run in its dtype and its gradient run in float64 with its own weights. Input gradients of
  ReLU-like models jump at kinks; rounding flips the kinks next to which the example's
  units sit, in either model and at random, and each flip moves a patch of the gradient by
  O(1) (repvgg_a0 at 1x3x224x224 in float32, 8 inputs: a kink flipped in the fused model
  in 3, in the training form in 3 others, 1e-3 to 1.5e-2 relative L2 against 1e-6
  without), so two realizations of that rounding cannot be compared. Run in float64 the
  fused model differs from the truth only through its stored weights (no flip in the same
  8 inputs: 1.2e-7). A gradient-only fault (a detached path, a wrong backward) is wrong in
  both forms, and L2 because a flip that remains carries little of the gradient's energy
  while such a fault carries much of it. Not caught: a fault in the candidate's backward
  in its dtype only (its outputs are judged in its dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from repfuse.errors import first_line
from repfuse.proofs.compare import tolerance
from repfuse.report import Check, VerifyReport

#: The candidate may be this many times further from the truth than the reference.
FACTOR = 2.0

#: How the detail of a check that passed by this criterion begins.
JUDGED = "passed: against the reference run in float64"

#: ``{check name: value}`` of one model's run: outputs and input gradients.
Values = dict[str, Tensor]


def measure(name: str, value: Tensor) -> str:
    """The error measure of a check (see the module docstring)."""
    if name.startswith("grad "):
        return "L2 error"
    return "max abs error" if value.is_floating_point() else "mismatches"


def distance(kind: str, value: Tensor, truth: Tensor, mask: Tensor) -> float:
    """The error of ``value`` against ``truth`` on the elements of ``mask``, in ``kind``."""
    x = value.detach().to(truth.device, torch.float64)[mask]
    t = truth.detach().to(torch.float64)[mask]
    if kind == "mismatches":
        return float((x != t).sum())
    if x.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(x).all()):
        return math.inf
    return float(torch.linalg.vector_norm(x - t, 2 if kind == "L2 error" else math.inf))


def slack(kind: str, reference: Tensor, mask: Tensor, dtype: torch.dtype, tol) -> float:
    """The direct comparison's tolerance (``atol + rtol * max|reference|`` per element)
    in measure ``kind``: as it is for the max error, times the square root of the number
    of elements for the L2 error, 0 for mismatches."""
    if kind == "mismatches":
        return 0.0
    t = tolerance(dtype, tol)
    r = reference.detach().to(torch.float64)[mask]
    per_element = t.atol + t.rtol * (float(r.abs().max()) if r.numel() else 0.0)
    return per_element * math.sqrt(r.numel()) if kind == "L2 error" else per_element


def judge(report: VerifyReport, pending: dict[str, tuple[Check, Tensor, Tensor]],
          truth: Callable[[bool], Values], candidate64: Callable[[], Values | None],
          dtype: torch.dtype, tol) -> None:
    """Judge the checks of ``pending`` (name -> (check, reference's value, candidate's
    value)), which the direct comparison rejected, by the criterion of the module
    docstring: sets each one's verdict and detail, and notes a reference that is itself
    further from the truth than the slack. ``truth(grads)``: the reference's values run
    in float64 (with input gradients when ``grads``); when it cannot be run the checks
    keep the direct comparison's verdict and a note says why. ``candidate64()``: the
    candidate's input gradients run in float64 with its own weights (None when it cannot
    be run), asked for only when a gradient check needs them."""
    try:
        exact = truth(any(name.startswith("grad ") for name in pending))
    except Exception as err:  # noqa: BLE001 - a model that cannot run in float64
        report.notes.append(f"the reference could not be run in float64 to judge rounding "
                            f"against ({type(err).__name__}: {first_line(err)}); the direct "
                            "comparison's verdict stands")
        return
    dtype_name = str(dtype).removeprefix("torch.")
    far, c64, asked = [], None, False
    for name, (check, r, c) in pending.items():
        t = exact.get(name)
        if t is None or tuple(t.shape) != tuple(r.shape):
            continue
        kind = measure(name, r)
        mask = _finite(r) & _finite(c) & _finite(t)
        e_ref, e_cand = distance(kind, r, t, mask), distance(kind, c, t, mask)
        room = slack(kind, r, mask, dtype, tol)
        figures = f"{kind} {e_cand:.3g}"
        if kind == "L2 error" and e_cand > FACTOR * e_ref + room:
            if not asked:
                c64, asked = candidate64(), True
            if c64 is not None and name in c64:
                e64 = distance(kind, c64[name], t, mask)
                figures += f" as run, {e64:.3g} run in float64"
                e_cand = min(e_cand, e64)
        check.ok = e_cand <= FACTOR * e_ref + room
        verdict = (f"the candidate's {figures}, the reference's own in {dtype_name} "
                   f"{e_ref:.3g}")
        check.detail = (f"{JUDGED}: {verdict} (at most {FACTOR:g}x it + slack {room:.3g}); "
                        if check.ok else f"against the reference run in float64: {verdict}: "
                        f"more than {FACTOR:g}x it + slack {room:.3g}; ") + check.detail
        if e_ref > room:
            far.append(f"{name} ({kind} {e_ref:.3g}, slack {room:.3g})")
    if far:
        report.notes.append(
            f"the reference itself is further from its float64 run than {dtype_name}'s "
            f"tolerance on {', '.join(far)}: rounding over a deep or ill-conditioned model, "
            "or an inaccurate kernel in the reference; the candidate was judged against "
            "the float64 run, not blamed for it")


def _finite(x: Tensor) -> Tensor:
    return torch.isfinite(x) if x.is_floating_point() else torch.ones_like(x, dtype=torch.bool)
