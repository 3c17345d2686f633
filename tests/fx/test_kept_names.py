"""The fused model keeps the user's attribute names where a fused layer replaces a module:
a classifier head fused with the global pool in front of it is installed as ``head`` (the
pool stays in the graph, so ``head`` still reads pooled features), no-op modules the
forward no longer calls stay in place, and timm's own API on the fused model
(``get_classifier``, ``forward_head``) keeps working."""

from __future__ import annotations

import pytest
import timm  # a test dependency: these tests must run, never skip
import torch
from helpers.layer_blocks import build
from torch import nn

import repfuse

NORMS = nn.modules.batchnorm._BatchNorm


def _fuse(model, x):
    result = repfuse.fuse(model, x)
    assert result.report.ok and result.report.verified, result.report.to_dict()
    return result.model


def _paths(model: nn.Module) -> set[str]:
    return {p for p, _ in model.named_modules()}


def test_repvit_head_stays_head_and_timm_api_runs():
    torch.manual_seed(0)
    model = timm.create_model("repvit_m0_9", pretrained=False).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused = _fuse(model, x)
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    # the pool + both heads + their norms: one Linear, installed as ``head``
    assert type(fused.head) is nn.Linear and fused.get_classifier() is fused.head
    assert [n for n, _ in fused.named_children()] == [n for n, _ in model.named_children()]
    # new names only for the multi-branch token mixers' convs (timm's reparam_conv)
    assert all(p.endswith(".reparam_conv") for p in _paths(fused) - _paths(model))
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = feats.mean((2, 3))
        torch.testing.assert_close(fused.head(pooled), model.head(pooled), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(fused.forward_head(fused.forward_features(x)),
                                   model.forward_head(feats), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_levit_distilled_heads_become_head():
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False).eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    fused = _fuse(model, x)
    assert type(fused.head) is nn.Linear
    # the distillation head is merged into ``head`` (the average of the two)
    assert [n for n, _ in fused.named_children()] == ["stem", "stages", "head"]
    tokens = torch.randn(3, model.num_features, dtype=torch.float64)
    with torch.no_grad():
        want = (model.head(tokens) + model.head_dist(tokens)) / 2
        torch.testing.assert_close(fused.head(tokens), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["pooled_head", "distilled_head"])
def test_inlined_head_is_replaced_whole(name):
    """A head whose norm, dropout and Linear the region fuses (its forward copied into the
    parent's graph) is replaced by the Linear under its own name, not left as a container
    holding ``head.l``."""
    model, x, _, _ = build(name)
    model, x = model.double(), x.double()
    fused = _fuse(model, x)
    assert type(fused.head) is nn.Linear and not hasattr(fused, "reparam_linear")
    pooled = x.mean((2, 3))
    if name == "pooled_head":      # BN2d before the pool: folded in, per channel
        with torch.no_grad():
            pooled = model.flatten(model.pool(model.norm(x)))
            want = model.head(pooled)
            got = fused.head(x.mean((2, 3)))
    else:
        with torch.no_grad():
            want, got = model(x), fused.head(pooled)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
