"""The differentiable convolution on the core's kernels: gradcheck and training parity."""

import pytest
import torch
import torch.nn.functional as F
from helpers.kernels import F64, nhwc
from hypothesis import given, settings
from hypothesis import strategies as st

from repfuse.core.autograd import conv2d

ALGORITHMS = ["reference", "native", "auto", "grouped"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("geometry", [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(0, 2, 1, 1), dilation=(1, 2), groups=2),
    dict(stride=2, padding=(1, 0, 0, 1), dilation=1, groups=4),
])
def test_gradcheck(algorithm, layout, geometry):
    gen = torch.Generator().manual_seed(0)
    g = geometry["groups"]
    x = torch.randn(1, 4, 6, 5, generator=gen, dtype=F64)
    w = torch.randn(4, 4 // g, 3, 2, generator=gen, dtype=F64)
    if layout == "NHWC":
        x, w = nhwc(x), nhwc(w)
    b = torch.randn(4, generator=gen, dtype=F64)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: conv2d(x, w, b, **geometry, layout=layout, algorithm=algorithm),
        inputs, atol=1e-8, rtol=1e-6)


@settings(max_examples=25)
@given(k=st.integers(1, 4), s=st.integers(1, 2), p=st.integers(0, 2), g=st.sampled_from([1, 2]),
       layout=st.sampled_from(["NCHW", "NHWC"]), algorithm=st.sampled_from(ALGORITHMS))
def test_gradients_match_torch_conv(k, s, p, g, layout, algorithm):
    gen = torch.Generator().manual_seed(k * 7 + s)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(6, 4 // g, k, k, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=F64, requires_grad=True)
    y = F.conv2d(x, w, b, s, p, 1, g)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    want = torch.autograd.grad(y, (x, w, b), gy)
    t = nhwc if layout == "NHWC" else (lambda v: v)
    xl, wl = t(x.detach()).requires_grad_(), t(w.detach()).requires_grad_()
    bl = b.detach().clone().requires_grad_()
    yl = conv2d(xl, wl, bl, s, p, 1, g, layout=layout, algorithm=algorithm)
    torch.testing.assert_close(yl, t(y.detach()), atol=1e-10, rtol=0)
    got = torch.autograd.grad(yl, (xl, wl, bl), t(gy))
    for a, e in zip(got, (t(want[0]), t(want[1]), want[2])):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_through_the_core_tracks_torch(dtype):
    """A small model trained through the core follows the same trajectory as nn.Conv2d."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, stride=2, padding=1)).to(dtype)
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    target = torch.randn(4, 4, 4, 4, dtype=dtype)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(5):
        loss_ref = (ref(x) - target).float().pow(2).mean()
        w1, b1, w2, b2 = params
        h = torch.relu(conv2d(x, w1, b1, 1, 1))
        loss = (conv2d(h, w2, b2, 2, 1) - target).float().pow(2).mean()
        for o, lo in ((opt_ref, loss_ref), (opt, loss)):
            o.zero_grad()
            lo.backward()
            o.step()
        losses.append(loss.item())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(loss, loss_ref, atol=tol, rtol=tol)
    assert losses[-1] < losses[0]
