"""Per-region proofs through repfuse.fuse(verify=True): every design of the fx zoo and the
architectures of repfuse.models get outputs, input-gradient and weight-gradient-mapping
proofs, with the same verdict in every grad mode of the caller (enable_grad, no_grad,
inference_mode). Planted faults: tests/fx/test_proven.py."""

import pytest
import torch
from helpers.grad_modes import MODES, fuse_in, verdict
from helpers.zoo import ZOO, make

import repfuse
from repfuse import models


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


def _zoo_case(name):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    return make(name), x


def _model_case(name):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return models.create(name, seed=0), x


_WITH_GRAD: dict = {}


def _same_verdict(case, name: str, mode: str, result) -> None:
    """The verdict is the one under enable_grad (fused once per model)."""
    if mode == "enable_grad":
        _WITH_GRAD[case, name] = verdict(result)
    elif (case, name) not in _WITH_GRAD:
        _WITH_GRAD[case, name] = verdict(repfuse.fuse(*case(name)))
    assert verdict(result) == _WITH_GRAD[case, name]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_fx_zoo_regions_proved(name, mode):
    model, x = _zoo_case(name)
    model.head.weight.grad = torch.ones_like(model.head.weight)     # left as it is
    result = fuse_in(mode, repfuse.fuse, model, x, verify=True)
    _assert_full_proofs(result.report)
    # every parameter of every region was checked
    for region in result.report.fused:
        grads = {c.name for c in region.proofs.checks if c.name.startswith("grad ")}
        assert len(grads) >= 2
    _same_verdict(_zoo_case, name, mode, result)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, mode", [(n, m) for n in ("repvgg_a0", "mobileone_s0")
                                        for m in sorted(MODES)]
                         + [("acnet_resnet18", "enable_grad")])
def test_models_regions_proved(name, mode):
    model, x = _model_case(name)
    result = fuse_in(mode, repfuse.fuse, model, x, verify=True)
    _assert_full_proofs(result.report)
    assert not result.report.skipped
    _same_verdict(_model_case, name, mode, result)
