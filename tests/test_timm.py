"""timm's RepVGG and MobileOne through repfuse.fuse, without timm's reparameterize code.

Outputs equal the training form, and the parameter count equals that of
``timm.utils.reparameterize_model`` on the same weights.
"""

from __future__ import annotations

import copy

import pytest
import timm  # a test dependency: these tests must run, never skip
import torch
import torch.nn as nn

import repfuse


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (the defaults hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def no_reparameterize_calls(monkeypatch):
    """Fail if anything calls timm's own reparameterization."""
    from timm.models import byobnet

    def refuse(self, *a, **k):
        raise AssertionError("timm's reparameterize was called")
    for cls in (byobnet.RepVggBlock, byobnet.MobileOneBlock):
        monkeypatch.setattr(cls, "reparameterize", refuse)


@pytest.mark.parametrize("arch", ["repvgg_a0", "mobileone_s0"])
def test_timm_model_fused_without_timm_code(arch, monkeypatch):
    torch.manual_seed(0)
    model = randomize(timm.create_model(arch, pretrained=False)).eval()
    reference_deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    x = torch.randn(1, 3, 64, 64)
    no_reparameterize_calls(monkeypatch)
    # the proofs are exercised on the zoo; here the outputs are compared directly
    result = repfuse.fuse(model, x, verify=False)
    fused = result.model
    assert not result.report.skipped
    with torch.no_grad():
        ref, out = model(x), fused(x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5
    n_params = sum(p.numel() for p in fused.parameters())
    assert n_params == sum(p.numel() for p in reference_deploy.parameters())
    assert n_params == result.report.params_after < result.report.params_before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    n_blocks = sum(type(m).__name__ in ("RepVggBlock", "MobileOneBlock")
                   for m in model.modules())
    assert len(result.report.fused) == n_blocks
    # the user's tree is kept: the head and the stages are still there
    assert type(fused.head) is type(model.head)
    assert type(fused.stages[0][0]).__name__ == type(model.stages[0][0]).__name__
    # the fused blocks keep their class and hold one conv (and the stateless modules they
    # had, such as an unused drop path), as timm's deploy form does
    block = fused.stages[1][0]
    assert isinstance(block, type(model.stages[1][0]))
    assert [n for n, c in block.named_children() if any(True for _ in c.parameters())] \
        == ["reparam_conv"]
