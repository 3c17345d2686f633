"""Model families with joins, MixConv splits, pre-norms, attention-bias caches and ghost
paths: batch norms left, and the ONNX front end's time against the torch one.

For each timm model (seeded random weights, batch norm statistics away from the identity)
at ``--size`` (batch 2): the batch norm layers of the training form, of timm's own deploy
form (``timm.utils.reparameterize_model``), left by ``repfuse.fuse`` (``report.norms``) and
left by ``repfuse.fuse_onnx`` of the model's ``repfuse.export_onnx`` file
(``BatchNormalization`` nodes); then ``repfuse.fuse`` against ``repfuse.fuse_onnx`` on that
file, both with verification, alternately, ``--rounds`` times each: the medians and
ONNX / fx (target: <= 2).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        .venv/bin/python benchmarks/sweep.py [--arch ...] [--size 64] [--rounds 3]
"""

from __future__ import annotations

import os
import sys

# benchmarks/onnx.py is named like the onnx package: keep this folder off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import onnx  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import repfuse  # noqa: E402

ARCHS = ["res2net50_14w_8s", "mixnet_s", "nextvit_small", "levit_128s", "ghostnet_050"]


def model_for(arch: str, size: int) -> nn.Module:
    kwargs = {"img_size": size} if arch.startswith("levit") else {}
    model = timm.create_model(arch, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def onnx_norms(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=ARCHS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    print(f"input 2x3x{args.size}x{args.size}; conversion with verification, median of "
          f"{args.rounds} alternated rounds (torch threads: the library's own choice, from "
          f"{torch.get_num_threads()})")
    print(f"{'arch':<18} {'BN':>4} {'timm':>5} {'fx':>4} {'export':>7} {'onnx':>5} "
          f"{'fx (s)':>8} {'onnx (s)':>9} {'onnx/fx':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            model = model_for(arch, args.size)
            deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
            x = torch.randn(2, 3, args.size, args.size)
            path = os.path.join(folder, f"{arch}.onnx")
            repfuse.export_onnx(model, x, path)
            fx, ox = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                fused = repfuse.fuse(model, x)
                fx.append(time.perf_counter() - start)
                start = time.perf_counter()
                fused_onnx = repfuse.fuse_onnx(path)
                ox.append(time.perf_counter() - start)
            f, o = statistics.median(fx), statistics.median(ox)
            print(f"{arch:<18} {norms(model):>4} {norms(deploy):>5} "
                  f"{fused.report.norms[1]:>4} {onnx_norms(onnx.load(path)):>7} "
                  f"{onnx_norms(fused_onnx.model):>5} {f:>8.2f} {o:>9.2f} {o / f:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
