"""ONNX Runtime latency: training-form export vs ``repfuse.fuse_onnx`` output.

For each architecture the training-form model is exported with ``repfuse.export_onnx``
(the default torch exporter) and fused with ``repfuse.fuse_onnx``; both run in the same
process with onnxruntime (CPU, 2 intra-op threads, default graph optimizations),
interleaved, and the median latency per batch size is printed with the ratio.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
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
from repfuse.onnx_io import ort_session  # noqa: E402


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


def median_ms(sessions: dict, feeds: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Interleaved timing: each repeat runs every session once, in turn."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


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

    print(f"onnxruntime CPU, {args.threads} threads, default graph optimizations, "
          f"input {args.size}x{args.size}, median of {args.repeats}")
    print(f"{'arch':<14} {'batch':>5} {'training ms':>12} {'fused ms':>9} {'speed-up':>9} "
          f"{'convs':>11} {'nodes':>11}")
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
                ms = median_ms(sessions, {name: x}, args.repeats, args.warmup)
                print(f"{arch:<14} {batch:>5} {ms['train']:>12.2f} {ms['fused']:>9.2f} "
                      f"{ms['train'] / ms['fused']:>8.2f}x {convs:>11} {nodes:>11}")


if __name__ == "__main__":
    main()
