"""Conversion time: repfuse.fuse vs timm.utils.reparameterize_model (same run, ratios).

For each timm model: the median wall time of ``timm.utils.reparameterize_model``
(a copy, as repfuse does by default), of ``repfuse.fuse(verify=False)`` and of
``repfuse.fuse(verify=True)`` (per-region proofs and whole-model outputs and input
gradients), timed alternately after one warm-up call of each, and the inference time of
repfuse's fused model vs timm's deploy form.

    .venv/bin/python benchmarks/convert.py [--models repvgg_b3,repvgg_a0,mobileone_s0]

``--steps``: ``fuse(verify=True)`` against one training step (forward and backward of the
training form at the same input), alternately, for timm models and ultralytics yolov8n
(built from its YAML); ``f64/step``: the training form run in float64 (forward and input
gradient, what the whole-model criterion's float64 truth costs where a float32 check
needs it) over the step; ``truth``: whether the whole-model check needed that run at this
example input (``--seed``; ``example``). ``--memory``: the peak resident size (a fresh
process per figure) of
``repfuse convert --timm repvgg_b3`` against the training form's weight bytes, and of
``fuse(verify=True)`` of a synthetic RepVGG / RepLKNet-style model of ``--synthetic``
million parameters built at random (no download); and the floor any conversion of
repvgg_b3 has (the CLI's imports, the model, one forward at the example input and a copy
of the model, the output's size), which the CLI's peak is also given over.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        .venv/bin/python benchmarks/convert.py --size 224 --threads 2 --steps
    .venv/bin/python benchmarks/convert.py --memory --synthetic 400   # glibc defaults

``--sweep``: the conversion cost across model families at 224x224 (``--size``), each model
in its own process (``--timeout`` seconds at most): ``fuse(verify=False)`` over timm's
``reparameterize_model``, ``fuse(verify=True)`` over one training step of the training
form (forward and backward at the same input), both in seconds too, and the region
search's attempts per region. Targets: verify <= 10x a training step, fuse <= 2x timm,
no model above 30 s. ``flr``: what any graph pass pays before fusing anything (a copy of the
model, one forward at the example input, a ``torch.fx.symbolic_trace``), as a ratio to timm
and as fuse's ratio to it. Each call is made once before it is timed. ``--models`` runs a
subset.

    .venv/bin/python benchmarks/convert.py --sweep [--models resnet18,xception41] [--size 128]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import subprocess
import sys
import time

import timm
import torch
import torch.fx
import torch.nn as nn

import repfuse
from repfuse.cli.allocator import keep_freed_memory
from repfuse.proofs.model import run_float64
from repfuse.proofs.truth import JUDGED


def randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model


def calibrate(model: nn.Module, shape: tuple) -> nn.Module:
    """Batch-norm statistics from data, as a trained model has them: random scales and
    shifts, then running means and variances averaged over two random batches of ``shape``
    run in training mode (momentum None: a plain average), then eval mode. Without this,
    statistics drawn at random do not match the activations they normalize, and deep
    networks (MobileOne, RepVGG-B3) reach outputs of 1e9 and more, where every float32
    check needs the float64 run; a trained model does not look like that."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    g = torch.Generator().manual_seed(1)
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for m in norms:
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if m.running_mean is not None:
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.randn(shape, generator=g))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def fresh_model(name: str) -> nn.Module:
    """timm model ``name`` (or ultralytics ``yolov*``) with seeded random weights, in eval
    mode: the same model in every process (whether the whole-model check needs the float64
    truth depends on the weights as much as on the example)."""
    torch.manual_seed(0)
    if name.startswith("yolo"):
        return ultralytics_model(name)
    return randomize(timm.create_model(name, pretrained=False)).eval()


def seeded_model(name: str, size: int) -> nn.Module:
    """``fresh_model`` with batch-norm statistics calibrated at ``size`` (``calibrate``):
    what the profiling scripts convert."""
    return calibrate(fresh_model(name), (2, 3, size, size))


