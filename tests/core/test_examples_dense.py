"""Worked example (d): a 1x2x5x5 input and a 7x2x3x3 weight, forward, input gradient and
weight gradient at stride 1 and 2, every algorithm and both layouts, against torch."""

import pytest
import torch
import torch.nn.functional as F
from helpers.kernels import F64, nhwc

import repfuse.core as core

ALGORITHMS = ["reference", "native", "auto"]


def example_d(stride, padding):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 5, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(7, 2, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(7, generator=gen, dtype=F64)
    y = F.conv2d(x, w, b, stride, padding)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    return x.detach(), w.detach(), b, y.detach(), gy, gx, gw


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_example_d(layout, algorithm, stride, padding):
    x, w, b, y, gy, gx, gw = example_d(stride, padding)
    t = nhwc if layout == "NHWC" else (lambda v: v)
    kw = dict(layout=layout, algorithm=algorithm)
    torch.testing.assert_close(core.conv2d(t(x), t(w), b, stride, padding, **kw), t(y),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(core.conv2d_input(t(x).shape, t(w), t(gy), stride, padding, **kw),
                               t(gx), atol=1e-12, rtol=0)
    torch.testing.assert_close(core.conv2d_weight(t(x), t(w).shape, t(gy), stride, padding, **kw),
                               t(gw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_example_d_grouped_weight_gradient(stride):
    x, w, _, _, gy, _, gw = example_d(stride, 0)
    torch.testing.assert_close(core.conv2d_weight(x, w.shape, gy, stride, algorithm="grouped"),
                               gw, atol=1e-12, rtol=0)


def test_example_d_matches_torch_nn_grad():
    """The kernels take torch.nn.grad's arguments in torch.nn.grad's order."""
    x, w, _, _, gy, _, _ = example_d(2, 1)
    torch.testing.assert_close(core.conv2d_input(x.shape, w, gy, 2, 1),
                               torch.nn.grad.conv2d_input(x.shape, w, gy, 2, 1))
    torch.testing.assert_close(core.conv2d_weight(x, w.shape, gy, 2, 1),
                               torch.nn.grad.conv2d_weight(x, w.shape, gy, 2, 1))
