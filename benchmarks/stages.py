"""Where ``fuse(verify=True)`` spends its time, in units of one training step.

Wraps the pipeline's stages with wall-clock timers (inclusive: ``fuse_module`` contains the
region proofs, ``verify_models`` contains ``judge`` and the float64 runs), converts once to
warm up, then once timed, and prints each stage's total, in seconds and in training steps
(forward and backward of the training form at the same input).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        .venv/bin/python benchmarks/stages.py repvgg_a0 [--size 224] [--threads 1]

The model is a timm model, or ultralytics ``yolov8n`` (from its YAML), with random weights
and calibrated batch-norm statistics (``convert.calibrate``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402

import repfuse  # noqa: E402
import repfuse.fx.pipeline as pipeline  # noqa: E402
import repfuse.proofs.model as whole  # noqa: E402
import repfuse.proofs.region as region  # noqa: E402

TOTAL: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def _timed(module, name: str) -> None:
    real = getattr(module, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            TOTAL[name] += time.perf_counter() - start
            CALLS[name] += 1

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for module, name in ((pipeline, "fuse_module"), (pipeline, "prove_region"),
                         (pipeline, "verify_models"), (pipeline, "_judge_by_exact_kernels"),
                         (whole, "judge"), (whole, "_float64_values"), (whole, "float64_copy"),
                         (region, "_adjoint")):
        _timed(module, name)
    model = convert.ultralytics_model(args.model) if args.model.startswith("yolo") else \
        convert.randomize(timm.create_model(args.model, pretrained=False)).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    convert.calibrate(model, (2, 3, args.size, args.size))
    convert.training_step(model, x)
    start = time.perf_counter()
    convert.training_step(model, x)
    step = time.perf_counter() - start
    repfuse.fuse(model, x, verify=True)
    TOTAL.clear()
    CALLS.clear()
    start = time.perf_counter()
    result = repfuse.fuse(model, x, verify=True)
    total = time.perf_counter() - start
    print(f"{args.model} 1x3x{args.size}x{args.size}, {args.threads} thread(s): training step "
          f"{step:.3f} s, fuse(verify=True) {total:.3f} s = {total / step:.1f} steps")
    for name, seconds in sorted(TOTAL.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {seconds:7.3f} s {seconds / step:6.2f} steps  x{CALLS[name]}")
    for note in result.report.model_checks.notes:
        print(f"  note: {note[:160]}")


if __name__ == "__main__":
    main()
