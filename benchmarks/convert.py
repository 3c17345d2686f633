"""Conversion time: repfuse.fuse vs timm.utils.reparameterize_model (same run, ratios).

For each timm model: the median wall time of ``timm.utils.reparameterize_model``
(a copy, as repfuse does by default), of ``repfuse.fuse(verify=False)`` and of
``repfuse.fuse(verify=True)`` (per-region proofs and whole-model outputs and input
gradients), and the inference time of repfuse's fused model vs timm's deploy form.

    .venv/bin/python benchmarks/convert.py [--models repvgg_b3,repvgg_a0,mobileone_s0]

``--sweep``: the conversion cost across model families at 224x224 (``--size``), each model
in its own process (``--timeout`` seconds at most): ``fuse(verify=False)`` over timm's
``reparameterize_model``, ``fuse(verify=True)`` over one training step of the training
form (forward and backward at the same input), both in seconds too, and the region
search's attempts per region. Targets: verify <= 10x a training step, fuse <= 2x timm,
no model above 30 s. ``--models`` runs a subset.

    .venv/bin/python benchmarks/convert.py --sweep [--models resnet18,xception41] [--size 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
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


#: at least 20 models across families: plain ResNets, separable / depthwise nets,
#: RepVGG / MobileOne / FastViT / GhostNet families, hybrid conv-attention nets
SWEEP = ("resnet18,resnet50,res2net50_14w_8s,regnetx_002,xception41,mobilenetv3_large_100,"
         "efficientnet_b0,mixnet_s,ghostnet_050,ghostnetv3_050,repghostnet_050,repvgg_a0,"
         "repvgg_b0,mobileone_s0,fastvit_t8,fastvit_mci0,repvit_m0_9,levit_128s,"
         "nextvit_small,convnext_atto,efficientvit_b0,mobilevitv2_050")


def training_step(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """Median time of forward + backward of the training form (a copy in train mode), and
    "*" when a batch of one cannot train (a BatchNorm1d head): then a batch of two."""
    train = copy.deepcopy(model).train()
    batch = [x]

    def step():
        out = train(batch[0])
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
    try:
        step()                                          # warm-up
    except ValueError:
        batch[0] = torch.cat([x, x])
        step()
    return median_time(step, 3)[0], "*" if batch[0] is not x else ""


def sweep_row(name: str, args) -> str:
    """One sweep row for timm model ``name`` (seconds, ratios, attempts per region)."""
    model = randomize(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, args.size, args.size)
    t_train, mark = training_step(model, x)
    t_timm, _ = median_time(lambda: timm.utils.reparameterize_model(model), args.repeats)
    t_fuse, result = median_time(lambda: repfuse.fuse(model, x, verify=False), args.repeats)
    t_verify, checked = median_time(lambda: repfuse.fuse(model, x, verify=True), 1)
    search = result.report.search
    per_region = search.get("attempts", 0) / max(search.get("regions", 0), 1)
    ok = "yes" if checked.report.ok else "NO"
    return (f"{name + mark:22} {t_train:7.2f} {t_timm:7.2f} {t_fuse:7.2f} {t_verify:8.2f} "
            f"{t_fuse / t_timm:8.1f}x {t_verify / t_train:8.1f}x "
            f"{search.get('regions', 0):5d} {per_region:6.2f} {ok:>3}")


def run_sweep(args) -> None:
    names = args.models.split(",") if args.models_given else SWEEP.split(",")
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, "
          f"input 1x3x{args.size}x{args.size}, fuse: median of {args.repeats}, verify: one run")
    print(f"{'model':22} {'train s':>7} {'timm s':>7} {'fuse s':>7} {'verify s':>8} "
          f"{'fuse/timm':>9} {'ver/train':>9} {'regs':>5} {'att/rg':>6} {'ok':>3}  "
          "(*: training step on a batch of two)", flush=True)
    for name in names:
        cmd = [sys.executable, __file__, "--row", name, "--size", str(args.size),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            row = lines[-1] if done.returncode == 0 and lines else \
                f"{name:22} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        except subprocess.TimeoutExpired:
            row = f"{name:22} did not finish within {args.timeout} s"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None)
    parser.add_argument("--sweep", action="store_true", help="the model sweep at 224x224")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per sweep model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None,
                        help="example input size (HxW; default 64, sweep 224)")
    parser.add_argument("--infer-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.models_given = args.models is not None
    args.models = args.models or "repvgg_b3,repvgg_a0,mobileone_s0"
    args.size = args.size or (224 if args.sweep or args.row else 64)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc: keep freed buffers (REPFUSE_SYSTEM_MALLOC=1: defaults)
    if args.row:
        print(sweep_row(args.row, args))
        return
    if args.sweep:
        run_sweep(args)
        return
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, "
          f"example input 1x3x{args.size}x{args.size}, median of {args.repeats}")
    header = (f"{'model':14} {'params':>8} {'timm s':>8} {'fuse s':>8} {'ratio':>6} "
              f"{'verify s':>9} {'ratio':>6} {'ok':>3} {'infer ratio':>11}")
    print(header)
    for name in args.models.split(","):
        print(bench(name, args))

if __name__ == "__main__":
    main()
