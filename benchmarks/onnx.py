"""ONNX Runtime latency: training-form export vs ``repfuse.fuse_onnx`` output.

For each architecture the training-form model is exported with ``repfuse.export_onnx``
(the default torch exporter) and fused with ``repfuse.fuse_onnx``; both run in the same
process with onnxruntime (CPU, 2 intra-op threads, default graph optimizations),
interleaved; the median and minimum latency per batch size are printed with the ratios
(on a shared machine the minimum is the better estimate of the unloaded latency).

    .venv/bin/python benchmarks/onnx.py [--arch repvgg_a0 mobileone_s0] [--size 224]
"""

from __future__ import annotations

import os
import sys

# this file is named like the onnx package: keep its folder off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import repfuse  # noqa: E402
from repfuse.cli.allocator import keep_freed_memory  # noqa: E402
from repfuse.onnx.runtime import ort_session  # noqa: E402


def training_form(arch: str) -> torch.nn.Module:
    """``repfuse.models`` when it has ``arch``, else timm (random weights and BN stats)."""
    try:
        from repfuse import models

        if arch in models.names():
            return models.create(arch, seed=0).eval()
    except ImportError:
        pass
    import timm

    model = timm.create_model(arch, pretrained=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def timings_ms(sessions: dict, feeds: dict, repeats: int, warmup: int) -> dict[str, list]:
    """Interleaved timing: each repeat runs every session once, in turn."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc: keep freed buffers (REPFUSE_SYSTEM_MALLOC=1: defaults)

    print(f"onnxruntime CPU, {args.threads} threads, default graph optimizations, "
          f"input {args.size}x{args.size}, median of {args.repeats}")
    print("median and (min) milliseconds; the speed-up is the ratio of medians (of minima)")
    print(f"{'arch':<13} {'batch':>5} {'training ms':>17} {'fused ms':>17} {'speed-up':>15} "
          f"{'convs':>8} {'nodes':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            model = training_form(arch)
            path = os.path.join(folder, f"{arch}.onnx")
            repfuse.export_onnx(model, torch.randn(1, 3, args.size, args.size), path)
            fused = repfuse.fuse_onnx(path)
            rep = fused.report
            original = onnx.load(path)
            sessions = {"train": ort_session(original, optimize=True, threads=args.threads),
                        "fused": ort_session(fused.model, optimize=True,
                                             threads=args.threads)}
            convs = f"{rep.ops_before.get('Conv', 0)}->{rep.ops_after.get('Conv', 0)}"
            nodes = f"{sum(rep.ops_before.values())}->{sum(rep.ops_after.values())}"
            for batch in args.batch:
                x = np.random.default_rng(0).standard_normal(
                    (batch, 3, args.size, args.size)).astype(np.float32)
                name = sessions["train"].get_inputs()[0].name
                times = timings_ms(sessions, {name: x}, args.repeats, args.warmup)
                med = {k: statistics.median(v) for k, v in times.items()}
                low = {k: min(v) for k, v in times.items()}
                print(f"{arch:<13} {batch:>5} {med['train']:>8.1f} ({low['train']:>6.1f}) "
                      f"{med['fused']:>8.1f} ({low['fused']:>6.1f}) "
                      f"{med['train'] / med['fused']:>6.2f}x ({low['train'] / low['fused']:.2f}x)"
                      f" {convs:>8} {nodes:>8}")


if __name__ == "__main__":
    main()
