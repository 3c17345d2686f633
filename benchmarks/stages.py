"""Where ``fuse(verify=True)`` spends its time, in units of one training step.

Wraps the pipeline's stages with wall-clock timers (inclusive: ``fuse_module`` contains the
region proofs, ``verify_models`` contains ``judge`` and the float64 runs), converts once to
warm up, then once timed, and prints each stage's total, in seconds and in training steps
(forward and backward of the training form at the same input).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        .venv/bin/python benchmarks/stages.py repvgg_a0 [--size 224] [--threads 1]

``--sweep`` (or several comma-separated models) prints one row per model instead, each
from a fresh process, with the stages as disjoint parts of ``fuse(verify=True)`` in
training steps: ``reach`` (the one real forward through the traced graphs, tracing
included; ``trace`` of it is fx tracing), ``regions`` (classification, region search,
reductions, rewrites: ``fuse_module`` less ``reach`` and the proofs), ``proofs`` (the
region proofs; ``ms/rg`` per region), ``f32 chk`` (the whole-model check's runs of both
models in their dtype), ``truth`` (its float64 runs, made only for the checks that the
direct comparison rejects), ``exact`` (when the float64 criterion still rejects a check:
the fused structure run in float64 with its exact kernels against the training form run
in float64, ``fx.pipeline._judge_by_exact_kernels``), ``rest`` (copies, accounting). The
step is the median of five (``convert.training_step``: eval-mode batch norms, as the
proofs run the model) for yolov8n, and for timm models the median of three of a
train-mode copy, as in ``convert.py --sweep`` (an eval-mode LeViT caches its attention
biases and cannot step twice); models are seeded, so rows repeat:

    .venv/bin/python benchmarks/stages.py --sweep          # convert.SWEEP and yolov8n

The model is a timm model, or ultralytics ``yolov8n`` (from its YAML), with random weights
(seeded) and calibrated batch-norm statistics (``convert.calibrate``).
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
import repfuse.fx.fuse as fx_fuse  # noqa: E402
import repfuse.fx.pipeline as pipeline  # noqa: E402
import repfuse.fx.trace as fx_trace  # noqa: E402
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


def _timed_outermost(owner, name: str, label: str) -> None:
    """Time a recursive function's outermost calls only (as ``label``)."""
    real = getattr(owner, name)
    depth = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                TOTAL[label] += time.perf_counter() - start
                CALLS[label] += 1

    setattr(owner, name, wrapper)


def _instrument() -> None:
    for module, name in ((pipeline, "fuse_module"), (pipeline, "prove_region"),
                         (pipeline, "verify_models"), (pipeline, "_judge_by_exact_kernels"),
                         (whole, "judge"), (whole, "_float64_values"), (whole, "float64_copy"),
                         (region, "_adjoint"), (fx_fuse, "_run")):
        _timed(module, name)
    _timed_outermost(fx_trace._NestedTracer, "nested", "trace")


def _profile(name: str, size: int, threads: int):
    """(training step s, fuse(verify=True) s, result) with TOTAL / CALLS filled for the
    timed conversion (one warm-up conversion first)."""
    torch.set_num_threads(threads)
    _instrument()
    torch.manual_seed(0)
    model = convert.ultralytics_model(name) if name.startswith("yolo") else \
        convert.randomize(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    convert.calibrate(model, (2, 3, size, size))
    if name.startswith("yolo"):
        convert.training_step(model, x)
        step, _ = convert.median_time(lambda: convert.training_step(model, x), 5)
    else:   # as the sweep of convert.py: a train-mode copy (a cache-holding eval model,
        step, _ = convert.train_mode_step(model, x)   # LeViT's, cannot step twice)
    repfuse.fuse(model, x, verify=True)
    TOTAL.clear()
    CALLS.clear()
    start = time.perf_counter()
    result = repfuse.fuse(model, x, verify=True)
    return step, time.perf_counter() - start, result


HEADER = (f"{'model':22} {'step s':>6} {'verify':>7} {'reach':>6} {'trace':>6} "
          f"{'regions':>7} {'proofs':>6} {'n':>4} {'ms/rg':>6} {'f32 chk':>7} {'truth':>6} "
          f"{'exact':>6} {'rest':>5}   (all but step s and ms/rg in training steps)")


def row(name: str, size: int, threads: int) -> str:
    step, total, _ = _profile(name, size, threads)
    t = TOTAL
    proofs = t["prove_region"]
    regions = t["fuse_module"] - t["_run"] - proofs
    check = t["verify_models"] - t["judge"]
    exact = t["_judge_by_exact_kernels"]
    rest = total - t["fuse_module"] - t["verify_models"] - exact
    n = CALLS["prove_region"]
    cells = [total, t["_run"], t["trace"], regions, proofs]
    first = " ".join(f"{v / step:{w}.2f}" for v, w in zip(cells, (7, 6, 6, 7, 6)))
    return (f"{name:22} {step:6.3f} {first} {n:4d} {1e3 * proofs / max(n, 1):6.1f} "
            f"{check / step:7.2f} {t['judge'] / step:6.2f} {exact / step:6.2f} {rest / step:5.2f}")


def sweep(names: list[str], args) -> None:
    print(f"torch {torch.__version__}, input 1x3x{args.size}x{args.size}, {args.threads} "
          f"thread(s); one timed fuse(verify=True) per model after a warm-up", flush=True)
    print(HEADER, flush=True)
    for name in names:
        cmd = [sys.executable, __file__, name, "--row", "--size", str(args.size),
               "--threads", str(args.threads)]
        print(convert.row_from_process(name, cmd, args.timeout), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None,
                        help="a timm model or yolov8n; several, comma-separated: one row each")
    parser.add_argument("--sweep", action="store_true",
                        help="one row per model of convert.SWEEP and yolov8n")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    args = parser.parse_args()
    if args.row:
        print(row(args.model, args.size, args.threads))
        return
    if args.sweep or (args.model and "," in args.model):
        names = (convert.SWEEP + ",yolov8n").split(",") if args.sweep else args.model.split(",")
        return sweep(names, args)
    if not args.model:
        parser.error("name a model, or pass --sweep")
    step, total, result = _profile(args.model, args.size, args.threads)
    print(f"{args.model} 1x3x{args.size}x{args.size}, {args.threads} thread(s): training step "
          f"{step:.3f} s, fuse(verify=True) {total:.3f} s = {total / step:.1f} steps")
    for name, seconds in sorted(TOTAL.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {seconds:7.3f} s {seconds / step:6.2f} steps  x{CALLS[name]}")
    for note in result.report.model_checks.notes:
        print(f"  note: {note[:160]}")


if __name__ == "__main__":
    main()
