"""Every reference architecture fuses through ``repfuse.fuse`` (no per-block code) into one
conv per block, computes what the training form computes, and has the published
parameter count."""

from __future__ import annotations

import pytest
import torch
from helpers.models import (
    ALL,
    PUBLISHED,
    MobileOneBlock,
    analytic_fused_count,
    block_paths,
    check_published,
    count,
)
from torch import nn

import repfuse
from repfuse import models

SMALL = (1, 3, 32, 32)  # the big networks run at a small input to keep CI time down


def _fuse_checked(model: nn.Module, x: torch.Tensor, *, verify: bool):
    """Fuse ``model`` in place; check regions, one conv per block, no BN, parameters.
    Return (training-form output, fused output, fused model)."""
    paths = block_paths(model)
    n_se = sum(isinstance(m, MobileOneBlock) and not isinstance(m.se, nn.Identity)
               for m in model.modules())
    expected_params = analytic_fused_count(model)
    with torch.no_grad():
        y = model(x)
    result = repfuse.fuse(model, x, verify=verify, inplace=True)
    fused, report = result.model, result.report
    assert report.ok, report.to_dict()
    assert not report.skipped, [(r.path, r.reason) for r in report.skipped]
    assert len(report.fused) == len(paths)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    for path in paths:
        block = fused.get_submodule(path)  # the module tree is kept
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        se = getattr(block, "se", None)
        extra = 2 if se is not None and not isinstance(se, nn.Identity) else 0
        assert len(convs) == 1 + extra, path
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == len(paths) + 2 * n_se
    assert count(fused) == expected_params
    with torch.no_grad():
        y_fused = fused(x)
    return y, y_fused, fused


def _rel_err(y: torch.Tensor, y_fused: torch.Tensor) -> float:
    return float((y - y_fused).abs().max() / y.abs().max())


@pytest.mark.parametrize("name", ALL)
def test_fuses_exactly_in_float64(name):
    model = models.create(name, seed=0, calibration_shape=(2, *SMALL[1:])).double()
    x = torch.randn(SMALL, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, y_fused, fused = _fuse_checked(model, x, verify=False)
    assert y_fused.dtype == torch.float64
    assert _rel_err(y, y_fused) <= 1e-10
    check_published(name, count(fused), PUBLISHED[name][1])


@pytest.mark.parametrize("name, verify", [("repvgg_a0", True), ("acnet_resnet18", False)])
def test_fuses_in_float32(name, verify):
    model = models.create(name, seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y, y_fused, _ = _fuse_checked(model, x, verify=verify)
    assert y_fused.dtype == torch.float32
    assert _rel_err(y, y_fused) <= 1e-5


def test_fused_model_is_refused_nothing_and_changes_nothing():
    """Fusing the fused form again finds no region left."""
    model = models.create("mobileone_s0", seed=2, num_classes=10, calibration_shape=(2, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    fused = repfuse.fuse(model, x, verify=False).model
    again = repfuse.fuse(fused, x, verify=False)
    assert not again.report.fused
    assert count(again.model) == count(fused)
