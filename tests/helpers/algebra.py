"""Shared helpers for the algebra tests: random modules and float64 comparisons."""

import torch
import torch.nn as nn
import torch.nn.functional as F

D = torch.float64
TOL = 1e-10


def rand_conv(cin, cout, k=None, gen=None, **kw):
    conv = nn.Conv2d(cin, cout, kw.pop("kernel_size", k), **kw).to(D)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=D))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=D))
    return conv


def rand_bn(c, gen, affine=True):
    bn = nn.BatchNorm2d(c, affine=affine).to(D)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=gen, dtype=D) * 2 - 1)
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=D) * 1.5 + 0.5)
        if affine:
            bn.weight.copy_(torch.rand(c, generator=gen, dtype=D) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=gen, dtype=D) * 2 - 1)
    return bn.eval()


def conv_ref(x, weight, bias, stride, padding, dilation, groups, mode="zeros"):
    """F.conv2d with (top, bottom, left, right) padding in any padding mode."""
    t, b, l, r = padding
    x = F.pad(x, (l, r, t, b), mode="constant" if mode == "zeros" else mode)
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
