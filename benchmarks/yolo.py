"""ultralytics models: repfuse.fuse against the models' own ``fuse()`` (same run, ratios).

For each model built from ultralytics' bundled YAML (random weights, realistic BatchNorm
statistics): BatchNorm2d layers, Conv2d layers and parameters before, after
``repfuse.fuse`` (after dropping the end-to-end heads' unused branch, as ultralytics' own
``fuse()`` does) and after ultralytics' ``fuse()``; the wall time of each (repfuse with
and without its proofs) and the ratio of repfuse's time to ultralytics'; whether
repfuse's report is ok and how many layers it left alone or did not reach.

    .venv/bin/python benchmarks/yolo.py [--models yolov8n,rtdetr-l] [--size 64]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time

import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repfuse-ultralytics-"))
from ultralytics.nn import tasks  # noqa: E402
from ultralytics.nn.modules.head import Detect  # noqa: E402

import repfuse  # noqa: E402
from repfuse.cli.allocator import keep_freed_memory  # noqa: E402
from repfuse.report import LayerStatus  # noqa: E402

logging.getLogger("ultralytics").setLevel(logging.ERROR)

MODELS = {
    "yolov8n": tasks.DetectionModel, "yolo11n": tasks.DetectionModel,
    "yolov9t": tasks.DetectionModel, "yolov10n": tasks.DetectionModel,
    "yolov6n": tasks.DetectionModel, "yolo12n": tasks.DetectionModel,
    "yolo26n": tasks.DetectionModel, "rtdetr-l": tasks.RTDETRDetectionModel,
    "yolov8n-cls": tasks.ClassificationModel, "yolov8n-seg": tasks.SegmentationModel,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """``name`` from its bundled YAML, weights and BatchNorm statistics drawn from ``seed``."""
    torch.manual_seed(seed)
    model = MODELS[name](f"{name}.yaml", verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def counts(model: nn.Module) -> str:
    bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    return f"{bn}/{conv}/{params / 1e6:.3f}M"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(name: str, size: int) -> str:
    model = build(name)
    x = torch.randn(1, 3, size, size)
    t_theirs, theirs = timed(lambda: copy.deepcopy(model).fuse(verbose=False))
    t_fast, _ = timed(lambda: repfuse.fuse(model, x, verify=False))
    t_ours, result = timed(lambda: repfuse.fuse(model, x))
    for m in result.model.modules():
        if isinstance(m, Detect):
            Detect.fuse(m)   # the unused end-to-end branch, as their fuse() deletes it
    report = result.report
    missed = len(report.layers_with(LayerStatus.NOT_REACHED))
    return (f"{name:12s} {counts(model):>20s} {counts(result.model):>20s} "
            f"{counts(theirs):>20s} {t_fast:7.2f} {t_ours:7.2f} {t_theirs:7.3f} "
            f"{t_ours / t_theirs:7.1f}x  ok={report.ok} left alone {report.left_alone}, "
            f"not reached {missed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"input 1,3,{args.size},{args.size}; BN/conv/params; times in s (repfuse without "
          "proofs, with proofs, ultralytics fuse())")
    print(f"{'model':12s} {'training form':>20s} {'repfuse':>20s} {'ultralytics':>20s} "
          f"{'fast':>7s} {'proven':>7s} {'theirs':>7s} {'ratio':>8s}")
    for name in args.models.split(","):
        print(bench(name, args.size), flush=True)


if __name__ == "__main__":
    main()
