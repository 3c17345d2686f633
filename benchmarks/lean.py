"""A third bound for models whose regions are all one conv and one batch norm: the checks of
``fuse(verify=True)`` with their bookkeeping written as straight-line torch code.

``stages.py --floor`` bounds a conversion by the float runs its checks cannot do without, and
adds the model's own forward and the authors' unverified fusion. What that bound counts as
free includes, per region, the work around the float runs that the same checks also need:
the float64 copies of the parameters, the fold, the cast to the model's dtype with its
measured error, the torch layer, the probes and upstream gradients, the reduction's adjoint
and the comparisons. This script times that work as a conversion with nothing else would do
it (``lean_region``: no region search, no expression trees, no reports; the same probes,
activation windows, checks and float64 tolerances as ``repfuse.proofs.region``) on the regions
repfuse proved in the timed conversion, and prints the ``--floor`` bounds with it:

    bound = check runs + truth + tracing + forward + authors' fusion + lean regions

(the lean regions include their float64 runs, which replace the floor's). What is still left
out is the graph pass: finding the regions, copying the model's structure, rewriting and
installing the graphs. The lean code is a measure, not a proof that nothing leaner exists.
Only one-conv regions are covered: the same straight-line code for RepVGG's and MobileOne's
multi-branch regions (the 1x1 padded, the identity as a kernel, the branches added, autograd's
own adjoint) took longer than repfuse's algebra, which adds branches in place and keeps
kernel-sized temporaries out of the adjoint (repvgg_b3 at 224: 6.25 s against its proofs'
float64 runs of 2.49 s, a "bound" above the conversion), so it would bound nothing there.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        .venv/bin/python benchmarks/lean.py yolov8n [--size 224] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402
import stages  # noqa: E402

import repfuse.proofs.region as region  # noqa: E402
import repfuse.region as rg  # noqa: E402
from repfuse.proofs.compare import SEED, TOLERANCES, draw  # noqa: E402
from repfuse.region.nodes import BatchNorm, Conv, Input  # noqa: E402

F64 = torch.float64


def pair(expr) -> tuple[Conv, BatchNorm] | None:
    """The (conv, batch norm) of a region that is exactly an affine BN after a plain 2-D
    conv on the region's input, or None."""
    if type(expr) is not BatchNorm or expr.weight is None or expr.bias is None:
        return None
    conv = expr.input
    if type(conv) is not Conv or type(conv.input) is not Input or conv.weight.dim() != 4:
        return None
    spec = conv.spec
    if spec.padding_mode != "zeros" or not spec.is_symmetric_padding or spec.transposed:
        return None
    return conv, expr


def _passes(reference: torch.Tensor, candidate: torch.Tensor) -> bool:
    """``compare``'s verdict with the float64 tolerances, in its one-block form."""
    lo, hi = torch.aminmax(reference - candidate)
    r_lo, r_hi = torch.aminmax(reference)
    lo, hi, r_lo, r_hi = torch.stack((lo, hi, r_lo, r_hi)).tolist()
    t = TOLERANCES[F64]
    return max(-lo, hi) <= t.atol + t.rtol * max(-r_lo, r_hi)


