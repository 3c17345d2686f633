"""The training-form evaluator's float64 depthwise convolution (``F.unfold`` times each
channel's taps, used where aten would run one convolution per group) against
``F.conv2d``: outputs and the gradients of input, weight and bias, every geometry; and
the evaluator takes that route for a proof-sized depthwise region, not for others."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repfuse.core.spec import ConvSpec
from repfuse.region import reference
from repfuse.region.reference import _depthwise, _float64_depthwise

F64 = torch.float64


@st.composite
def depthwise_cases(draw):
    c, m = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    size = tuple(max(1, d[a] * (k[a] - 1) + 1 - 2 * p[a]) + draw(st.integers(0, 6))
                 for a in range(2))
    return dict(c=c, m=m, k=k, s=s, d=d, p=p, n=draw(st.integers(1, 3)), size=size,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@given(case=depthwise_cases())
def test_depthwise_matches_conv2d_with_gradients(case):
    g = torch.Generator().manual_seed(case["seed"])
    c, m = case["c"], case["m"]
    x = torch.randn(case["n"], c, *case["size"], generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(c * m, 1, *case["k"], generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(c * m, generator=g, dtype=F64, requires_grad=True) if case["bias"] else None
    want = F.conv2d(x, w, b, case["s"], case["p"], case["d"], c)
    got = _depthwise(x, w, b, ConvSpec.from_weight(w.shape, stride=case["s"], padding=case["p"],
                                                   dilation=case["d"], groups=c))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    gy = torch.randn(want.shape, generator=g, dtype=F64)
    leaves = [t for t in (x, w, b) if t is not None]
    for a, e in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)


def test_route_only_for_small_float64_depthwise():
    w = torch.zeros(8, 1, 3, 3, dtype=F64)
    assert _float64_depthwise(torch.zeros(1, 8, 6, 7, dtype=F64), w, 8)
    assert not _float64_depthwise(torch.zeros(1, 8, 6, 7), w.float(), 8)            # float32
    assert not _float64_depthwise(torch.zeros(1, 8, 6, 7, dtype=F64),
                                  torch.zeros(8, 2, 3, 3, dtype=F64), 4)            # 2 per group
    big = torch.zeros(1, 8, 1024, 1024, dtype=F64)                                  # too large
    assert _depthwise(big, w, None, ConvSpec.from_weight(w.shape, padding=1, groups=8)) is None


@pytest.mark.parametrize("grad", [True, False])
def test_a_depthwise_region_is_evaluated_through_it(monkeypatch, grad):
    """Proving a conv+BN depthwise block runs the evaluator's depthwise route, and the proof
    (which compares it with the fused kernel through the core) passes."""
    import repfuse

    calls = []
    real = reference._depthwise
    monkeypatch.setattr(reference, "_depthwise", lambda *a: calls.append(1) or real(*a))
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].running_mean.normal_()
    with torch.set_grad_enabled(grad):
        result = repfuse.fuse(model, torch.randn(1, 8, 16, 16))
    assert result.report.ok and len(result.report.fused) == 1 and calls
