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
    assert "output[random]" in report.defects[0].reason
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
