"""Compare versions of repfuse: time one model's conversions in this process, and run
this script alternately with ``PYTHONPATH`` set to each checkout.

One warm-up call of each of one training step (``convert.training_step``), timm's
``reparameterize_model`` (timm models; not for ultralytics ``yolov8n``),
``repfuse.fuse(verify=False)`` and ``repfuse.fuse(verify=True)``, then ``--rounds`` rounds
of them alternately;
prints, for each, the minimum wall time and the minimum process CPU time (the minimum:
the machine's noise only ever adds). Seeded model (random weights, calibrated batch-norm
statistics, ``convert.calibrate``) and input, so the versions convert the same thing:

    git worktree add /tmp/before <commit>
    for i in 1 2 3; do for d in /tmp/before .; do
      PYTHONPATH=$d MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        .venv/bin/python benchmarks/versions.py repvgg_b3 --size 64; done; done

Each call is made after the garbage of the earlier ones is collected (``convert.timed``),
so every call runs in a settled heap; the page faults it takes are printed beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402

import repfuse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = convert.seeded_model(args.model, args.size)
    x = convert.example(args.size)
    calls = {"step": lambda: convert.training_step(model, x)}
    if not args.model.startswith("yolo"):
        calls["timm"] = lambda: timm.utils.reparameterize_model(model)
    calls.update(fuse=lambda: repfuse.fuse(model, x, verify=False),
                 verify=lambda: repfuse.fuse(model, x, verify=True))
    for call in calls.values():
        call()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    faults: dict[str, list[int]] = {k: [] for k in calls}
    for _ in range(args.rounds):
        for k, call in calls.items():
            c = time.process_time()
            spent, out, n = convert.timed(call)   # (garbage collected first, not timed)
            cpu[k].append(time.process_time() - c)
            wall[k].append(spent)
            faults[k].append(n)
            del out
    where = os.path.dirname(os.path.dirname(os.path.abspath(repfuse.__file__)))
    print(f"{where}: {args.model} 1x3x{args.size}x{args.size}, {args.threads} thread(s), "
          f"min of {args.rounds}: " + ", ".join(
              f"{k} {min(wall[k]):.3f} s ({min(cpu[k]):.2f} s cpu, {min(faults[k])} faults)"
              for k in calls))


if __name__ == "__main__":
    main()
