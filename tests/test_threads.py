"""Conversion picks its own torch thread count (one per idle core, at most the caller's),
says so in the debug log and gives the caller's setting back, also after an error."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import repfuse
from repfuse.errors import InputError
from repfuse.threads import conversion_threads, idle_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_idle_cores_decide(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert idle_threads(8)[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert idle_threads(8)[0] == min(8, _cores())
    assert idle_threads(1)[0] == 1          # never more than the caller's setting


def test_body_runs_with_the_chosen_count_and_the_setting_comes_back(monkeypatch, two_threads):
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    with pytest.raises(RuntimeError), conversion_threads() as n:
        assert n == torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_fuse_and_fuse_onnx_log_their_choice_and_restore(monkeypatch, caplog, two_threads,
                                                         tmp_path):
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.DEBUG, logger="repfuse"):
        repfuse.fuse(model, x)
        repfuse.export_onnx(model, x, tmp_path / "m.onnx")
        repfuse.fuse_onnx(tmp_path / "m.onnx")
        with pytest.raises(InputError):
            repfuse.fuse_onnx(tmp_path / "missing.onnx")
    chosen = [r.getMessage() for r in caplog.records if "torch thread" in r.getMessage()]
    assert len(chosen) == 3 and all(m.startswith("conversion uses 1 torch thread")
                                    for m in chosen)
    assert torch.get_num_threads() == 2
