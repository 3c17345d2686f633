"""Model figures for reports: parameter counts, MACs, latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> int | None:
    """Multiply-accumulates of one forward pass on ``x`` (FlopCounterMode flops / 2)."""
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    except Exception:
        return None
    return counter.get_total_flops() // 2


@torch.inference_mode()
def paired_latency_ms(fn_a, x_a, fn_b, x_b, *, repeat: int = 20, warmup: int = 3,
                      budget_s: float = 30.0) -> tuple[float, float]:
    """Median wall times (ms) of ``fn_a(x_a)`` and ``fn_b(x_b)``, measured alternately (a, b,
    b, a, ...) so that both see the same machine load; stops early after ``budget_s``."""
    for _ in range(warmup):
        fn_a(x_a)
        fn_b(x_b)
    times_a, times_b = [], []
    start = time.perf_counter()
    for i in range(max(1, repeat)):
        order = ((fn_a, x_a, times_a), (fn_b, x_b, times_b))
        for fn, x, out in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn(x)
            out.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s and len(times_a) >= 3:
            break
    return statistics.median(times_a), statistics.median(times_b)
