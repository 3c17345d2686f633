"""Conversion picks its own torch thread count (one per core other processes leave idle, at
most the caller's), says so in the debug log and gives the caller's setting back, also
after an error. This process's own threads are not other work."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import repfuse
from repfuse import threads
from repfuse.errors import InputError
from repfuse.threads import conversion_threads, idle_threads, others_runnable


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _others(monkeypatch, n: float) -> None:
    monkeypatch.setattr(threads, "others_runnable", lambda: n)


def test_idle_cores_decide(monkeypatch):
    _others(monkeypatch, 40)
    assert idle_threads(8)[0] == 1
    _others(monkeypatch, 0)
    assert idle_threads(8)[0] == min(8, _cores())
    assert idle_threads(1)[0] == 1          # never more than the caller's setting


def test_load_average_where_proc_does_not_say(monkeypatch):
    def no_proc():
        raise OSError("no /proc")
    monkeypatch.setattr(threads, "others_runnable", no_proc)
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert idle_threads(8) == (1, f"{_cores()} core(s), load average 40.0")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert idle_threads(8)[0] == min(8, _cores())


def _proc(tmp_path, running: int, own: str):
    """A fake ``/proc/loadavg`` with ``running`` runnable tasks and a task folder with one
    thread per letter of ``own`` in that state (a name with a parenthesis and a space, as
    a thread may have)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "loadavg").write_text(f"1.00 1.00 1.00 {running}/300 4242\n")
    for i, state in enumerate(own):
        (tmp_path / "task" / str(100 + i)).mkdir(parents=True)
        (tmp_path / "task" / str(100 + i) / "stat").write_text(
            f"{100 + i} (pt main) S) {state} 1 2 3 4\n")
    return str(tmp_path / "loadavg"), str(tmp_path / "task")


@pytest.mark.parametrize("running,own,others", [
    (3, "RRS", 1),      # two of the three runnable tasks are this process's threads
    (2, "RR", 0),       # only this process runs: its own load is not other work
    (5, "R", 4),
    (1, "RRS", 0),      # counted at different instants: never below zero
])
def test_own_threads_are_not_other_work(tmp_path, running, own, others):
    assert others_runnable(*_proc(tmp_path, running, own)) == others


def test_a_busy_process_of_its_own_converts_with_every_core(monkeypatch, tmp_path):
    """Having computed for a while (a one-minute load average of 1 on its own) does not cost
    this process its threads; other processes' runnable tasks do."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "LOADAVG", _proc(tmp_path / "a", 1, "R")[0])
    monkeypatch.setattr(threads, "OWN_TASKS", str(tmp_path / "a" / "task"))
    assert idle_threads(2)[0] == 2
    monkeypatch.setattr(threads, "LOADAVG", _proc(tmp_path / "b", 3, "R")[0])
    monkeypatch.setattr(threads, "OWN_TASKS", str(tmp_path / "b" / "task"))
    assert idle_threads(2) == (1, "2 core(s), 2 runnable task(s) of other processes")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="no /proc")
def test_reads_this_machines_proc():
    assert others_runnable() >= 0


def test_body_runs_with_the_chosen_count_and_the_setting_comes_back(monkeypatch, two_threads):
    _others(monkeypatch, 40)
    with pytest.raises(RuntimeError), conversion_threads() as n:
        assert n == torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_fuse_and_fuse_onnx_log_their_choice_and_restore(monkeypatch, caplog, two_threads,
                                                         tmp_path):
    _others(monkeypatch, 40)
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
