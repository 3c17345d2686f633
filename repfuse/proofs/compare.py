"""Tolerances and the one numerical comparison every proof uses.

One table of tolerances by dtype (``TOLERANCES``) and one comparison (``compare``).

Error figures (reported for every check):

* ``max_abs = max |candidate - reference|`` over all elements;
* ``max_rel = max_abs / max(max |reference|, tiny)``: the largest error relative to
  the largest reference magnitude. Unlike an elementwise ratio it does not blow up
  where the reference is (close to) zero, so it is robust on real activations.

A check passes when ``max_abs <= atol + rtol * max |reference|``. Comparisons are
computed in float64; the tolerance is that of the less precise of the two dtypes. Whole
models below float64 are judged further against the reference run in float64
(``repfuse.proofs.truth``) when this direct comparison rejects them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from repfuse.core.layout import memory_order_flat
from repfuse.errors import InputError
from repfuse.report import Check


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

_PRECISION_ORDER = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: Seed of the random upstream gradients and probe inputs (proofs are reproducible).
SEED = 0


def draw(shape, generator: torch.Generator, dtype: torch.dtype = torch.float64,
         memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
    """Standard normal values of ``shape`` from ``generator``, drawn in float32 and given in
    ``dtype``: torch draws float32 normals vectorised, float64 ones one by one (4.5x slower
    on CPU: 4.3 against 0.95 ms for 144x28x28 values with the cast). A region proof's probe
    and upstream gradient only need to be generic (the region is linear, the proof runs in
    float64); values with a float32 mantissa are. On the generator's device (the CPU)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(
        dtype, memory_format=memory_format)


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
    max_abs, scale = _extremes(a, b)    # NaN if any value is NaN
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


_BLOCK = 1 << 18    # elements per block of ``_extremes`` (2 MB of float64: in cache)
#: From this size a one-block comparison of channels-last tensors runs on their memory-order
#: views: a whole-tensor reduction over a channels-last 4-D view took twice as long (a
#: 128x128x3x3 float64 gradient: 930 against 498 us for both reductions; below 2^14
#: elements the view costs more than it saves)
_FLAT = 1 << 14


def _extremes(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a|) of two float64 tensors of one shape (NaN where a value is
    NaN). Up to one block: one pass of each reduction, read back together (the proofs
    compare hundreds of small tensors; 64 elements took 96 us through the blocked path,
    24 us so). Larger: over the elements in memory order where both lie alike
    (channels-last gradients: 3.6x faster than on the 4-D view), in blocks through one
    reused buffer: no difference the size of a kernel is allocated. (In repvgg_b3's proofs
    at 64x64 the one comparison of its 2560x768x3x3 kernel, whose whole difference was a
    new 141 MB tensor, took 298 ms of its 3.7 s; 35-65 ms on its own.) A min-and-max
    reduction (on CPU cheaper than vector_norm's inf-norm) per block, for each."""
    if a.numel() <= _BLOCK:
        if a.numel() >= _FLAT and a.stride() == b.stride() and not a.is_contiguous():
            a, b = memory_order_flat(a), memory_order_flat(b)
        lo, hi = torch.aminmax(a - b)
        a_lo, a_hi = torch.aminmax(a)
        lo, hi, a_lo, a_hi = torch.stack((lo, hi, a_lo, a_hi)).tolist()
        return _magnitude(lo, hi), _magnitude(a_lo, a_hi)
    if a.stride() == b.stride():
        a, b = memory_order_flat(a), memory_order_flat(b)
    else:
        a, b = a.reshape(-1), b.reshape(-1)
    worst = torch.zeros((), dtype=a.dtype, device=a.device)
    scale = torch.zeros((), dtype=a.dtype, device=a.device)
    buf = torch.empty(_BLOCK, dtype=a.dtype, device=a.device)
    for start in range(0, a.numel(), _BLOCK):
        part = buf[:min(_BLOCK, a.numel() - start)]
        torch.sub(a[start:start + part.numel()], b[start:start + part.numel()], out=part)
        lo, hi = torch.aminmax(part)
        worst = torch.maximum(worst, torch.maximum(-lo, hi))
        lo, hi = torch.aminmax(a[start:start + part.numel()])
        scale = torch.maximum(scale, torch.maximum(-lo, hi))
    return float(worst), float(scale)


def _magnitude(lo: float, hi: float) -> float:
    """max(|lo|, |hi|) of a minimum and a maximum; NaN if either is (Python's ``max`` would
    keep or drop a NaN by argument order)."""
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def failed(name: str, detail: str, tol: Tolerance | None = None) -> Check:
    """A check that could not be computed (structure mismatch, exception): not ok."""
    t = tol or Tolerance(0.0, 0.0)
    return Check(name, float("inf"), float("inf"), t.atol, t.rtol, False, detail)
