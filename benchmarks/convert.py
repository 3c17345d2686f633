"""Conversion time: repfuse.fuse vs timm.utils.reparameterize_model (same run, ratios).

For each timm model: the median wall time of ``timm.utils.reparameterize_model``
(a copy, as repfuse does by default), of ``repfuse.fuse(verify=False)`` and of
``repfuse.fuse(verify=True)`` (per-region proofs and whole-model outputs and input
gradients), and the inference time of repfuse's fused model vs timm's deploy form.

    .venv/bin/python benchmarks/convert.py [--models repvgg_b3,repvgg_a0,mobileone_s0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn as nn

import repfuse
from repfuse.cli.allocator import keep_freed_memory


def randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def inference_ratio(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median time of ``ours`` over median time of ``theirs``, calls interleaved."""
    a, b = [], []
    with torch.no_grad():
        ours(x), theirs(x)
        for _ in range(repeats):
            a.append(median_time(lambda: ours(x), 1)[0])
            b.append(median_time(lambda: theirs(x), 1)[0])
    return statistics.median(a) / statistics.median(b)


def bench(name: str, args) -> str:
    """One table row for timm model ``name``."""
    model = randomize(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, args.size, args.size)
    t_timm, deploy = median_time(lambda: timm.utils.reparameterize_model(model), args.repeats)
    t_fuse, result = median_time(lambda: repfuse.fuse(model, x, verify=False), args.repeats)
    t_verify, checked = median_time(lambda: repfuse.fuse(model, x, verify=True), args.repeats)
    xi = torch.randn(1, 3, args.infer_size, args.infer_size)
    infer = inference_ratio(result.model, deploy, xi, 15)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    ok = "yes" if checked.report.ok else "NO"
    return (f"{name:14} {n:7.1f}M {t_timm:8.3f} {t_fuse:8.3f} {t_fuse / t_timm:5.2f}x "
            f"{t_verify:9.3f} {t_verify / t_timm:5.2f}x {ok:>3} {infer:10.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="repvgg_b3,repvgg_a0,mobileone_s0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="example input size (HxW)")
    parser.add_argument("--infer-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc: keep freed buffers (REPFUSE_SYSTEM_MALLOC=1: defaults)
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, "
          f"example input 1x3x{args.size}x{args.size}, median of {args.repeats}")
    header = (f"{'model':14} {'params':>8} {'timm s':>8} {'fuse s':>8} {'ratio':>6} "
              f"{'verify s':>9} {'ratio':>6} {'ok':>3} {'infer ratio':>11}")
    print(header)
    for name in args.models.split(","):
        print(bench(name, args))

if __name__ == "__main__":
    main()