def timed(fn) -> tuple[float, object, int]:
    """(wall seconds, result, minor page faults) of one call of ``fn``, made after the
    garbage of earlier calls is collected (not timed). A fused model and a traced graph
    hold reference cycles, which only the cyclic collector frees, at a moment set by its
    allocation counts: left to it, a call runs in whatever heap the earlier ones left, and
    on this machine each page it first touches costs 1-14 us, so the same call moved
    between 0.5 and 2 s (timm's reparameterize_model at 224: 0.92 s and 308k faults on its
    first call into a heap the conversions had grown, 0.52 s on the next two). Callers
    drop their reference to the previous result before the next call."""
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    out = fn()
    spent = time.perf_counter() - start
    return spent, out, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def example(size: int, seed: int = 0) -> torch.Tensor:
    """The seeded 1x3xSIZExSIZE example input. The verdict's cost depends on it: where the
    direct comparison of the input gradients fails (a kink of a ReLU flipped by rounding),
    the whole-model check runs the training form in float64 (the truth); repvgg_a0 at 224,
    one thread: 1.01-1.05 s with it on seeds 0-2, 0.76 s without on seed 3."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def judged_by_truth(report) -> bool:
    """Whether the whole-model check ran the float64 truth (a check judged by it)."""
    return any(c.detail.startswith(JUDGED) for c in report.model_checks.checks
               if c.detail)


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        out = None
        spent, out, _ = timed(fn)
        times.append(spent)
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
    model = fresh_model(name)
    x = example(args.size, args.seed)
    if args.calibrate:
        calibrate(model, (2, 3, args.size, args.size))
    calls = {"timm": lambda: timm.utils.reparameterize_model(model),
             "fuse": lambda: repfuse.fuse(model, x, verify=False),
             "verify": lambda: repfuse.fuse(model, x, verify=True)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    out = {k: f() for k, f in calls.items()}    # warm-up: first-call setup is not timed
    for _ in range(args.repeats):                # alternately: the machine's drift is shared
        for k, f in calls.items():
            out[k] = None
            t, out[k] = median_time(f, 1)
            times[k].append(t)
    t_timm, t_fuse, t_verify = (statistics.median(times[k]) for k in calls)
    deploy, result, checked = out["timm"], out["fuse"], out["verify"]
    xi = torch.randn(1, 3, args.infer_size, args.infer_size)
    infer = inference_ratio(result.model, deploy, xi, 15)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    ok = "yes" if checked.report.ok else "NO"
    truth = "yes" if judged_by_truth(checked.report) else "no"
    return (f"{name:14} {n:7.1f}M {t_timm:8.3f} {t_fuse:8.3f} {t_fuse / t_timm:5.2f}x "
            f"{t_verify:9.3f} {t_verify / t_timm:5.2f}x {ok:>3} {truth:>5} {infer:10.3f}x")


# ---------------------------------------------------------------- against a training step
def ultralytics_model(name: str) -> nn.Module:
    """An ultralytics detection model from its bundled YAML, random weights (no download)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn import tasks

    torch.manual_seed(0)
    return randomize(tasks.DetectionModel(f"{name}.yaml", verbose=False)).eval()


def training_step(model: nn.Module, x: torch.Tensor) -> None:
    """Forward and backward of the training form (eval-mode BN, as the proofs run it)."""
    leaves = differentiable_outputs(model(x.clone().requires_grad_(True)))
    torch.autograd.backward(leaves, [torch.ones_like(o) for o in leaves])
    model.zero_grad(set_to_none=True)


def differentiable_outputs(out) -> list[torch.Tensor]:
    """The output tensors (a tensor, or a tuple / list of values) that carry a gradient."""
    return [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.requires_grad]


