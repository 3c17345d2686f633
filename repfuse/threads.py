"""The number of threads torch uses while a model is fused and proven.

Fusing and proving run many small kernels (folding a few thousand kernel elements,
float64 proofs on probe inputs) and a few large ones (the whole-model checks at the
example input's size). With torch's default of one thread per core, every kernel ends
at a barrier where all its threads meet; on a machine whose cores are busy with other
work, a barrier waits for threads the scheduler has not run, and small kernels spend
most of their time waiting. Measured on a 2-core machine at load average 6:
``fuse_onnx`` of a fastvit_t8 export took 9.6 s with 2 threads and 4.3 s with one,
``fuse`` 31.5 s and 3.8 s. On an idle machine the large kernels gain from every core.

So conversion uses one thread per core that other work leaves idle: the cores this
process may run on less the tasks of other processes that are runnable now, at least one
and never more than the caller's setting, which is restored afterwards. On Linux the
runnable tasks are read from ``/proc/loadavg`` (the kernel's count of runnable tasks at
this instant) less this process's own runnable threads (``/proc/self/task``), the median
of three readings. The one-minute load average is not used there: it counts this process
too, so a program that has been computing for a minute (a training script, a benchmark)
saw its own load and converted with one thread on a 2-core machine. Elsewhere the load
average is all there is. Inter-op threads are left alone (conversion starts no inter-op
work, and torch allows setting them only before any has run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics

import torch

log = logging.getLogger(__name__)

#: Where the kernel says how many tasks are runnable, and which threads are this process's.
LOADAVG, OWN_TASKS = "/proc/loadavg", "/proc/self/task"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_runnable(tasks: str) -> int:
    """This process's threads in state R (running or runnable) now."""
    count = 0
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "stat")) as f:
                stat = f.read()
        except OSError:     # the thread ended meanwhile
            continue
        count += stat[stat.rfind(")") + 2:stat.rfind(")") + 3] == "R"
    return count


def others_runnable(loadavg: str | None = None, tasks: str | None = None) -> float:
    """Runnable tasks of other processes now (median of three readings), from ``loadavg``
    and ``tasks`` (default ``LOADAVG``, ``OWN_TASKS``); raises OSError where ``/proc``
    does not say."""
    loadavg, tasks = loadavg or LOADAVG, tasks or OWN_TASKS
    readings = []
    for _ in range(3):
        with open(loadavg) as f:
            running = int(f.read().split()[3].split("/")[0])
        readings.append(max(0, running - _own_runnable(tasks)))
    return statistics.median(readings)


def idle_threads(limit: int) -> tuple[int, str]:
    """``(threads, why)``: one per core other work leaves idle, between 1 and ``limit``."""
    cores = _cores()
    try:
        busy = others_runnable()
        why = f"{cores} core(s), {busy:g} runnable task(s) of other processes"
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return limit, "no load figures on this system"
        why = f"{cores} core(s), load average {busy:.1f}"
    return max(1, min(limit, round(cores - busy))), why


@contextlib.contextmanager
def conversion_threads():
    """Run the body with ``idle_threads`` torch threads; the caller's count is restored."""
    before = torch.get_num_threads()
    threads, why = idle_threads(before)
    log.debug("conversion uses %d torch thread(s) (the caller's setting: %d; %s)",
              threads, before, why)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
