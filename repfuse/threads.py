"""The number of threads torch uses while a model is fused and proven.

Fusing and proving run many small kernels (folding a few thousand kernel elements,
float64 proofs on probe inputs) and a few large ones (the whole-model checks at the
example input's size). With torch's default of one thread per core, every kernel ends
at a barrier where all its threads meet; on a machine whose cores are busy with other
work, a barrier waits for threads the scheduler has not run, and small kernels spend
most of their time waiting. Measured on a 2-core machine at load average 6:
``fuse_onnx`` of a fastvit_t8 export took 9.6 s with 2 threads and 4.3 s with one,
``fuse`` 31.5 s and 3.8 s. On an idle machine the large kernels gain from every core.

So conversion uses one thread per idle core: the cores this process may run on less
the one-minute load average, rounded, at least one and never more than the caller's
setting, which is restored afterwards. Inter-op threads are left alone (conversion
starts no inter-op work, and torch allows setting them only before any has run).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_threads(limit: int) -> tuple[int, str]:
    """``(threads, why)``: one per idle core, between 1 and ``limit``."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return limit, "no load average on this system"
    cores = _cores()
    return max(1, min(limit, round(cores - load))), f"{cores} core(s), load average {load:.1f}"


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
