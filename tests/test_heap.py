"""Conversion freezes the objects that exist before it (gc.freeze) and gives the
collector back as it was: unfrozen, also after an error; a caller's own freeze or a
disabled collector are left alone; cycles made during conversion are still collected."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import repfuse
from repfuse.errors import InputError
from repfuse.heap import frozen_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


#: what the model's forward saw (module level: fuse runs a copy of the model)
SEEN: list[int] = []
CYCLES: list[weakref.ref] = []


class Spy(nn.Module):
    """conv + BN that records the freeze count and makes one garbage cycle per call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        SEEN.append(gc.get_freeze_count())
        CYCLES.append(weakref.ref(_Cycle()))
        return self.bn(self.conv(x))


@pytest.fixture(autouse=True)
def _clean_heap():
    gc.unfreeze()
    gc.enable()
    SEEN.clear()
    CYCLES.clear()
    yield
    gc.unfreeze()
    gc.enable()


def test_fuse_runs_on_a_frozen_heap_and_gives_it_back():
    result = repfuse.fuse(Spy().eval(), torch.randn(1, 3, 8, 8))
    assert result.report.ok
    assert SEEN and min(SEEN) > 0               # the existing objects were frozen
    assert gc.get_freeze_count() == 0           # and given back
    gc.collect()
    assert CYCLES and all(ref() is None for ref in CYCLES)  # cycles made meanwhile collected


def test_fuse_onnx_runs_on_a_frozen_heap(tmp_path, monkeypatch):
    from repfuse.onnx import pipeline

    path = tmp_path / "m.onnx"
    torch.onnx.export(Spy().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                      do_constant_folding=False)
    infer = pipeline._infer_shapes

    def spy(*args):
        SEEN.append(gc.get_freeze_count())
        return infer(*args)
    monkeypatch.setattr(pipeline, "_infer_shapes", spy)
    SEEN.clear()
    result = repfuse.fuse_onnx(path)
    assert result.report.ok
    assert SEEN and min(SEEN) > 0 and gc.get_freeze_count() == 0


def test_the_heap_is_given_back_after_an_error():
    with pytest.raises(InputError):
        repfuse.fuse(Spy().eval(), "not a tensor")
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_a_callers_freeze_and_disabled_collector_are_kept(monkeypatch):
    calls = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda real=real, name=name: (calls.append(name), real()))
    gc.freeze()
    calls.clear()
    repfuse.fuse(Spy().eval(), torch.randn(1, 3, 8, 8))
    assert calls == [] and gc.get_freeze_count() > 0    # the caller's freeze stands
    gc.unfreeze()
    gc.disable()
    calls.clear()
    with frozen_heap():
        assert gc.get_freeze_count() == 0
    assert calls == [] and not gc.isenabled()


def test_nested_conversions_leave_the_heap_to_the_outer_one(monkeypatch):
    """The inner one neither freezes nor unfreezes (counts are not compared: frozen objects
    freed meanwhile lower the count)."""
    calls = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda real=real, name=name: (calls.append(name), real()))
    with frozen_heap():
        assert calls == ["freeze"] and gc.get_freeze_count() > 0
        with frozen_heap():
            assert gc.get_freeze_count() > 0
        assert calls == ["freeze"] and gc.get_freeze_count() > 0
    assert calls == ["freeze", "unfreeze"] and gc.get_freeze_count() == 0
