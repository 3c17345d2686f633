"""Where ``fuse`` spends its time, operator by operator: each aten call's wall time, charged
to the repfuse frames that made it (a ``TorchDispatchMode``; calls under ``--min-ms`` are
left out, and the mode's own overhead inflates the total).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        .venv/bin/python benchmarks/ops.py repvgg_b3 --size 64 [--no-verify] [--depth 2]

A timm model (seeded random weights, calibrated batch-norm statistics) or ``yolov8n``; one
conversion to warm up, then one under the mode. Prints the total, the part charged, and
the largest rows: milliseconds, calls, the aten operator, and the innermost ``--depth``
repfuse frames (file:function:line).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402

import repfuse  # noqa: E402


class _Charged(TorchDispatchMode):
    def __init__(self, depth: int, min_s: float):
        super().__init__()
        self.depth, self.min_s = depth, min_s
        self.seconds: dict[tuple, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        spent = time.perf_counter() - start
        if spent >= self.min_s:
            frames = [f for f in traceback.extract_stack(limit=40)
                      if f"{os.sep}repfuse{os.sep}" in f.filename]
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}"
                                for f in frames[::-1][:self.depth])
            key = (func.overloadpacket.__name__, where)
            self.seconds[key] += spent
            self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--min-ms", type=float, default=0.2)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = convert.seeded_model(args.model, args.size)
    x = convert.example(args.size)
    repfuse.fuse(model, x, verify=not args.no_verify)
    mode = _Charged(args.depth, args.min_ms / 1e3)

    def run():
        with mode:
            return repfuse.fuse(model, x, verify=not args.no_verify)

    total, _, faults = convert.timed(run)   # in a settled heap (page faults counted)
    print(f"{args.model} 1x3x{args.size}x{args.size}, {args.threads} thread(s), "
          f"verify={not args.no_verify}: {total:.3f} s ({faults} page faults), "
          f"{sum(mode.seconds.values()):.3f} s in calls of {args.min_ms} ms or more")
    for key, spent in sorted(mode.seconds.items(), key=lambda kv: -kv[1])[:args.rows]:
        print(f"{spent * 1e3:9.1f} ms {mode.calls[key]:5d}  {key[0]:24} {key[1]}")


if __name__ == "__main__":
    main()
