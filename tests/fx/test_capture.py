"""The activation windows ``fx.reach`` captures for the region proofs: sized from the
model's widest kernel or pooling window (``fx.trace.capture_crop``), each the real value's
top-left window, and wide enough for the probe of a region of that kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repfuse
import repfuse.fx.pipeline as pipeline
from repfuse.fx import fuse as fx_fuse
from repfuse.fx.reach import reach
from repfuse.fx.trace import CAPTURE, CAPTURE_CHANNELS_LAST, CAPTURE_CROP, capture_crop, captured
from repfuse.proofs.region import probe_shape


def _block(k: int, dilation: int = 1) -> nn.Module:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, k, padding=pad, dilation=dilation),
                         nn.BatchNorm2d(8), nn.ReLU())


@pytest.mark.parametrize(("model", "crop"), [
    (_block(3), 8),                                  # probe 6x7
    (_block(5), 11),                                 # probe 10x11
    (_block(7), 15),                                 # probe 14x15
    (_block(3, dilation=3), 15),                     # extent 7
    (_block(31), CAPTURE_CROP),                      # probe 62x63: the largest window
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(5, 1, 2)), 11),
    (nn.Sequential(nn.Conv2d(3, 4, (1, 9), padding=(0, 4))), 19),
    (nn.Sequential(nn.Linear(4, 4)), 8),
])
def test_crop_is_the_probe_of_the_widest_kernel(model, crop):
    assert capture_crop(model) == crop


@pytest.mark.parametrize(("shape", "channels_last"), [
    ((2, 3, 20, 21), False),
    ((2, 3, 20, 21), True),     # strides of a channels-last value
    ((3, 3, 5, 4), False),      # a map smaller than the window
])
def test_captured_windows_are_the_real_values(shape, channels_last):
    torch.manual_seed(0)
    model = _block(3).eval()
    x = torch.randn(shape)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    found = reach(model, (x,), fx_fuse._capture)
    graph = found.units[id(model)].graph
    relu = next(n for n in graph.nodes if n.target == "1")    # the first ReLU's output
    with torch.no_grad():
        value = model[1](model[0](x))
    c = capture_crop(model)
    assert torch.equal(captured(relu, CAPTURE), value[:1, :, :c, :c])
    assert torch.equal(captured(relu, CAPTURE_CHANNELS_LAST), value[:1, :c, :c, :])


@pytest.mark.parametrize("k", [3, 7])
def test_a_region_of_the_widest_kernel_is_proven_on_a_whole_real_window(monkeypatch, k):
    """The proof's activation window covers its whole probe with real values."""
    seen = []
    real = pipeline.prove_region

    def spy(expr, affine, activation, **kwargs):
        seen.append((probe_shape(affine.spec, "NCHW", expr), activation))
        return real(expr, affine, activation, **kwargs)
    monkeypatch.setattr(pipeline, "prove_region", spy)
    torch.manual_seed(0)
    model = _block(k).eval()
    x = torch.randn(1, 3, 48, 48)
    result = repfuse.fuse(model, x)
    assert result.report.fused and seen
    for (_, _, h, w), activation in seen:
        assert activation is not None and activation.shape[-2] >= h \
            and activation.shape[-1] >= w, ((h, w), activation.shape)
    # and the capture is no larger than that: a 3x3 model keeps 8x8 windows, not 40x40
    if k == 3:
        assert all(a.shape[-2:] == (8, 8) for _, a in seen)


class _Scales(nn.Module):
    """A conv's output read by one child unit, scaled in place, then read by another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.first = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.second = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.conv(x)
        a = self.first(y)
        y.mul_(2)
        return a + self.second(y)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_one_value_is_captured_once_while_it_is_unchanged(mode):
    """The node that made a value and the placeholder of a unit it is passed to hold the
    same boxes; after an in-place change the next unit's placeholder gets boxes of its
    own, and each node's window is its value as it was when the node ran."""
    torch.manual_seed(0)
    model = _Scales().eval()
    x = torch.randn(1, 3, 12, 12)
    with getattr(torch, mode)():
        found = reach(model, (x,), fx_fuse._capture)
    conv = next(n for n in found.units[id(model)].graph.nodes if n.target == "conv")
    first, second = (next(n for n in found.units[id(m)].graph.nodes if n.op == "placeholder")
                     for m in (model.first, model.second))
    with torch.no_grad():
        value = model.conv(x)
    c = capture_crop(model)
    for key, want in ((CAPTURE, value[:1, :, :c, :c]), (CAPTURE_CHANNELS_LAST,
                                                         value[:1, :c, :c, :])):
        assert torch.equal(captured(conv, key), want)
        assert torch.equal(captured(first, key), want)
        assert torch.equal(captured(second, key), 2 * want)
        assert second.meta[key] is not conv.meta[key]
        shared = first.meta[key] is conv.meta[key]
        assert shared == (mode == "no_grad")    # inference tensors have no version counter
