"""Cost of verification relative to one training step, measured in the same run.

For each model (default: repvgg_a0, repvgg_b3 from ``repfuse.models``; timm's when
``--timm``), at the same input size:

* ``train step``: forward + cross-entropy + backward + SGD step of the training form
  (train mode, on a copy);
* ``verify (fuse)``: ``repfuse.fuse(verify=True)`` minus ``repfuse.fuse(verify=False)``,
  i.e. everything verification adds to a conversion (per-region proofs and the
  whole-model check), when ``repfuse.fuse`` is available;
* ``region proofs`` / ``model check``: the two parts measured directly
  (``repfuse.proofs.prove_region`` on every RepVGG block, ``repfuse.verify`` of the
  training form against the fused model with input gradients).

Prints median times (the five measurements interleaved, one of each per round) and
the ratio of verification to one training step (target: at most 3x). glibc is told to
keep freed buffers, as the ``repfuse`` command does (``repfuse.cli.allocator``;
``REPFUSE_SYSTEM_MALLOC=1`` keeps its defaults). Run e.g.::

    .venv/bin/python benchmarks/verify.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from repfuse import region as rg
from repfuse.cli.allocator import keep_freed_memory
from repfuse.core.spec import ConvSpec
from repfuse.proofs import verify_models
from repfuse.proofs.region import prove_region


def create(name: str, use_timm: bool) -> nn.Module:
    if use_timm:
        import timm

        model = timm.create_model(name, pretrained=False)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        return model.eval()
    from repfuse import models

    return models.create(name, seed=0)


def train_step(model: nn.Module, x: torch.Tensor):
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    return step


# ------------------------------------------------------------------ direct measurement
def _convbn(inp, seq):
    conv, bn = seq.conv, seq.bn
    node = rg.Conv(inp, conv.weight, conv.bias, ConvSpec.from_module(conv), "conv")
    return rg.BatchNorm(node, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                        "bn")


def repvgg_regions(model: nn.Module):
    """(path, block, expr) of every RepVGG-style block (rbr_dense / rbr_1x1 / identity)."""
    out = []
    for path, m in model.named_modules():
        dense = getattr(m, "rbr_dense", None) or getattr(m, "conv_kxk", None)
        if dense is None:
            continue
        one = getattr(m, "rbr_1x1", None) or getattr(m, "conv_1x1", None)
        ident = getattr(m, "rbr_identity", None) or getattr(m, "identity", None)
        inp = rg.Input(dense.conv.in_channels)
        branches = [_convbn(inp, dense), _convbn(inp, one)]
        if isinstance(ident, nn.BatchNorm2d):
            branches.append(rg.BatchNorm(inp, ident.running_mean, ident.running_var,
                                         ident.weight, ident.bias, ident.eps, "identity"))
        out.append((path, m, rg.Add(tuple(branches))))
    return out


class _Fused(nn.Module):
    def __init__(self, conv, act):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.act(self.conv(x))


def hand_fused(model, regions):
    fused = copy.deepcopy(model)
    for path, block, expr in regions:
        act = getattr(block, "nonlinearity", None) or getattr(block, "act", None) or nn.ReLU()
        parent, _, name = path.rpartition(".")
        owner = fused.get_submodule(parent) if parent else fused
        setattr(owner, name, _Fused(rg.reduce(expr).to_module(), copy.deepcopy(act)))
    return fused.eval()


def capture_inputs(model, regions, x):
    acts = {}
    hooks = [block.register_forward_hook(
        lambda mod, args, out, p=path: acts.__setitem__(p, args[0].detach()))
        for path, block, _ in regions]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return acts


def bench(name: str, args) -> str:
    """One row: the training step, fuse with/without verification, and the direct parts,
    measured interleaved (one of each per round) so that load changes hit all alike."""
    import repfuse

    model = create(name, args.timm)
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    regions = repvgg_regions(model)
    fused_model = hand_fused(model, regions)
    acts = capture_inputs(model, regions, x)
    fused = {path: rg.reduce(expr) for path, _, expr in regions}
    failures = []

    def fuse_verify():
        report = repfuse.fuse(model, x, verify=True).report
        if not report.ok:
            failures.append(report)

    def proofs():
        for path, _, expr in regions:
            rep = prove_region(expr, fused[path], acts[path])
            if not rep.ok:
                failures.append(rep)

    tasks = {"train": train_step(model, x),
             "fuse": lambda: repfuse.fuse(model, x, verify=False),
             "fuse+verify": fuse_verify,
             "regions": proofs,
             "model": lambda: verify_models(model, fused_model, x)}
    try:
        repfuse.fuse(model, x, verify=False)
    except NotImplementedError:
        del tasks["fuse"], tasks["fuse+verify"]
    for fn in tasks.values():      # warm-up
        fn()
    times = {k: [] for k in tasks}
    for _ in range(args.repeats):
        for k, fn in tasks.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    nan = float("nan")
    t_train, t_fuse, t_both = med["train"], med.get("fuse", nan), med.get("fuse+verify", nan)
    t_verify = t_both - t_fuse
    t_regions, t_model = med["regions"], med["model"]
    status = " FAILED" if failures else ""
    return (f"{name + status:<12} {t_train * 1e3:9.0f}ms {t_fuse * 1e3:7.0f}ms "
            f"{t_both * 1e3:10.0f}ms {t_verify * 1e3:7.0f}ms {t_verify / t_train:5.2f}x | "
            f"{t_regions * 1e3:11.0f}ms {t_model * 1e3:10.0f}ms "
            f"{(t_regions + t_model) / t_train:5.2f}x  ({len(regions)} regions)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["repvgg_a0", "repvgg_b3"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timm", action="store_true", help="timm's models instead of ours")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc: keep freed buffers (REPFUSE_SYSTEM_MALLOC=1: defaults)
    print(f"input {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'model':<12} {'train step':>11} {'fuse':>9} {'fuse+verify':>12} {'verify':>9} "
          f"{'ratio':>6} | {'region proofs':>13} {'model check':>12} {'ratio':>6}")
    for name in args.models:
        print(bench(name, args), flush=True)


if __name__ == "__main__":
    main()
