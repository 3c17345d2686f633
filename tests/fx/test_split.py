"""Refused regions are cut where the most of them still fuses.

A maximal linear region can be refused as a whole (a bias would pass through a zero
padding, or the fused kernel would be much larger than its branches) while its parts
fuse: the fx front end then cuts it at an interior node that every path from its input
to its output passes through, choosing the cut that lets the most nodes fuse. Without
that cut these models keep batch norms (RepGhost's fusion BN, a BN after a depthwise
conv) that can be folded exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers.zoo import conv_bn, randomize_bn

import repfuse


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


class RepGhostTail(nn.Module):
    """RepGhost's second ghost module: no activation between the primary 1x1 and the
    cheap depthwise 3x3, whose output is summed with a BN of its input."""

    def __init__(self, cin=8, c=12):
        super().__init__()
        self.primary_conv = conv_bn(cin, c, 1)
        self.cheap_operation = conv_bn(c, c, 3, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x1 = self.primary_conv(x)
        return torch.relu(self.cheap_operation(x1) + self.fusion_bn(x1))


class Chain(nn.Module):
    """1x1+BN then a padded depthwise 3x3+BN, no activation: refused as one region
    (the 1x1's bias would pass through the 3x3's zero padding)."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn_b = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn_b(self.b(self.bn_a(self.a(x)))))


class Shortcut(nn.Module):
    """A stride-2 depthwise+BN then 1x1+BN inside one Sequential (a RepGhost shortcut):
    fusing both would multiply the parameters, so it becomes two adjacent convs in the
    same graph."""

    def __init__(self, c=8, cout=16):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False),
                                      nn.BatchNorm2d(c), nn.Conv2d(c, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.shortcut(x))


def fuse_checked(model: nn.Module, convs: int):
    model = randomize_bn(model).double().eval()
    x = torch.randn(2, model_inputs(model), 9, 11, dtype=torch.float64)
    result = repfuse.fuse(model, x)
    assert result.report.ok
    fused = result.model
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)
    assert count(fused, nn.BatchNorm2d) == 0
    assert count(fused, nn.Conv2d) == convs
    return result


def model_inputs(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def test_repghost_fusion_bn_folds_into_the_cheap_conv():
    result = fuse_checked(RepGhostTail(), convs=2)
    (split,) = result.report.split    # the whole region, reported with why and where
    assert "zero padding" in split.reason and "cut after primary_conv" in split.reason
    assert not result.report.skipped
    fused = {r.result for r in result.report.regions if r.status != "skipped"}
    assert any("dw" in f for f in fused)


def test_chain_is_cut_before_the_padded_conv():
    fuse_checked(Chain(), convs=2)


def test_adjacent_regions_in_one_graph_are_rewritten_in_order():
    result = fuse_checked(Shortcut(), convs=2)
    (split,) = result.report.split
    assert "multiply the parameters" in split.reason


def test_fused_twice_changes_nothing():
    model = randomize_bn(RepGhostTail()).double().eval()
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    once = repfuse.fuse(model, x).model
    twice = repfuse.fuse(once, x)
    assert all(r.status != "fused" or r.params_before == r.params_after
               for r in twice.report.regions)
    assert count(twice.model, nn.Conv2d) == count(once, nn.Conv2d)


def test_cli_tables_say_fused_in_parts():
    from rich.console import Console

    from repfuse.cli.render import region_counts, region_tables

    result = fuse_checked(RepGhostTail(), convs=2)
    console = Console(width=80, record=True)
    for table in region_tables(result.report, title="tail"):
        console.print(table)
    text = console.export_text()
    assert "not fused as a whole" in text and "fused in parts" in text
    assert region_counts(result.report) == ("2 region(s) fused, 1 fused in parts, 0 left alone; "
                                            "convs 2 -> 2, norms 3 -> 0")


def test_zero_bias_parameters_are_cut_like_nonzero_ones():
    """Freshly initialised BNs (beta = 0, running mean 0) make the 1x1's bias exactly zero:
    one conv would then match the outputs, but not the gradient of that bias, which sees
    the zero border. The structure decides: the region is cut as with trained weights,
    and every proof passes (the weight-gradient mapping included)."""
    torch.manual_seed(0)
    model = RepGhostTail().double().eval()          # default BN statistics and affine
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    result = repfuse.fuse(model, x)
    assert result.report.ok, [(r.path, r.proofs.failures) for r in result.report.fused
                              if r.proofs is not None and not r.proofs.ok]
    (split,) = result.report.split
    assert "bias parameter" in split.reason and "even while it is zero" in split.reason
    assert count(result.model, nn.BatchNorm2d) == 0 and count(result.model, nn.Conv2d) == 2
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)
