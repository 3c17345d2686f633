"""The ONNX region search's work is bounded by the size of the region: a long
separable chain, one linear region refused as a whole, is cut into parts that each
fold their batch norms, trying a number of parts within twice the chain's length."""

from __future__ import annotations

import pytest
from helpers.onnx_graphs import G, assert_same, ops

import repfuse


def separable_chain(blocks: int, c: int):
    """``blocks`` x (depthwise 3x3 + BN -> 1x1 + BN), no activation: a 1x1's bias would
    cross the next depthwise conv's zero padding, and a depthwise 3x3 then a dense 1x1
    would grow past the limit."""
    g = G(c)
    y = "x"
    for _ in range(blocks):
        y = g.bn(g.conv(y, c, c, 3, group=c, bias=False), c)
        y = g.bn(g.conv(y, c, c, 1, bias=False), c)
    return g.model(y, 17)


@pytest.mark.parametrize("blocks", [10, 30])
def test_separable_chain_attempts_stay_linear(blocks):
    c = 32
    m = separable_chain(blocks, c)
    res = repfuse.fuse_onnx(m, verify=False)
    nodes = 4 * blocks
    search = res.report.search
    assert 1 <= search["attempts"] <= 2 * nodes + 1, search
    assert search["reductions"] < search["attempts"], search    # shapes refused the rest
    assert ops(res.model) == ["Conv"] * (2 * blocks)
    assert_same(m, res.model, c=c, rtol=1e-4)