def step_row(name: str, args) -> str:
    """fuse(verify=True) against one training step, alternately, medians."""
    model = fresh_model(name)
    x = example(args.size, args.seed)
    if args.calibrate:
        calibrate(model, (2, 3, args.size, args.size))
    training_step(model, x)     # warm-up (first-call kernel setup)
    x64 = x.double()
    float64_run(model, x64)
    steps, verify, fast, runs64 = [], [], [], []
    for _ in range(args.repeats):
        steps.append(median_time(lambda: training_step(model, x), 1)[0])
        t, checked = median_time(lambda: repfuse.fuse(model, x, verify=True), 1)
        verify.append(t)
        fast.append(median_time(lambda: repfuse.fuse(model, x, verify=False), 1)[0])
        runs64.append(median_time(lambda: float64_run(model, x64), 1)[0])
    s, v, f, r = (statistics.median(t) for t in (steps, verify, fast, runs64))
    truth = "yes" if judged_by_truth(checked.report) else "no"
    return f"{name:14} {s:8.3f} {f:8.3f} {v:9.3f} {v / s:6.2f}x {r / s:7.2f}x {truth:>5}"


def float64_run(model: nn.Module, x64: torch.Tensor) -> None:
    """What the whole-model criterion's float64 truth costs where it runs: the training form
    in float64, forward and the input gradient, as the criterion runs it
    (repfuse.proofs.model.run_float64)."""
    run_float64(model, (x64,), True)


def steps_table(args) -> None:
    print(f"fuse(verify=True) against one training step, 1x3x{args.size}x{args.size}, "
          f"threads {args.threads}, median of {args.repeats} (alternated)")
    print(f"{'model':14} {'step s':>8} {'fuse s':>8} {'verify s':>9} {'ratio':>7} "
          f"{'f64/step':>8} {'truth':>5}")
    for name in args.step_models.split(","):
        print(step_row(name, args), flush=True)


# ---------------------------------------------------------------- peak memory
class Synthetic(nn.Sequential):
    """A RepVGG / RepLKNet-style training form: a stem, then blocks of a kxk conv + BN, a 1x1
    conv + BN and a BN identity, with a large-kernel depthwise block (31x31 + 5x5) after
    every third dense one; built at random."""

    def __init__(self, width: int, dense: int) -> None:
        layers = [_Branches(3, width, stride=2)]
        for i in range(dense):
            layers.append(_Branches(width, width))
            if i % 3 == 2:
                layers.append(_Branches(width, width, large=True))
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


