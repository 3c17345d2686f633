"""The float64 runs' depthwise convolutions (``repfuse.proofs.exact``): inside
``exact_norms`` a float64 depthwise ``F.conv2d`` on the CPU runs on the core's kernels, with
the values and gradients of aten's float64 convolution; every other convolution is left to
aten."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from repfuse.core import autograd as core_autograd
from repfuse.proofs import exact
from repfuse.proofs.exact import exact_norms
from repfuse.proofs.model import _float64_values, upstream_for


@pytest.fixture
def routed(monkeypatch):
    """The calls that reached the core's convolution inside ``exact_norms``."""
    calls = []
    real = core_autograd.conv2d

    def spy(*args, **kwargs):
        calls.append(kwargs.get("algorithm"))
        return real(*args, **kwargs)

    monkeypatch.setattr(exact.core_autograd, "conv2d", spy)
    return calls


def _grads(x, w, b, conv, upstream):
    x = x.clone().requires_grad_(True)
    y = conv(x)
    wanted = [x] + [t for t in (w, b) if t is not None and t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, wanted, upstream(y))]


@settings(max_examples=40, deadline=None)
@given(c=st.integers(2, 6), mult=st.integers(1, 2), k=st.integers(1, 4),
       stride=st.integers(1, 3), dilation=st.integers(1, 2), pad=st.integers(0, 3),
       hw=st.tuples(st.integers(4, 11), st.integers(4, 11)), n=st.integers(1, 2),
       bias=st.booleans(), weight_grad=st.booleans(), tuple_padding=st.booleans(),
       channels_last=st.booleans())
def test_depthwise_matches_aten_float64(c, mult, k, stride, dilation, pad, hw, n, bias,
                                        weight_grad, tuple_padding, channels_last):
    gen = torch.Generator().manual_seed(c * 1000 + k * 100 + pad * 10 + stride)
    x = torch.randn(n, c, *hw, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c * mult, 1, k, k, generator=gen, dtype=torch.float64)
    b = torch.randn(c * mult, generator=gen, dtype=torch.float64) if bias else None
    w.requires_grad_(weight_grad)
    if b is not None:
        b.requires_grad_(weight_grad)
    padding = (pad, max(pad - 1, 0)) if tuple_padding else pad
    pads = (padding, padding) if isinstance(padding, int) else padding
    # an empty output is not a convolution either computes
    assume(all(hw[i] + 2 * pads[i] - dilation * (k - 1) - 1 >= 0 for i in (0, 1)))

    def conv(t):
        return F.conv2d(t, w, b, stride, padding, dilation, c)

    def upstream(y):
        return torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)

    want = _grads(x, w, b, conv, upstream)
    calls = []
    real = core_autograd.conv2d
    exact.core_autograd.conv2d = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:     # (hypothesis does not take function-scoped fixtures: patched by hand)
        with exact_norms():
            got = _grads(x, w, b, conv, upstream)
    finally:
        exact.core_autograd.conv2d = real
    assert calls == [1]
    for g, h in zip(got, want, strict=True):
        assert g.shape == h.shape
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_only_float64_depthwise_cpu_convolutions_are_routed(routed):
    x64 = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    dw64 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    with exact_norms():
        F.conv2d(x64, dw64, None, 1, 1, 1, 4)                       # routed
        F.conv2d(x64.float(), dw64.float(), None, 1, 1, 1, 4)       # float32
        F.conv2d(x64, torch.randn(4, 4, 3, 3, dtype=torch.float64), padding=1)   # dense
        F.conv2d(x64, torch.randn(4, 2, 3, 3, dtype=torch.float64), None, 1, 1, 1, 2)
        F.conv2d(x64, dw64, None, 1, "same", 1, 4)                  # string padding
        F.conv2d(x64[0], dw64, None, 1, 1, 1, 4)                    # unbatched input
    assert routed == ["reference"]


def test_weight_that_requires_grad_takes_the_cores_auto_choice(routed):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8).double()
    with exact_norms():
        conv(torch.randn(1, 8, 40, 40, dtype=torch.float64))
        conv.weight.requires_grad_(False)
        conv.bias.requires_grad_(False)
        conv(torch.randn(1, 8, 40, 40, dtype=torch.float64))
    assert routed == ["auto", "reference"]


def test_truth_of_a_depthwise_model_is_computed_by_the_core(routed):
    """The truth run (weights cast where they are read) reaches the core, and its outputs
    and input gradient are those of the model's float64 copy run on aten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
                          nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 20, 20)
    upstream = upstream_for([("output", model(x))])
    got = _float64_values(model, (x,), True, upstream)
    assert routed == ["reference"]
    model64 = copy.deepcopy(model).double()
    x64 = x.double().requires_grad_(True)
    y = model64(x64)
    (gx,) = torch.autograd.grad(y, x64, upstream["output"].double())
    torch.testing.assert_close(got["output"], y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["grad input"], gx, rtol=1e-12, atol=1e-12)
