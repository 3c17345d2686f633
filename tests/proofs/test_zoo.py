"""Per-region proofs through repfuse.fuse(verify=True): every design of the fx zoo and the
architectures of repfuse.models get outputs, input-gradient and weight-gradient-mapping
proofs; planted faults in the fusion are reported, never written silently."""

import pytest
import torch
from helpers.zoo import ZOO, make

import repfuse
from repfuse import models
from repfuse import region as rg


def _assert_full_proofs(report):
    assert report.ok, report.to_dict()
    assert report.verified and report.fused
    for region in report.fused:
        names = {c.name for c in region.proofs.checks}
        assert {"output[random]", "output[activation]", "grad input"} <= names, region.path
        grads = [n for n in names if n.startswith("grad ") and n != "grad input"]
        assert grads, f"{region.path}: no weight-gradient mapping checks"
        assert all(c.max_rel < 1e-9 for c in region.proofs.checks), region.path
    names = [c.name for c in report.model_checks.checks]
    assert names == ["output", "grad input"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_fx_zoo_regions_proved(name):
    model = make(name)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    result = repfuse.fuse(model, x, verify=True)
    _assert_full_proofs(result.report)
    # every parameter of every region was checked
    for region in result.report.fused:
        grads = {c.name for c in region.proofs.checks if c.name.startswith("grad ")}
        assert len(grads) >= 2


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "acnet_resnet18"])
def test_models_regions_proved(name):
    model = models.create(name, seed=0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = repfuse.fuse(model, x, verify=True)
    _assert_full_proofs(result.report)
    assert not result.report.skipped


def test_planted_fault_in_the_reducer_is_reported(monkeypatch):
    """A reducer that is off by 1e-3 (relative) on the fused weight: fuse(verify=True)
    reports it (region proofs and whole-model check); the model check alone sees it too."""
    real = rg.reduce

    def off(expr):
        fused = real(expr)
        return fused.replace(weight=fused.weight * (1 + 1e-3))

    model = make("repvgg")
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    monkeypatch.setattr(rg, "reduce", off)
    result = repfuse.fuse(model, x, verify=True)
    assert not result.report.ok
    region = result.report.fused[0]
    assert "output[random]" in {c.name for c in region.proofs.failures}
    assert not result.report.model_checks.ok
    monkeypatch.setattr(rg, "reduce", real)
    assert repfuse.verify(model, result.model, x).failures
