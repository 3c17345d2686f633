"""fuse, verify, fuse_onnx and export_onnx give one result and one verdict whatever the
caller's grad mode: enable_grad, no_grad (how conversion scripts are written) and
inference_mode (inference tensors as inputs and as parameters). The caller's mode and the
model come back as they were. Every zoo design and repvgg_a0 / mobileone_s0 in every mode:
tests/proofs/test_zoo.py."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from helpers.grad_modes import MODES, assert_same_state, fuse_in, grad_mode, model_state
from helpers.zoo import make
from torch import nn

import repfuse
from repfuse import models


class Reflect(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reflect_padding_in_every_grad_mode(mode):
    torch.manual_seed(0)
    model = Reflect().double()
    result = fuse_in(mode, repfuse.fuse, model, torch.randn(1, 4, 7, 9, dtype=torch.float64))
    assert result.report.ok and len(result.report.fused) == 1, result.report.to_dict()


def test_inference_tensors_as_inputs_and_parameters():
    """A model built and an input made under inference_mode (every tensor an inference
    tensor): fuse and verify run, prove and give the verdict of ordinary tensors."""
    with torch.inference_mode():
        model = models.create("repvgg_a0", seed=0)
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert all(p.is_inference() for p in model.parameters()) and x.is_inference()
    result = repfuse.fuse(model, x)
    assert result.report.ok, result.report.to_dict()
    assert not any(p.is_inference() for p in result.model.parameters())
    with torch.inference_mode():
        report = repfuse.verify(model, result.model, x)
    assert report.ok and [c.name for c in report.checks] == ["output", "grad input"]
    assert all(p.is_inference() for p in model.parameters())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_verify_same_verdict_in_every_grad_mode(mode):
    model = make("dbb").float()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fused = repfuse.fuse(model, x, verify=False).model
    broken = copy.deepcopy(fused)
    with torch.no_grad():
        broken.block.reparam_conv.weight.mul_(1.3)
    before = model_state(model)
    with grad_mode(mode):
        good, bad = repfuse.verify(model, fused, x), repfuse.verify(model, broken, x)
    assert_same_state(model, before)
    assert good.ok, good.to_dict()
    assert [c.name for c in bad.failures] == ["output", "grad input"]


@pytest.fixture(scope="module")
def repvgg_onnx(tmp_path_factory):
    model = make("repvgg").float()
    path = tmp_path_factory.mktemp("onnx") / "repvgg.onnx"
    repfuse.export_onnx(model, torch.randn(1, 3, 8, 8), path)
    return model, path


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fuse_onnx_and_export_in_every_grad_mode(mode, repvgg_onnx, tmp_path):
    model, path = repvgg_onnx
    before = model_state(model)
    with grad_mode(mode):
        result = repfuse.fuse_onnx(path)
        report = repfuse.export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "again.onnx")
    assert_same_state(model, before)
    assert result.report.ok and len(result.report.fused) == 1
    assert all(r.proofs.ok for r in result.report.fused), result.report.to_dict()
    assert report.ok
    onnx.checker.check_model(onnx.load(str(tmp_path / "again.onnx")))