def _cast(exact: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``exact`` cast to ``dtype`` and the largest rounding error of the cast (NaN where a
    value is NaN, infinite where one overflows)."""
    out = exact.to(dtype, memory_format=torch.contiguous_format)
    lo, hi = torch.aminmax(out.to(F64).sub_(exact))
    return out, float(torch.maximum(-lo, hi))


def lean_region(conv: Conv, bn: BatchNorm, expr, activation, gen) -> tuple[nn.Module, int]:
    """Fuse and prove one conv + BN region as straight-line torch code: the fused layer and
    the number of its six checks that pass (outputs on the probe and the activation window,
    the input gradient, the gradients of the conv weight, BN weight and BN bias)."""
    spec = conv.spec
    fmt = region.proof_memory_format(spec, "NCHW")
    stride, padding, dilation, groups = spec.stride, spec.torch_padding, spec.dilation, \
        spec.groups
    weight = conv.weight.detach().to(F64, memory_format=fmt, copy=True).requires_grad_(True)
    gamma = bn.weight.detach().to(F64, copy=True).requires_grad_(True)
    beta = bn.bias.detach().to(F64, copy=True).requires_grad_(True)
    mean, var = bn.running_mean.detach().to(F64), bn.running_var.detach().to(F64)
    bias0 = None if conv.bias is None else conv.bias.detach().to(F64)
    with torch.enable_grad():
        scale = gamma * torch.rsqrt(var + bn.eps)
        fused_w = weight * scale.reshape(-1, 1, 1, 1)
        fused_b = beta + ((0.0 if bias0 is None else bias0) - mean) * scale
    w, b = fused_w.detach(), fused_b.detach()
    (w32, e_w), (b32, e_b) = _cast(w, conv.weight.dtype), _cast(b, conv.weight.dtype)
    if not math.isfinite(max(e_w, e_b)):
        raise ValueError("the fused kernel overflows the model's dtype")
    layer = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, stride, padding,
                      dilation, groups, bias=True, device="meta")
    layer.weight, layer.bias = nn.Parameter(w32), nn.Parameter(b32)

    def training_form(x):
        y = F.conv2d(x, weight, bias0, stride, padding, dilation, groups)
        return F.batch_norm(y, mean, var, gamma, beta, False, 0.0, bn.eps)

    def fused(x):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    x = draw(region.probe_shape(spec, "NCHW", expr), gen, memory_format=fmt)
    window = region._activation_window(activation, x, "NCHW")
    xin = x.clone().requires_grad_(True)
    y = training_form(xin)
    ok = _passes(y, fused(x))
    with torch.no_grad():
        ok += _passes(training_form(window), fused(window))
    grad = draw(y.shape, gen, memory_format=fmt)
    geometry = (None, list(stride), list(padding), list(dilation), False, [0, 0], groups)
    gx_fused = torch.ops.aten.convolution_backward(grad, x, w, *geometry,
                                                   [True, False, False])[0]
    gw_fused = torch.ops.aten.convolution_backward(grad, x, w, *geometry,
                                                   [False, True, False])[1]
    adjoint = torch.autograd.grad([fused_w, fused_b], [weight, gamma, beta],
                                  [gw_fused, grad.sum((0, 2, 3))])
    found = torch.autograd.grad(y, [xin, weight, gamma, beta], grad)
    ok += _passes(found[0], gx_fused)
    for truth, mapped in zip(found[1:], adjoint):
        ok += _passes(truth, mapped)
    return layer, ok


def lean_regions(regions: list) -> tuple[float, int]:
    """(seconds, checks passed) of ``lean_region`` over every region."""
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    passed = sum(lean_region(conv, bn, expr, act, gen)[1] for conv, bn, expr, act in regions)
    return time.perf_counter() - start, passed


def repfuse_regions(regions: list) -> float:
    """Seconds of repfuse's own reductions (on float64 leaves, with the shape-only run where
    ``fx.fuser`` makes one), layers and proofs of the same regions: what ``lean_regions``
    stands for."""
    start = time.perf_counter()
    for _, _, expr, activation in regions:
        shapes = None if rg.direct(expr) else rg.reduce_shapes(expr)
        fused = region.reduce_for_proof(expr, shapes)
        fused.to_module()
        if not region.prove_region(expr, fused, activation).ok:
            raise AssertionError(f"region {rg.describe(expr)} failed its proof")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a timm model or yolov8n")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    stages._capture_regions()
    step, total, _, model = stages._profile(args.model, args.size, args.threads)
    regions = []
    for expr, _, activation in stages.REGIONS:
        found = pair(expr)
        if found is None or activation is None:
            sys.exit(f"{args.model}: a region is not one conv and one batch norm on an "
                     f"activation ({rg.describe(expr)}); this bound covers only such models")
        regions.append((*found, expr, activation))
    check, truth, proofs, trace = stages.floor_parts()
    label, peer = stages.peer_fusion(args.model, model)
    forward = stages.own_forward(model, convert.example(args.size))
    lean_regions(regions)   # warm-up
    repfuse_regions(regions)
    times, ours = [], []
    for _ in range(args.repeats):     # alternately, each in a settled heap
        seconds, (_, passed) = convert.timed(lambda: lean_regions(regions))[:2]
        times.append(seconds)
        ours.append(convert.timed(lambda: repfuse_regions(regions))[0])
    lean = statistics.median(times)
    floor = check + truth + trace + proofs + forward + peer
    bound = floor - proofs + lean
    print(f"{args.model} 1x3x{args.size}x{args.size}, {args.threads} thread(s): training step "
          f"{step:.3f} s, fuse(verify=True) {total:.3f} s = {total / step:.2f} steps (one run)")
    print(f"  {len(regions)} conv+BN regions as straight-line code: {lean:.3f} s (their "
          f"float64 runs alone {proofs:.3f} s), {passed} of {6 * len(regions)} checks pass; "
          f"repfuse's reductions, layers and proofs of them {statistics.median(ours):.3f} s")
    print(f"  floor with the forward and {label}: {floor:.3f} s = {floor / step:.2f} steps")
    print(f"  the same with the lean regions:  {bound:.3f} s = {bound / step:.2f} steps "
          f"(the graph pass not counted)")
    print(f"  left for the graph pass at 5 steps: {5 * step - bound:.3f} s; repfuse's "
          f"conversion less this bound: {total - bound:.3f} s")


if __name__ == "__main__":
    main()
