"""Linear / BatchNorm1d, ConvTranspose2d and Conv1d regions through ``repfuse.fuse``: one
layer of the right type per region, no norm left, the report proven ok."""

from __future__ import annotations

import pytest
import torch
from helpers.layer_blocks import BLOCKS, build, randomize
from torch import nn

import repfuse

NORMS = nn.modules.batchnorm._BatchNorm


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_becomes_one_layer_per_region(name):
    model, x, layer, regions = build(name)
    with torch.no_grad():
        expected = model(x)
    result = repfuse.fuse(model, x)
    report = result.report
    assert report.ok and report.verified, report.to_dict()
    assert len(report.fused) == regions and not report.skipped and not report.split
    for region in report.fused:
        assert region.proofs is not None and region.proofs.ok
    fused = result.model
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    layers = [m for m in fused.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                           nn.ConvTranspose2d))]
    assert len(layers) == regions and all(type(m) is layer for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_float64_heads_merge_into_one_linear():
    # (fusing inside no_grad / inference_mode is the proofs' grad-mode independence, tested
    # with them)
    model, x, _, regions = build("distilled_head")
    model, x = model.double(), x.double()
    result = repfuse.fuse(model, x)
    with torch.no_grad():
        got, expected = result.model(x), model(x)
    assert result.report.ok and len(result.report.fused) == regions
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # both heads and their norms in one Linear, under the first head's name; the pool is
    # computed by the graph in front of it, so ``head`` reads pooled features, as it did
    fused = result.model.head
    assert [n for n, _ in result.model.named_children()] == ["head"]
    assert type(fused) is nn.Linear
    pooled = x.mean((2, 3))
    with torch.no_grad():
        torch.testing.assert_close(fused(pooled), expected, rtol=1e-12, atol=1e-12)


class StridedAfterBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, 2)

    def forward(self, x):
        return self.up(self.bn(x))


def test_bn_before_strided_deconv_left_alone_with_the_reason():
    model = randomize(StridedAfterBN())
    x = torch.randn(1, 4, 5, 5)
    result = repfuse.fuse(model, x)
    report = result.report
    assert report.ok and not report.fused
    (skipped,) = report.skipped
    assert "stride phases" in skipped.reason and "bias parameter" in skipped.reason
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


class TokenMixing(nn.Module):
    """A Linear over the token axis (MLP-Mixer): linear, but it mixes positions."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.mix = nn.Linear(5, 5)

    def forward(self, x):           # x: (N, C=8, L=5)
        return self.mix(self.bn(x))


def test_linear_over_positions_is_not_a_channel_linear():
    model = randomize(TokenMixing())
    x = torch.randn(2, 8, 5)
    result = repfuse.fuse(model, x)
    assert result.report.ok and not result.report.fused
    assert any(isinstance(m, nn.BatchNorm1d) for m in result.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


class ConvPoolHead(nn.Module):
    """A 3x3 conv before the global pool: the mean does not commute with it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_global_pool_after_a_spatial_conv_is_not_folded():
    model = randomize(ConvPoolHead())
    x = torch.randn(2, 4, 5, 5)
    result = repfuse.fuse(model, x)
    assert result.report.ok and not result.report.fused
    assert any("not pointwise" in r.reason for r in result.report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))