class _Branches(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, large: bool = False) -> None:
        super().__init__()
        k, groups = (31, cin) if large else (3, 1)
        self.big = nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups,
                                           bias=False), nn.BatchNorm2d(cout))
        small = 5 if large else 1
        self.small = nn.Sequential(nn.Conv2d(cin, cout, small, stride, small // 2,
                                             groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.big(x) + self.small(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


def synthetic(million: float) -> nn.Module:
    """A ``Synthetic`` model of about ``million`` million parameters (width 2048)."""
    width = 2048
    per_block = width * width * 10       # 3x3 + 1x1 dense convs
    torch.manual_seed(0)
    return randomize(Synthetic(width, max(1, round(million * 1e6 / per_block)))).eval()


_PEAK = """
import sys, torch
sys.path.insert(0, {here!r})
import convert, repfuse
torch.set_num_threads({threads})
model = convert.synthetic({million})
x = torch.randn(1, 3, {size}, {size})
n = sum(p.numel() for p in model.parameters())
rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0]
r = repfuse.fuse(model, x, verify=True)
print(n, n * 4, rss * 1024, r.report.ok)
"""


#: What any conversion of repvgg_b3 holds before it fuses anything: the CLI's imports, the
#: model, one forward at the example input and a copy of the model (the output's size).
_FLOOR = """
import copy, torch, timm, repfuse, repfuse.cli
model = timm.create_model("repvgg_b3").eval()
with torch.no_grad():
    model(torch.randn(1, 3, 224, 224))
out = copy.deepcopy(model)
"""


def _peak_kb(cmd: list[str], env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` under ``/usr/bin/time -v``; (peak resident KB, its stdout)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=True)
    peak = next(int(line.split()[-1]) for line in proc.stderr.splitlines()
                if "Maximum resident" in line)
    return peak, proc.stdout


def memory_table(args) -> None:
    import tempfile

    weight = sum(p.numel() * 4 for p in timm.create_model("repvgg_b3").parameters())
    with tempfile.TemporaryDirectory() as tmp:
        cli = [os.path.join(os.path.dirname(sys.executable), "repfuse"), "convert", "--timm",
               "repvgg_b3", "--input-shape", "1,3,224,224", "-o", f"{tmp}/b3.pt", "--quiet",
               "--force"]
        floor, _ = _peak_kb([sys.executable, "-c", _FLOOR])
        print(f"floor (imports, repvgg_b3, one forward at 224, a copy of it): peak "
              f"{floor / 1e6:.2f} GB = {floor * 1024 / weight:.2f}x the weights", flush=True)
        for label, env in (("glibc defaults", {"REPFUSE_SYSTEM_MALLOC": "1"}),
                           ("as installed", {})):
            peak, _ = _peak_kb(cli, env)
            print(f"repfuse convert --timm repvgg_b3 (224, {label}): peak "
                  f"{peak / 1e6:.2f} GB = {peak * 1024 / weight:.2f}x the weights "
                  f"({weight / 1e9:.2f} GB), {peak / floor:.2f}x the floor", flush=True)
    if args.synthetic:
        code = _PEAK.format(here=os.path.dirname(os.path.abspath(__file__)),
                            threads=args.threads, million=args.synthetic,
                            size=args.synthetic_size)
        peak, out = _peak_kb([sys.executable, "-c", code])
        n, nbytes, built, ok = out.split()
        print(f"synthetic {int(n) / 1e6:.0f}M parameters, 1x3x{args.synthetic_size}x"
              f"{args.synthetic_size}: fuse(verify=True) ok={ok}, peak {peak / 1e6:.2f} GB "
              f"({int(built) / 1e9:.2f} GB once built; weights {int(nbytes) / 1e9:.2f} GB)")


# ---------------------------------------------------------------- sweep
#: at least 20 models across families: plain ResNets, separable / depthwise nets,
#: RepVGG / MobileOne / FastViT / GhostNet families, hybrid conv-attention nets
SWEEP = ("resnet18,resnet50,res2net50_14w_8s,regnetx_002,xception41,mobilenetv3_large_100,"
         "efficientnet_b0,mixnet_s,ghostnet_050,ghostnetv3_050,repghostnet_050,repvgg_a0,"
         "repvgg_b0,mobileone_s0,fastvit_t8,fastvit_mci0,repvit_m0_9,levit_128s,"
         "nextvit_small,convnext_atto,efficientvit_b0,mobilevitv2_050")


def train_mode_step(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """Median time of forward + backward of the training form (a copy in train mode), and
    "*" when a batch of one cannot train (a BatchNorm1d head): then a batch of two. The
    gradients are dropped after each step (``zero_grad(set_to_none=True)``, what an
    optimizer's ``zero_grad`` does), so each backward writes fresh ones, as in a training
    loop, instead of adding into the previous step's (repvgg_b3 at 224, one thread,
    alternated: 3.06 against 3.11 s)."""
    train = copy.deepcopy(model).train()
    batch = [x]

    def step():
        out = train(batch[0])
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
        train.zero_grad(set_to_none=True)
    try:
        step()                                          # warm-up
    except ValueError:
        batch[0] = torch.cat([x, x])
        step()
    return median_time(step, 3)[0], "*" if batch[0] is not x else ""


def graph_floor(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, str]:
    """The least any graph pass over ``model`` pays before it fuses anything: a copy of the
    model (the input is not modified), one forward at the example input (shapes) and a
    ``torch.fx.symbolic_trace`` (the graph); "-" marks a model fx cannot trace (then the
    copy and the forward only)."""
    def copy_and_run():
        with torch.no_grad():
            copy.deepcopy(model)(x)
    floor, _ = median_time(copy_and_run, repeats)
    # each trace on its own copy: tracing runs forward on proxies, and a model that caches
    # values in forward (LeViT's attention biases) would keep proxies in its caches
    copies = iter([copy.deepcopy(model) for _ in range(repeats)])
    try:
        t_trace, _ = median_time(lambda: torch.fx.symbolic_trace(next(copies)), repeats)
    except Exception:  # noqa: BLE001 - untraceable Python: the floor without the trace
        return floor, "-"
    return floor + t_trace, ""


def sweep_row(name: str, args) -> str:
    """One sweep row for timm model ``name`` (seconds, ratios, attempts per region). Each
    call is made once before it is timed (first-call setup and imports are not counted,
    for timm's conversion and the training step either)."""
    model = fresh_model(name)
    x = torch.randn(1, 3, args.size, args.size)
    if args.calibrate:
        calibrate(model, (2, 3, args.size, args.size))
    t_train, mark = train_mode_step(model, x)
    timm.utils.reparameterize_model(model)
    t_timm, _ = median_time(lambda: timm.utils.reparameterize_model(model), args.repeats)
    t_floor, untraced = graph_floor(model, x, args.repeats)
    repfuse.fuse(model, x, verify=False)
    t_fuse, result = median_time(lambda: repfuse.fuse(model, x, verify=False), args.repeats)
    t_verify, checked = median_time(lambda: repfuse.fuse(model, x, verify=True), 1)
    search = result.report.search
    per_region = search.get("attempts", 0) / max(search.get("regions", 0), 1)
    ok = "yes" if checked.report.ok else "NO"
    return (f"{name + mark:22} {t_train:7.2f} {t_timm:7.2f} {t_fuse:7.2f} {t_verify:8.2f} "
            f"{t_fuse / t_timm:8.1f}x {t_floor / t_timm:7.1f}x{untraced:1} "
            f"{t_fuse / t_floor:7.1f}x {t_verify / t_train:8.1f}x "
            f"{search.get('regions', 0):5d} {per_region:6.2f} {ok:>3}")


def run_sweep(args) -> None:
    names = args.models.split(",") if args.models_given else SWEEP.split(",")
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, "
          f"input 1x3x{args.size}x{args.size}, fuse: median of {args.repeats}, verify: one run")
    print(f"{'model':22} {'train s':>7} {'timm s':>7} {'fuse s':>7} {'verify s':>8} "
          f"{'fuse/timm':>9} {'flr/timm':>9} {'fuse/flr':>8} {'ver/train':>9} {'regs':>5} "
          f"{'att/rg':>6} {'ok':>3}", flush=True)
    print("flr: copy + one forward + torch.fx.symbolic_trace of the model (-: fx cannot "
          "trace it; copy + forward); *: training step on a batch of two", flush=True)
    for name in names:
        cmd = [sys.executable, __file__, "--row", name, "--size", str(args.size),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        cmd += ["--calibrate"] if args.calibrate else []
        print(row_from_process(name, cmd, args.timeout), flush=True)


def row_from_process(name: str, cmd: list[str], timeout: int) -> str:
    """The last line ``cmd`` prints (one model's row, from a fresh process), or a row
    saying that it failed or did not finish within ``timeout`` seconds."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{name:22} did not finish within {timeout} s"
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else \
        f"{name:22} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"


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
    parser.add_argument("--steps", action="store_true",
                        help="fuse(verify=True) against one training step instead")
    parser.add_argument("--step-models", default="repvgg_a0,repvgg_b3,mobileone_s0,yolov8n")
    parser.add_argument("--seed", type=int, default=0, help="of the example input")
    parser.add_argument("--calibrate", action="store_true",
                        help="batch-norm statistics from two random batches (as trained)")
    parser.add_argument("--memory", action="store_true", help="peak resident sizes instead")
    parser.add_argument("--synthetic", type=float, default=0.0,
                        help="with --memory: millions of parameters of the synthetic model")
    parser.add_argument("--synthetic-size", type=int, default=32)
    args = parser.parse_args()
    args.models_given = args.models is not None
    args.models = args.models or "repvgg_b3,repvgg_a0,mobileone_s0"
    args.size = args.size or (224 if args.sweep or args.row else 64)
    torch.set_num_threads(args.threads)
    if args.memory:
        return memory_table(args)
    if args.steps:
        return steps_table(args)
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
              f"{'verify s':>9} {'ratio':>6} {'ok':>3} {'truth':>5} {'infer ratio':>11}")
    print(header)
    for name in args.models.split(","):
        print(bench(name, args))

if __name__ == "__main__":
    main()
