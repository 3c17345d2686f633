"""More timm architectures through ``repfuse.fuse`` (no timm reparameterize code), with
random BN statistics, affine parameters and layer scales.

Each fused model equals the training form (float32 relative error <= 1e-5; float64
<= 1e-10) and its parameter count is accounted for against
``timm.utils.reparameterize_model``: repfuse also folds the plain conv -> BN pairs that timm
keeps, and leaves the classifier head (BatchNorm1d + Linear, not a convolution) alone.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

import repfuse


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if "gamma" in name or "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = randomize(timm.create_model(arch, pretrained=False)).eval().to(dtype)
    return model, torch.randn(1, 3, 64, 64, dtype=dtype)


def fuse_and_compare(model, x, tol, verify=False):
    result = repfuse.fuse(model, x, verify=verify)
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= tol, rel
    assert result.report.fused
    return result


@pytest.mark.parametrize("arch", ["regnetx_002", "fastvit_t8", "mobileone_s1", "repvgg_b0"])
def test_folds_everything_timm_folds_and_every_conv_bn_pair(arch):
    """Same count as timm's deploy form, minus what timm leaves: each BN2d still in timm's
    deploy form (2C parameters) becomes the bias (C) of the bias-free conv before it."""
    model, x = build(arch)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    result = fuse_and_compare(model, x, 1e-5)
    fused = result.model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    left = sum(m.num_features for m in deploy.modules() if isinstance(m, nn.BatchNorm2d))
    assert n_params(fused) == n_params(deploy) - left == result.report.params_after


def test_repvit_m0_9_matches_timm_including_the_classifier_head():
    model, x = build("repvit_m0_9")
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    result = fuse_and_compare(model, x, 1e-5)
    fused = result.model
    norms = nn.modules.batchnorm._BatchNorm
    assert not any(isinstance(m, norms) for m in fused.modules())
    # the two BatchNorm1d + Linear heads (averaged) become one Linear, as timm's own code
    # merges them
    assert n_params(fused) == n_params(deploy)


def test_repghostnet_050_float64_exact_and_verified():
    model, x = build("repghostnet_050", torch.float64)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    result = fuse_and_compare(model, x, 1e-10, verify=True)
    assert result.report.ok
    # more folding than timm (conv -> BN of the primary and shortcut convs), never less
    assert result.report.params_after < n_params(deploy) < result.report.params_before
    # a ghost module's cheap 3x3 reads zero padding of the biased primary conv's output:
    # that composition is not exact and must be refused as a whole, then cut after the
    # primary conv so that the fusion BN still folds (no BN left, as timm leaves some)
    assert any("bias would pass through the zero padding" in r.reason
               for r in result.report.split)
    bns = lambda m: sum(isinstance(q, torch.nn.BatchNorm2d) for q in m.modules())  # noqa: E731
    assert bns(result.model) == 0 < bns(deploy)


@pytest.mark.parametrize("arch", ["repghostnet_050"])
def test_float32_within_1e5(arch):
    model, x = build(arch)
    fuse_and_compare(model, x, 1e-5)
