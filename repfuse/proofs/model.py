"""Whole-model checks: outputs and input gradients of two models on the same example
inputs (the implementation of ``repfuse.verify``), with the tolerances and comparison of
``repfuse.proofs.compare``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from repfuse.errors import InputError
from repfuse.pristine import untouched
from repfuse.proofs.compare import SEED, compare, failed, least_precise
from repfuse.proofs.exact import Float64Weights, exact_norms, float64_copy
from repfuse.proofs.modes import ordinary, own_mode
from repfuse.proofs.truth import judge
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
    """Gradients w.r.t. ``leaves`` of sum <out, upstream[name]> (None where unused); an
    output whose shape is not its upstream's (a failed check already) is left out."""
    pairs = [(o, upstream[n].to(o.device, o.dtype)) for n, o in outs
             if n in upstream and isinstance(o, Tensor) and o.requires_grad
             and o.shape == upstream[n].shape]
    if not pairs or not leaves:
        return [None] * len(leaves)
    return list(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                    allow_unused=True))


def grad_names(args: tuple) -> list[str]:
    """The input-gradient checks, one per floating tensor input, in order."""
    if len(args) == 1:
        return ["grad input"]
    return [f"grad input[{i}]" for i, a in enumerate(args)
            if isinstance(a, Tensor) and a.is_floating_point()]


def upstream_for(flat: list[tuple[str, Any]]) -> dict[str, Tensor]:
    """The seeded random upstream gradient of every floating output, drawn in float64 and
    rounded to the output's dtype (the float64 run of the reference uses the same values).
    Not ``compare.draw``'s float32 draw: other values, as likely as these to sit where
    float32 rounding flips a ReLU's kink, changed which checks needed the float64 truth
    (repvgg_a0 at 224 on the benchmarks' example: none with these, the truth and the exact
    kernels with those, 1.6x the conversion's time) for 13 ms of yolov8n's 0.8 s."""
    gen = torch.Generator().manual_seed(SEED)
    return {name: torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.dtype)
            for name, r in flat if isinstance(r, Tensor) and r.is_floating_point()}


def evaluate(model: nn.Module, args: tuple, grads: bool,
             upstream: dict[str, Tensor] | None = None):
    """Run ``model`` on copies of ``args`` (and back, with ``grads``); returns the detached
    output leaves ``[(name, value)]``, the upstream gradient (``upstream``, or a new one
    for these outputs) and ``{grad name: input gradient or None}``."""
    leaves, out = _run(model, args, grads)
    return _backward(leaves, out, args, grads, upstream)


def _backward(leaves: list[Tensor], out, args: tuple, grads: bool,
              upstream: dict[str, Tensor] | None):
    """``evaluate`` after the forward pass (a failing backward raises here)."""
    flat = flatten(out, "output")
    del out
    if upstream is None:
        upstream = upstream_for(flat)
    found = _input_grads(leaves, flat, upstream) if grads else []
    flat = [(n, v.detach() if isinstance(v, Tensor) else v) for n, v in flat]
    return flat, upstream, dict(zip(grad_names(args), found))


def verify_models(reference: nn.Module, candidate: nn.Module, example_inputs, *,
                  grads: bool = True, tol=None, truth: dict | None = None) -> VerifyReport:
    """Check that ``candidate`` computes what ``reference`` computes on ``example_inputs``.

    Both models run in eval mode (their training flags are restored afterwards) on
    separate copies of the inputs; neither model, nor its ``.grad`` fields, nor the
    inputs are modified, whatever the caller's grad mode (models whose tensors are
    inference tensors are differentiated through ordinary copies; their plain attributes,
    caches filled during the runs included, are put back: ``repfuse.pristine``). Checks:
    every output leaf (nested tuples/lists/dicts of tensors are matched by position/key), and with
    ``grads=True`` the gradient with respect to every floating input for one random
    upstream gradient (seeded, the same for both models) through autograd. A candidate
    whose output does not depend on an input through autograd (e.g. it detaches it)
    gets a zero gradient there and fails. ``tol`` as in ``tolerance`` (by default the
    table by dtype). Below float64 a check this direct comparison rejects is judged
    against the reference run in float64 (``repfuse.proofs.truth``); when that run is
    made and ``truth`` is a dict, it receives the run (``values``: outputs and input
    gradients by name, ``upstream``, ``grads``) for ``verify_float64`` to reuse.
    """
    args = as_input_tuple(example_inputs)
    with own_mode(), untouched(reference, candidate):
        return _verify(reference, candidate, args, grads, tol, truth)


