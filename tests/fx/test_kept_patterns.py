"""repfuse.fuse keeps activations written out in Python (GELU, HardSigmoid) whole: their
scales and shifts are not folded into the convs next to them, so that an exported fused
model still shows the runtime the pattern it fuses into one kernel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repfuse

C = 8


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


class PythonGelu(nn.Module):
    """conv + BN, GELU written as ``y * (1 + erf(y / sqrt(2))) / 2``, then a conv."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), _bn(C), \
            nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if self.form == "erf":
            y = y * (1 + torch.erf(y / math.sqrt(2))) / 2
        else:
            y = 0.5 * y * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
        return self.conv2(y)


class HardSigmoidGate(nn.Module):
    """Squeeze-and-excitation with a HardSigmoid gate written out: ``relu6(s + 3) / 6``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), _bn(C)
        self.fc1, self.fc2 = nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1)

    def forward(self, x):
        x = self.bn(self.conv(x))
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * (F.relu6(s + 3.0) / 6.0)


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_python_gelu_keeps_its_half(form):
    torch.manual_seed(0)
    model = PythonGelu(form).eval()
    x = torch.randn(2, C, 8, 8)
    result = repfuse.fuse(model, x)
    assert result.report.ok
    assert [r.path for r in result.report.fused] == ["conv1"]       # conv1 + bn1
    torch.testing.assert_close(result.model.conv2.weight, model.conv2.weight, rtol=0, atol=0)
    assert any("gelu" in note for note in result.report.notes)


def test_hardsigmoid_keeps_its_shift():
    torch.manual_seed(0)
    model = HardSigmoidGate().eval()
    x = torch.randn(2, C, 8, 8)
    result = repfuse.fuse(model, x)
    assert result.report.ok
    torch.testing.assert_close(result.model.fc2.bias, model.fc2.bias, rtol=0, atol=0)
    assert any("hardsigmoid" in note for note in result.report.notes)


def test_a_scale_outside_any_pattern_still_folds():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(x)) / 2)

    torch.manual_seed(0)
    model = Half().eval()
    result = repfuse.fuse(model, torch.randn(2, C, 8, 8))
    assert len(result.report.fused) == 1
    assert not any("gelu" in note or "kept" in note for note in result.report.notes)


class ChannelsFirstLayerNorm(nn.Module):
    """A LayerNorm over channels written out as in ConvNeXt's code, then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)
        self.weight = nn.Parameter(torch.rand(C) + 0.5)
        self.bias = nn.Parameter(torch.randn(C))

    def forward(self, x):
        x = self.conv1(x)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.conv2(self.weight[:, None, None] * x + self.bias[:, None, None])


def test_channels_first_layernorm_affine_still_folds():
    """No runtime fuses a norm over the channel axis with its affine (a LayerNormalization
    kernel normalizes trailing axes): the norm is recognised, its affine folds."""
    torch.manual_seed(0)
    model = ChannelsFirstLayerNorm().eval()
    result = repfuse.fuse(model, torch.randn(2, C, 8, 8))
    assert result.report.ok
    assert any("layernorm" in note for note in result.report.notes)
    assert [r.path for r in result.report.fused] == ["conv2"]
