"""repfuse.fuse on a zoo of hand-built training-form blocks (ordinary nn.Modules).

Every design: the fused model computes what the training form computes (float64,
1e-10), every linear region became exactly one conv, and no batch norm is left.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.zoo import ZOO, Net, batch_norms_left, count_convs, make, randomize_bn

import repfuse


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_design_fuses_to_one_conv_per_region(name):
    model = make(name)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    result = repfuse.fuse(model, x, verify=False)
    fused = result.model
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * max(1.0, ref.abs().max().item()))
    expected = ZOO[name][1]
    assert count_convs(fused.block) == expected
    assert count_convs(fused) == expected + 1  # the stem is a lone conv, left as it is
    assert batch_norms_left(fused) == 0
    assert len(result.report.fused) == expected
    assert not result.report.skipped
    assert isinstance(fused.head, nn.Linear) and isinstance(fused.stem, nn.Conv2d)
    assert type(fused.block).__name__ == type(model.block).__name__
    # the original model is untouched
    assert batch_norms_left(model) > 0 or name == "functional"


@pytest.mark.parametrize("name", ["repvgg_stride2", "dbb", "concat", "functional", "repmixer"])
def test_zoo_design_float32_with_proofs(name):
    model = make(name).float()
    x = torch.randn(2, 3, 16, 16)
    result = repfuse.fuse(model, x)
    assert result.report.ok, result.report.to_dict()
    assert result.report.verified
    for region in result.report.fused:
        assert region.proofs is not None and region.proofs.ok
        assert region.max_abs_err < 1e-9
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


class BNAct(nn.BatchNorm2d):
    """Batch norm and activation in one module (as timm's BatchNormAct2d)."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return self.act(x)


class ConvNormAct(nn.Module):
    def __init__(self, c=8, cout=8):
        super().__init__()
        self.conv = nn.Conv2d(c, cout, 3, padding=1, bias=False)
        self.bn = BNAct(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_conv_then_module_holding_bn_and_activation():
    """The BN inside a BN+activation module folds into the conv before it."""
    torch.manual_seed(0)
    model = randomize_bn(Net(nn.Sequential(ConvNormAct(), ConvNormAct()))).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    result = repfuse.fuse(model, x)
    fused = result.model
    assert result.report.ok and len(result.report.fused) == 2
    assert batch_norms_left(fused) == 0
    assert type(fused.block[0]).__name__ == "ConvNormAct"
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * max(1.0, ref.abs().max().item()))


class DeepStemNet(nn.Module):
    """A deep stem ending in a conv, then the model's own BN (timm's resnet*d)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU()
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.act1(self.bn1(self.conv1(x))))


def test_module_ending_in_conv_then_bn_in_the_caller():
    """The caller's BN folds into the conv that ends the submodule before it."""
    torch.manual_seed(0)
    model = randomize_bn(DeepStemNet()).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    result = repfuse.fuse(model, x)
    fused = result.model
    assert result.report.ok and len(result.report.fused) == 2
    assert batch_norms_left(fused) == 0 and count_convs(fused) == 3
    assert isinstance(fused.head, nn.Conv2d)
    # the fused convs keep the paths of the convs they replace (the stem is inlined)
    assert sorted(r.path for r in result.report.fused) == ["conv1.0", "conv1.3"]
    assert all(isinstance(fused.get_submodule(p), nn.Conv2d) for p in ("conv1.0", "conv1.3"))
    assert not any("reparam" in name for name, _ in fused.named_modules())
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * max(1.0, ref.abs().max().item()))
