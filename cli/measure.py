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
def latency_ms(fn, x, *, repeat: int = 20, warmup: int = 3, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn(x)`` in milliseconds (stops early after ``budget_s``)."""
    for _ in range(warmup):
        fn(x)
    times = []
    start = time.perf_counter()
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)
