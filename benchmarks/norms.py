"""Parameters and norm layers left: repfuse.fuse vs timm.utils.reparameterize_model.

For each timm model (random weights, random BatchNorm statistics, same weights for both):
parameters and norm layers (BatchNorm1d/2d) of the training form, of timm's deploy form
and of repfuse's fused model, the relative output error of the fused model, and
repfuse's report (regions fused, left alone).

    .venv/bin/python benchmarks/norms.py [--models repvit_m0_9,levit_128s] [--size 64]
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch.nn as nn

import repfuse

NORMS = nn.modules.batchnorm._BatchNorm
MODELS = "repvit_m0_9,nextvit_small,levit_128s,efficientvit_m0"
#: models whose attention biases fix the input size
FIXED = {"levit_128s": 224, "efficientvit_m0": 224}


def randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def counts(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(isinstance(m, NORMS) for m in model.modules()))


def row(name: str, size: int) -> str:
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False)).eval()
    size = FIXED.get(name, size)
    x = torch.randn(1, 3, size, size)
    before = counts(model)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    result = repfuse.fuse(model, x, verify=True)
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    ours, theirs = counts(result.model), counts(deploy)
    rep = result.report
    return (f"{name:<18} {size:>4} {before[0]:>12,} {theirs[0]:>12,} {ours[0]:>12,} "
            f"{before[1]:>6} {theirs[1]:>6} {ours[1]:>6} {err:>9.1e} "
            f"{len(rep.fused):>5} {len(rep.skipped):>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(f"{'model':<18} {'size':>4} {'params':>12} {'timm':>12} {'repfuse':>12} "
          f"{'norms':>6} {'timm':>6} {'ours':>6} {'out err':>9} {'fused':>5} {'left':>5}")
    for name in args.models.split(","):
        print(row(name, args.size), flush=True)


if __name__ == "__main__":
    main()
