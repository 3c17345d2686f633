"""The region search's work is bounded by the size of the region.

A refused region is cut where its parts fuse; the search tries each part once (by
member set) and grows the parts one dominator-to-dominator slice at a time, so the
number of parts it tries stays within a small multiple of the region's nodes, on a long
separable chain that is one linear region and on a deep stack of ghost-style blocks.
The parts it keeps still fold every batch norm that can be folded exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers.zoo import randomize_bn

import repfuse


def conv_bn(cin, cout, k, groups=1):
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


def separable_chain(blocks: int, c: int = 32, act: bool = False) -> nn.Sequential:
    """``blocks`` x (depthwise 3x3+BN -> 1x1+BN [-> ReLU]): without the ReLU the whole
    chain is one linear region, refused as a whole (a 1x1's bias would cross the next
    depthwise conv's zero padding; a depthwise 3x3 then a dense 1x1 would grow)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += conv_bn(c, c, 3, groups=c) + conv_bn(c, c, 1)
        if act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Ghost(nn.Module):
    """A ghost module without its activation: a 1x1+BN whose output and a cheap
    depthwise 3x3+BN of it are concatenated."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.primary = nn.Sequential(*conv_bn(cin, c, 1))
        self.cheap = nn.Sequential(*conv_bn(c, c, 3, groups=c))

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)


class GhostStack(nn.Module):
    """``depth`` ghost bottlenecks (ghost, ghost, plus the input), no activation."""

    def __init__(self, depth: int, c: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(Ghost(c, c // 2), Ghost(c, c // 2)) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def fuse_and_check(model: nn.Module, c: int = 8):
    model = randomize_bn(model).double().eval()
    x = torch.randn(1, c, 6, 7, dtype=torch.float64)
    result = repfuse.fuse(model, x, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-9, atol=1e-9)
    return result


@pytest.mark.parametrize("act", [False, True])
def test_separable_chain_attempts_stay_linear(act):
    blocks = 30
    model = separable_chain(blocks, act=act)
    layers = 4 * blocks
    result = fuse_and_check(model, c=32)
    search = result.report.search
    # each part is tried once; parts grow by one slice per try: at most two tries per
    # node of the region (the whole region counted once)
    assert 1 <= search["attempts"] <= 2 * layers + 1, search
    assert count(result.model, nn.BatchNorm2d) == 0
    assert count(result.model, nn.Conv2d) == 2 * blocks


def test_separable_chain_refusals_by_shape_compute_no_kernel():
    """Growth and a bias crossing a padding are decided by shapes: most parts the search
    tries are refused without being reduced."""
    result = fuse_and_check(separable_chain(30), c=32)
    search = result.report.search
    assert search["reductions"] < search["attempts"], search


def test_ghost_stack_attempts_stay_linear():
    depth = 12
    result = fuse_and_check(GhostStack(depth))
    nodes = depth * (2 * (4 + 1) + 1)      # per block: two ghosts (4 layers + cat), a sum
    assert 1 <= result.report.search["attempts"] <= 2 * nodes + 1, result.report.search
    assert count(result.model, nn.BatchNorm2d) == 0
