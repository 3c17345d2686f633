"""What repfuse.fuse returns is always proven: a region whose proof fails is left in its
training form and reported as a repfuse defect (a whole-model check that fails raises:
tests/fx/test_fuse_api.py)."""

from __future__ import annotations

import logging

import torch
from helpers.zoo import make

import repfuse
from repfuse import region as rg


def test_region_whose_proof_fails_stays_in_training_form(monkeypatch, caplog):
    real = rg.reduce

    def off(expr):
        fused = real(expr)
        return fused.replace(weight=fused.weight * (1 + 1e-3))

    model = make("repvgg")
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    monkeypatch.setattr(rg, "reduce", off)
    with caplog.at_level(logging.WARNING):
        result = repfuse.fuse(model, x)
    report = result.report
    assert report.ok and report.model_checks.ok, report.to_dict()
    assert not report.fused
    # the block's region, then (its submodules being searched too) the conv+BN inside it:
    # every region the broken reducer touched is left alone and named
    assert report.defects and not report.fused
    assert [r.path for r in report.defects][0] == "block.add_1"
    for defect in report.defects:
        assert defect.status == "skipped" and "defect of repfuse" in defect.reason
        assert defect.proofs is not None and not defect.proofs.ok
    failed = {c.name for c in report.defects[0].proofs.failures}
    assert "output[random]" in failed     # the reason names the worst failed check
    assert any(f"({name}:" in report.defects[0].reason for name in failed)
    assert any("defect" in r.getMessage() for r in caplog.records)
    assert any("defect" in n for n in report.notes)
    with torch.no_grad():       # the returned model is the training form there
        assert torch.allclose(result.model(x), model(x), rtol=0, atol=1e-12)
    # without verification nothing is proven: the (wrong) fusion is what was asked for
    unverified = repfuse.fuse(model, x, verify=False)
    assert len(unverified.report.fused) == 1


def _rounding_moved(monkeypatch):
    """The whole-model check as if rounding the fused weights had moved one output past
    the criterion (a TopK near-tie flipped): the real check, its first output failed."""
    import repfuse.fx.pipeline as pipeline

    real = pipeline.verify_models

    def moved(*args, **kwargs):
        report = real(*args, **kwargs)
        report.checks[0].ok = False
        return report
    monkeypatch.setattr(pipeline, "verify_models", moved)


def test_a_difference_the_exact_kernels_explain_passes_with_a_note(monkeypatch):
    _rounding_moved(monkeypatch)
    model = make("repvgg").float()
    result = repfuse.fuse(model, torch.randn(2, 3, 10, 10))
    checks = result.report.model_checks
    assert result.report.ok and checks.ok
    assert checks.checks[0].detail.startswith("passed: the fused structure with its exact")
    assert any("rounding of the stored weights" in n for n in checks.notes)


def test_stored_weights_that_are_not_the_proven_kernels_are_never_excused(monkeypatch):
    import pytest

    from repfuse.algebra.affine import AffineConv
    from repfuse.errors import VerificationError

    _rounding_moved(monkeypatch)
    real = AffineConv.to_module

    def off_by_one_ulp(self):
        module = real(self)
        if self.dtype != torch.float64:   # the stored module only, not the exact one
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.nextafter(p, p + 1))
        return module
    monkeypatch.setattr(AffineConv, "to_module", off_by_one_ulp)
    with pytest.raises(VerificationError):
        repfuse.fuse(make("repvgg").float(), torch.randn(2, 3, 10, 10))


def test_the_exact_kernels_judge_reuses_the_float64_run_of_the_training_form(monkeypatch):
    """When the float32 criterion ran the training form in float64 and still rejected a
    check, the judge by exact kernels compares with that run instead of making it again:
    the training form is run in float64 once, not twice, and the verdict is the same
    as with a second run."""
    import repfuse.fx.pipeline as pipeline
    import repfuse.proofs.model as whole

    real_judge = whole.judge

    def judged_then_moved(report, pending, *args, **kwargs):
        real_judge(report, pending, *args, **kwargs)     # makes the float64 run
        next(iter(pending.values()))[0].ok = False       # as if it still differed
    monkeypatch.setattr(whole, "judge", judged_then_moved)
    real_compare = whole.compare

    def direct_fails(name, r, c, tol=None):              # the float32 comparison rejects
        check = real_compare(name, r, c, tol)
        if r.dtype != torch.float64:
            check.ok = False
        return check
    monkeypatch.setattr(whole, "compare", direct_fails)
    copies: list = []    # every float64 run of a model: with its weights cast, or a copy
    real_copy = whole.float64_copy

    def counted(model):
        copies.append(type(model).__name__)
        return real_copy(model)
    monkeypatch.setattr(whole, "float64_copy", counted)

    class Counted(whole.Float64Weights):
        def __init__(self, model):
            copies.append(type(model).__name__)
            super().__init__(model)
    monkeypatch.setattr(whole, "Float64Weights", Counted)
    model = make("repvgg").float()
    x = torch.randn(2, 3, 10, 10)
    result = repfuse.fuse(model, x)
    checks = result.report.model_checks
    assert result.report.ok and checks.ok
    assert checks.checks[0].detail.startswith("passed: the fused structure with its exact")
    reference_copies = [n for n in copies if n == type(model).__name__]
    assert len(reference_copies) == 1, copies
    # the same verdict and figures with the training form run again
    reused: list = []
    real_exact = pipeline.verify_float64

    def again(reference, candidate64, example_inputs, *, grads=True, truth=None):
        with_truth = real_exact(reference, candidate64, example_inputs, grads=grads,
                                truth=truth)
        fresh = real_exact(reference, candidate64, example_inputs, grads=grads)
        reused.append((truth is not None, with_truth, fresh))
        return with_truth
    monkeypatch.setattr(pipeline, "verify_float64", again)
    repfuse.fuse(model, x)
    (had_truth, with_truth, fresh), = reused
    assert had_truth
    assert [(c.name, c.ok) for c in with_truth.checks] == [(c.name, c.ok) for c in fresh.checks]
    outputs = [(a.max_abs, b.max_abs) for a, b in zip(with_truth.checks, fresh.checks)
               if a.name.startswith("output")]
    assert outputs and all(a == b for a, b in outputs)