def _verify(reference: nn.Module, candidate: nn.Module, args: tuple, grads: bool,
            tol, keep: dict | None = None) -> VerifyReport:
    report = VerifyReport()
    ref_model = ordinary(reference) if grads else reference
    cand_model = ordinary(candidate) if grads else candidate
    with eval_mode(ref_model, cand_model):
        # the reference first, its graph freed before the candidate runs (peak memory)
        try:
            leaves, out = _run(ref_model, args, grads)
        except Exception as e:
            raise InputError(f"the reference model fails on example_inputs: "
                             f"{type(e).__name__}: {e}") from e
        ref_flat, upstream, ref_grads = _backward(leaves, out, args, grads, None)
        try:
            leaves, out = _run(cand_model, args, grads)
        except Exception as e:  # a candidate that crashes is a failed check
            report.checks.append(failed("output", f"candidate raised {type(e).__name__}: {e}"))
            return report
        cand_flat, _, cand_grads = _backward(leaves, out, args, grads, upstream)
        del leaves, out
    if [n for n, _ in ref_flat] != [n for n, _ in cand_flat]:
        report.checks.append(failed("output", (
            f"output structure differs: candidate gives {[n for n, _ in cand_flat]}, "
            f"reference {[n for n, _ in ref_flat]}")))
        return report
    compared: dict[str, tuple[Check, Tensor, Tensor]] = {}
    dtypes = []
    for (name, r), (_, c) in zip(ref_flat, cand_flat):
        if not isinstance(r, Tensor) or not isinstance(c, Tensor):
            report.checks.append(_compare_values(name, r, c))
            continue
        report.checks.append(compare(name, r, c, tol))
        compared[name] = (report.checks[-1], r, c)
        dtypes.append(r.dtype)
    dtype = least_precise(*dtypes) if dtypes else torch.float64
    report.dtype = str(dtype).removeprefix("torch.")
    if grads and ref_grads:
        for (name, rg), leaf in zip(ref_grads.items(), _floating(args)):
            rg = torch.zeros_like(leaf) if rg is None else rg
            cg = cand_grads.get(name)
            check = compare(name, rg, torch.zeros_like(leaf) if cg is None else cg, tol)
            if cg is None:
                check.detail = (f"candidate's outputs do not depend on {name[5:]} through "
                                f"autograd; " + check.detail).rstrip("; ")
            report.checks.append(check)
            compared[name] = (check, rg, torch.zeros_like(leaf) if cg is None else cg)
    pending = {n: v for n, v in compared.items()
               if not v[0].ok and math.isfinite(v[0].max_abs)}

    def truth(with_grads: bool) -> dict[str, Tensor]:
        values = _float64_values(reference, args, with_grads, upstream)
        if keep is not None:
            keep.update(values=values, upstream=upstream, grads=with_grads)
        return values

    if dtype != torch.float64 and pending and len(pending) == len(report.failures):
        judge(report, pending, truth, lambda: _float64_grads(candidate, args, upstream),
              dtype, tol)
    if ref_grads and any(not c.ok for c in report.checks if not c.name.startswith("grad ")):
        report.notes.append("outputs differ; input gradients compared anyway")
    return report


def _floating(args: tuple) -> list[Tensor]:
    return [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]


