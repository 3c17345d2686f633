"""Benchmark of the convolution core against torch's native operators.

N=8, C=O=64, 56x56, 3x3, padding 1, float32, 2 threads. Each row times one repfuse
kernel and its peer (torch's native op) in the same run, alternating calls, and prints
the median times, their ratio (judged against the row's target) and the ratio of the
fastest calls (less sensitive to other processes on the machine). Targets:

* ``auto`` kernels: at most 1.1x the native op.
* ``reference`` (im2col / im2row): at most 4x the native op.
* region-restricted (two regions): at most 3x the native *dense* op of the same shape.
* sparse weight gradient (16 of 64 input channels): at most 0.4x the dense native
  weight gradient.
* ``grouped`` weight gradient: no target (shown for comparison).

glibc is told to keep freed buffers (``repfuse.cli.allocator``; otherwise it returns
large buffers to the OS on every call); ``REPFUSE_SYSTEM_MALLOC=1`` keeps its defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from repfuse import core
from repfuse.cli.allocator import keep_freed_memory

N, C, O, HW, K = 8, 64, 64, 56, 3


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(fn, peer, budget: float) -> tuple[list[float], list[float]]:
    """Seconds of each call of ``fn`` and ``peer``, calls alternating, about ``budget``
    seconds in all."""
    fn(), peer()  # warm up
    first = _timed(fn) + _timed(peer)
    reps = max(7, min(25, int(budget / max(first, 1e-6))))
    a, b = [], []
    for _ in range(reps):
        a.append(_timed(fn))
        b.append(_timed(peer))
    return a, b


def two_regions(n: int, h: int, w: int) -> torch.Tensor:
    """A foreground disc (id 1) on background (id 0), shifted per sample, as a
    segmentation mask would give."""
    rows = torch.arange(h).view(1, h, 1).float()
    cols = torch.arange(w).view(1, 1, w).float()
    cy = (h / 2 + torch.arange(n) * 1.5 - n).view(n, 1, 1)
    cx = (w / 2 - torch.arange(n) * 1.0 + n / 2).view(n, 1, 1)
    return (((rows - cy) ** 2 + (cols - cx) ** 2) < (0.35 * h) ** 2).long()


def rows():
    """(kernel, algorithm, repfuse call, native peer call, target ratio or None)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, HW, HW, generator=gen)
    dense_w = torch.randn(O, C, K, K, generator=gen)
    dw_w = torch.randn(C, 1, K, K, generator=gen)
    dy = torch.randn(N, O, HW, HW, generator=gen)
    ids = two_regions(N, HW, HW)
    sel = torch.arange(0, C, 4)  # 16 of 64 input channels
    grad = torch.nn.grad

    for name, w, g in (("dense", dense_w, 1), ("depthwise", dw_w, C)):
        geo = (1, 1, 1, g)  # stride, padding, dilation, groups
        ops = (
            ("forward", partial(core.conv2d, x, w, None, *geo),
             partial(F.conv2d, x, w, None, *geo)),
            ("grad input", partial(core.conv2d_input, x.shape, w, dy, *geo),
             partial(grad.conv2d_input, x.shape, w, dy, *geo)),
            ("grad weight", partial(core.conv2d_weight, x, w.shape, dy, *geo),
             partial(grad.conv2d_weight, x, w.shape, dy, *geo)),
        )
        for alg, target in (("auto", 1.1), ("reference", 4.0)):
            for op, fn, peer in ops:
                yield f"{name} {op}", alg, partial(fn, algorithm=alg), peer, target
        _, fn, peer = ops[2]
        yield f"{name} grad weight", "grouped", partial(fn, algorithm="grouped"), peer, None

    regions = {"region_in": ids, "region_out": ids}
    native_in = partial(grad.conv2d_input, x.shape, dense_w, dy, 1, 1)
    native_wt = partial(grad.conv2d_weight, x, dense_w.shape, dy, 1, 1)
    for alg in ("auto", "reference"):
        target = 3.0 if alg == "auto" else None
        yield ("region grad input (2 regions)", alg,
               partial(core.conv2d_input, x.shape, dense_w, dy, 1, 1, **regions,
                       algorithm=alg), native_in, target)
        yield ("region grad weight (2 regions)", alg,
               partial(core.conv2d_weight, x, dense_w.shape, dy, 1, 1, **regions,
                       algorithm=alg), native_wt, target)
    for alg in ("auto", "reference"):
        yield ("sparse grad weight (16/64)", alg,
               partial(core.conv2d_weight, x, dense_w.shape, dy, 1, 1, in_channels=sel,
                       algorithm=alg), native_wt, 0.4 if alg == "auto" else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.5,
                        help="seconds of timing per row (default 1.5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="",
                        help="run only rows whose kernel name contains this text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc: keep freed buffers (REPFUSE_SYSTEM_MALLOC=1: defaults)
    table = Table(title=f"repfuse core vs torch native: N={N} C=O={C} {HW}x{HW} {K}x{K} "
                        f"pad 1 fp32, {args.threads} threads")
    for col in ("kernel", "algorithm", "repfuse ms", "native ms", "ratio", "best ratio",
                "target", "met"):
        table.add_column(col, justify="left" if col in ("kernel", "algorithm") else "right")
    with torch.no_grad():
        for name, alg, fn, peer, target in rows():
            if args.only not in name:
                continue
            a, b = measure(fn, peer, args.budget)
            t, p = statistics.median(a), statistics.median(b)
            ratio = t / p
            met = "-" if target is None else ("met" if ratio <= target else "NOT met")
            table.add_row(name, alg, f"{t * 1e3:.1f}", f"{p * 1e3:.1f}", f"{ratio:.2f}x",
                          f"{min(a) / min(b):.2f}x", "-" if target is None else f"<= {target}x",
                          met)
    console = Console(width=120)
    console.print(table)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    console.print(f"ratio: median/median (judged against the target); best ratio: fastest/"
                  f"fastest call. Load average at the end: {load}; on a loaded machine kernels "
                  "made of many small ops are inflated more than single aten calls.")


if __name__ == "__main__":
    main()