def _float64_values(model: nn.Module, args: tuple, grads: bool,
                    upstream: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model``'s outputs (and input gradients) run in float64 on ``args`` and
    ``upstream``, by name (``run_float64``)."""
    args64 = tuple(a.detach().double() if isinstance(a, Tensor) and a.is_floating_point()
                   else a for a in args)
    flat, _, found = run_float64(model, args64, grads, upstream)
    values = {n: v for n, v in flat if isinstance(v, Tensor)}
    values.update({n: g for n, g in found.items() if g is not None})
    return values


def run_float64(model: nn.Module, args64: tuple, grads: bool,
                upstream: dict[str, Tensor] | None = None):
    """``evaluate`` of ``model`` in float64 on ``args64`` (float64 inputs), its eval-mode
    batch norms as affine maps (``repfuse.proofs.exact``): run with its weights cast to
    float64 where they are read (``Float64Weights``: the float64 weights are not all
    alive at once), or, where that run does not stand for a float64 copy's run, on the
    copy (``model`` is not touched either way: its tensors are not written, its plain
    attributes are put back)."""
    weights = Float64Weights(model)
    try:
        with untouched(model), eval_mode(model), exact_norms(), weights.running():
            result = evaluate(model, args64, grads, upstream)
    except Exception as err:  # noqa: BLE001 - the copy's run decides (below)
        weights.impure = weights.impure or f"{type(err).__name__}: {err}"
    if weights.impure is None:
        return result
    result = None
    model64 = float64_copy(model)
    with eval_mode(model64), exact_norms():
        return evaluate(model64, args64, grads, upstream)


def _float64_grads(model: nn.Module, args: tuple,
                   upstream: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """``model``'s input gradients run in float64, or None when it cannot run there."""
    try:
        values = _float64_values(model, args, True, upstream)
    except Exception:  # noqa: BLE001 - then the gradient as run is all there is
        return None
    return {n: v for n, v in values.items() if n.startswith("grad ")}


def _compare_values(name: str, r, c) -> Check:
    """Non-tensor output leaves: equal type and value."""
    try:
        same = type(r) is type(c) and bool(r == c)
    except Exception:
        same = False
    inf = float("inf")
    return Check(name, 0.0 if same else inf, 0.0 if same else inf, 0.0, 0.0, same,
                 "" if same else f"{c!r} != reference {r!r}")


def verify_float64(reference: nn.Module, candidate64: nn.Module, example_inputs, *,
                   grads: bool = True, truth: dict | None = None) -> VerifyReport:
    """Outputs and input gradients of ``reference`` run in float64 (``run_float64``)
    against ``candidate64`` (a float64 model, run
    as given) with the float64 tolerances: the check of a structure whose weights are
    exact (``repfuse.fx.pipeline``: the fused model with its exact kernels). ``truth``:
    that run of ``reference`` as ``verify_models`` kept it (with input gradients when
    ``grads``), used instead of running it again, with its upstream gradient."""
    args = as_input_tuple(example_inputs)
    with own_mode():
        args64 = tuple(a.detach().double() if isinstance(a, Tensor) and a.is_floating_point()
                       else a for a in args)
        if truth is not None and (truth["grads"] or not grads):
            values, upstream = truth["values"], truth["upstream"]
            ref_flat = [(n, v) for n, v in values.items() if not n.startswith("grad ")]
            ref_grads = {n: values.get(n) for n in grad_names(args)} if grads else {}
            with eval_mode(candidate64), exact_norms():
                cand_flat, _, cand_grads = evaluate(candidate64, args64, grads, upstream)
        else:
            ref_flat, upstream, ref_grads = run_float64(reference, args64, grads)
            with eval_mode(candidate64), exact_norms():
                cand_flat, _, cand_grads = evaluate(candidate64, args64, grads, upstream)
    report = VerifyReport(dtype="float64")
    cand = dict(cand_flat)
    for name, r in ref_flat:
        c = cand.get(name)
        if isinstance(r, Tensor) and isinstance(c, Tensor):
            report.checks.append(compare(name, r, c))
        elif isinstance(r, Tensor) or isinstance(c, Tensor):
            report.checks.append(failed(name, "output structure differs"))
    for name, r in ref_grads.items():
        c = cand_grads.get(name)
        if r is not None and c is not None:
            report.checks.append(compare(name, r, c))
        elif r is not None or c is not None:
            report.checks.append(failed(name, "one model's outputs do not depend on the input"))
    return report
