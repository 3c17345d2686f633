"""Where ``fuse(verify=True)`` spends its time, in units of one training step.

Wraps the pipeline's stages with wall-clock timers (inclusive: ``fuse_module`` contains the
region proofs, ``verify_models`` contains ``judge`` and the float64 runs), converts once to
warm up, then once timed (in a settled heap: ``convert.timed``), and prints each stage's
total, in seconds and in training steps (forward and backward of the training form at the
same input).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        .venv/bin/python benchmarks/stages.py repvgg_a0 [--size 224] [--threads 1]

``--sweep`` (or several comma-separated models) prints one row per model instead, each
from a fresh process, with the stages as disjoint parts of ``fuse(verify=True)`` in
training steps: ``reach`` (the one real forward through the traced graphs, tracing
included; ``trace`` of it is fx tracing), ``regions`` (classification, region search,
reductions, rewrites: ``fuse_module`` less ``reach`` and the proofs), ``proofs`` (the
region proofs; ``ms/rg`` per region), ``f32 chk`` (the whole-model check's runs of both
models in their dtype), ``truth`` (its float64 runs, made only for the checks that the
direct comparison rejects), ``exact`` (when the float64 criterion still rejects a check:
the fused structure run in float64 with its exact kernels against the training form run
in float64, ``fx.pipeline._judge_by_exact_kernels``), ``rest`` (copies, accounting),
``floor`` (the lower bound of ``--floor`` below). With verification the regions'
reductions are the proofs' (on float64 leaves, with grad:
``proofs.region.reduce_for_proof``) and count in ``regions``. The
step is the median of five (``convert.training_step``: eval-mode batch norms, as the
proofs run the model) for yolov8n, and for timm models the median of three of a
train-mode copy, as in ``convert.py --sweep`` (an eval-mode LeViT caches its attention
biases and cannot step twice); models are seeded, so rows repeat:

    .venv/bin/python benchmarks/stages.py --sweep          # convert.SWEEP and yolov8n

``--floor`` (one model) prints, after the stages, the float runs that the same checks cannot
do without, each timed on its own with torch's kernels and nothing of repfuse around them:
the whole-model check's runs of both models and its float64 truth (as timed in the
conversion: they are the models' own forward and backward), and for every proven region
its proof's float64 runs on the probe (the training form forward on the random probe with
its gradients to the input and every parameter, forward on the activation window; the
fused kernel forward on both, its input and weight gradient), without the copy into
float64 leaves, the reduction, its adjoint or the comparisons; and the conversion's own fx
tracing (``trace``), which a graph pass cannot do without.
Their sum is a lower bound of ``fuse(verify=True)`` with these checks (the fusion itself
counted as free), in training steps and, for timm models, in units of timm's warm
``reparameterize_model``. A second bound adds the two parts a conversion with these checks
does besides: the one real forward that runs the model's untraceable Python and captures
the regions' input windows for the proofs (timed as the model's own forward without
grad), and the fusion itself, timed as the authors' unverified fusion in place on a copy
made untimed (timm's ``reparameterize_model(inplace=True)``, ultralytics' ``fuse()``; the
copy is left out, as repfuse shares the parameters instead of copying them). The second is
a measure, not a proof: a fusion cheaper than the authors' own would lower it. A third
line puts the regions' work as repfuse does it in place of the proofs' float64 runs and the
authors' fusion: every ``prove_region`` and every reduction on float64 leaves
(``reduce_for_proof``, which is the fusion when verifying), as timed in the conversion. The
rest of the conversion is the graph pass (the reaching forward's bookkeeping and captures,
analysis, search, the model's copy, rewrites, accounting; fx tracing and the copies of
traced graphs are in the floor), and the line says how much time 5 training steps leave it:

    .venv/bin/python benchmarks/stages.py repvgg_b3 --size 64 --threads 2 --floor

``--parts`` (one model) times instead the parts of the conversion with exclusive timers
(each part's time less that of the parts it calls), the median of five conversions after
a warm-up: the float runs (``torch leaf forwards``: torch.nn's own layers wherever they run,
the whole-model check, the proofs, the reductions) and, one by one, the graph pass's parts
(the node-by-node run of the graphs, with the model's functional ops; recording values and
windows; the model's copy; each step of a unit's analysis; the parts tried; rewrites;
snapshots of plain state; ...):

    .venv/bin/python benchmarks/stages.py mobileone_s0 --parts

The model is a timm model, or ultralytics ``yolov8n`` (from its YAML), with random weights
(seeded) and calibrated batch-norm statistics (``convert.calibrate``).
"""

from __future__ import annotations

import argparse
import collections
import copy as copy_module
import functools
import gc
import os
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402

import repfuse  # noqa: E402
import repfuse.fx.fuse as fx_fuse  # noqa: E402
import repfuse.fx.fuser as fuser  # noqa: E402
import repfuse.fx.pipeline as pipeline  # noqa: E402
import repfuse.fx.reach as reach  # noqa: E402
import repfuse.fx.trace as fx_trace  # noqa: E402
import repfuse.pristine as pristine  # noqa: E402
import repfuse.proofs.model as whole  # noqa: E402
import repfuse.proofs.region as region  # noqa: E402
import repfuse.region as rg  # noqa: E402
import repfuse.region.worth as worth  # noqa: E402
from repfuse.region import layout as L  # noqa: E402

TOTAL: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()
REGIONS: list = []      # (expr, _Shape of fused, activation) of every region proven


class _Shape:
    """What ``proof_runs`` needs of a fused kernel: its geometry, not its values (a float64
    run takes as long on any values), so the conversion timed does not hold every fused
    kernel until it ends (a gigabyte on repvgg_b3 that its heap could not reuse)."""

    def __init__(self, fused) -> None:
        self.spec, self.shape = fused.spec, tuple(fused.weight.shape)
        self.input_layout = getattr(fused, "input_layout", "")
        self.value_layout = fused.value_layout
        self.pooled = getattr(fused, "pooled", False)


def _timed(module, name: str) -> None:
    real = getattr(module, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            TOTAL[name] += time.perf_counter() - start
            CALLS[name] += 1

    setattr(module, name, wrapper)


def _timed_outermost(owner, name: str, label: str) -> None:
    """Time a recursive function's outermost calls only (as ``label``)."""
    real = getattr(owner, name)
    depth = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                TOTAL[label] += time.perf_counter() - start
                CALLS[label] += 1

    setattr(owner, name, wrapper)


def _instrument() -> None:
    for module, name in ((pipeline, "fuse_module"), (pipeline, "prove_region"),
                         (pipeline, "verify_models"), (pipeline, "_judge_by_exact_kernels"),
                         (whole, "judge"), (whole, "_float64_values"), (whole, "float64_copy"),
                         (region, "_adjoint"), (fx_fuse, "_run"),
                         (pipeline, "reduce_for_proof")):
        _timed(module, name)
    _timed_outermost(fx_trace._NestedTracer, "nested", "trace")


def _capture_regions() -> None:
    real = pipeline.prove_region

    @functools.wraps(real)
    def wrapper(expr, fused, activation=None, **kwargs):
        REGIONS.append((expr, _Shape(fused), activation))
        return real(expr, fused, activation, **kwargs)

    pipeline.prove_region = wrapper


def proof_runs(expr, fused: _Shape, activation) -> float:
    """Seconds of the float64 runs that ``prove_region``'s checks of one region need, timed
    without the rest of the proof (see ``--floor``), the fused kernel drawn at random in its
    shape; the inputs are built untimed."""
    spec = fused.spec
    layout = rg.region_input(expr).layout
    fmt = region.proof_memory_format(spec, layout)
    weight = torch.randn(fused.shape, dtype=torch.float64).to(memory_format=fmt)
    bias = torch.randn(spec.out_channels, dtype=torch.float64)
    expr64, leaves = region.float64_leaves(expr, fmt)
    out_layout = rg.value_layouts(expr)[id(expr)]
    merge = region._merger(layout, fused.input_layout, fused.value_layout, fused.pooled)
    x = torch.randn(region.probe_shape(spec, layout, expr), dtype=torch.float64).to(
        memory_format=fmt)
    window = None if activation is None else region._activation_window(activation, x, layout)
    start = time.perf_counter()
    xin = x.clone().requires_grad_(True)
    y = L.to_canonical(rg.evaluate(expr64, L.from_canonical(xin, layout)), out_layout)
    xf = merge(x)
    region.fused_forward(xf, weight, bias, spec)
    if window is not None:
        with torch.no_grad():
            rg.evaluate(expr64, L.from_canonical(window, layout))
        region.fused_forward(merge(window), weight, bias, spec)
    grad = torch.randn(y.shape, dtype=torch.float64).to(
        memory_format=fmt if y.dim() == 4 else torch.contiguous_format)
    torch.autograd.grad(y, [xin, *leaves.values()], grad, allow_unused=True)
    region.fused_input_grad(xf, weight, grad, spec)
    region.fused_weight_grad(xf, weight.shape, grad, spec)
    return time.perf_counter() - start


def floor_parts() -> tuple[float, float, float, float]:
    """(check's runs, float64 truth, proofs' float64 runs, fx tracing) in seconds for the
    conversion just timed (``--floor``)."""
    proofs = sum(proof_runs(*r) for r in REGIONS)
    return (TOTAL["verify_models"] - TOTAL["judge"], TOTAL["judge"], proofs, TOTAL["trace"])


def peer_fusion(name: str, model) -> tuple[str, float]:
    """(label, seconds) of the model authors' own unverified fusion, in place on a copy
    made untimed (the copy is not the fusion: repfuse shares the parameters instead),
    warm, median of three: timm's ``reparameterize_model(inplace=True)`` or ultralytics'
    ``fuse()``."""
    if name.startswith("yolo"):
        label, fuse = "ultralytics' fuse()", lambda m: m.fuse(verbose=False)
    else:
        label = "timm's reparameterize_model in place"
        fuse = functools.partial(timm.utils.reparameterize_model, inplace=True)

    def run():
        copy = copy_module.deepcopy(model)
        gc.collect()
        start = time.perf_counter()
        fuse(copy)
        return time.perf_counter() - start
    run()
    return label, sorted(run() for _ in range(3))[1]


def own_forward(model, x) -> float:
    """Seconds of the model's own forward without grad (median of three)."""
    with torch.no_grad():
        model(x)
        t, _ = convert.median_time(lambda: model(x), 3)
    return t


def floor(name: str, step: float, total: float, model, x) -> None:
    """Print the lower bound of ``--floor`` for the conversion just timed, then the same
    bound with the two parts any conversion with these checks also does: the one real
    forward that reaches the model's untraceable code and captures the regions' input
    windows (timed as the model's own forward without grad), and the fusion itself (timed
    as the authors' unverified fusion, in place)."""
    check, truth, proofs, trace = floor_parts()
    bound = check + proofs + truth + trace
    label, peer = peer_fusion(name, model)
    forward = own_forward(model, x)
    full = bound + forward + peer
    units = [("training steps", step)]
    if not name.startswith("yolo"):
        timm.utils.reparameterize_model(model)
        t_timm, _ = convert.median_time(lambda: timm.utils.reparameterize_model(model), 3)
        units.append((f"timm's reparameterize_model ({t_timm:.3f} s warm)", t_timm))
    print(f"  floor with the same checks (torch's kernels, the fusion counted as free): "
          f"{bound:.3f} s")
    print(f"    whole-model check's runs in the models' dtype {check:7.3f} s")
    print(f"    its float64 truth                             {truth:7.3f} s")
    print(f"    the {len(REGIONS)} region proofs' float64 runs          {proofs:7.3f} s")
    print(f"    the conversion's fx tracing                   {trace:7.3f} s")
    print(f"  with the reaching forward and the fusion at the authors' cost: {full:.3f} s")
    print(f"    the model's own forward without grad          {forward:7.3f} s")
    print(f"    {label + ' (warm)':46}{peer:7.3f} s")
    for unit_label, unit in units:
        print(f"    in {unit_label}: floor {bound / unit:.2f}, with both {full / unit:.2f}, "
              f"fuse(verify=True) {total / unit:.2f}")
    own = TOTAL["prove_region"] + TOTAL["reduce_for_proof"]
    third = bound - proofs + forward + own
    print(f"  with the regions' checks and reductions as repfuse does them: {third:.3f} s "
          f"({third / step:.2f} steps)")
    print(f"    {CALLS['prove_region']} proofs and {CALLS['reduce_for_proof']} reductions on "
          f"float64 leaves, timed in the conversion {own:7.3f} s")
    print(f"    the graph pass, the rest of the conversion    {total - third:7.3f} s "
          f"({(total - third) / step:.2f} steps; room under 5 steps: "
          f"{5 * step - third:.3f} s)")


def _profile(name: str, size: int, threads: int):
    """(training step s, fuse(verify=True) s, result, model) with TOTAL / CALLS filled for
    the timed conversion (one warm-up conversion first)."""
    torch.set_num_threads(threads)
    _instrument()
    model = convert.seeded_model(name, size)
    x = convert.example(size)
    if name.startswith("yolo"):
        convert.training_step(model, x)
        step, _ = convert.median_time(lambda: convert.training_step(model, x), 5)
    else:   # as the sweep of convert.py: a train-mode copy (a cache-holding eval model,
        step, _ = convert.train_mode_step(model, x)   # LeViT's, cannot step twice)
    repfuse.fuse(model, x, verify=True)
    TOTAL.clear()
    CALLS.clear()
    REGIONS.clear()
    total, result, _ = convert.timed(lambda: repfuse.fuse(model, x, verify=True))
    return step, total, result, model


def parts(name: str, size: int, threads: int, repeats: int = 5) -> None:
    """Print the exclusive time of each part of ``fuse(verify=True)`` (``--parts``)."""
    torch.set_num_threads(threads)
    model = convert.seeded_model(name, size)
    x = convert.example(size)
    own: collections.Counter = collections.Counter()
    stack: list[float] = []

    def exclusive(owner, attr: str, label: str) -> None:
        real = getattr(owner, attr)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return real(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = stack.pop()
                own[label] += spent - inner
                if stack:
                    stack[-1] += spent
        setattr(owner, attr, wrapper)

    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.startswith("torch.nn") and "forward" in cls.__dict__:
            exclusive(cls, "forward", "torch leaf forwards")
    for owner, attr, label in (
            (pipeline, "fuse_module", "fuse_module's own code"),
            (pipeline, "verify_models", "whole-model check (less leaf forwards)"),
            (pipeline, "prove_region", "region proofs (less leaf forwards)"),
            (pipeline, "reduce_for_proof", "reductions on float64 leaves"),
            (fx_fuse, "_run", "reach: dispatchers and session"),
            (reach._GraphRunner, "run", "reach: node-by-node run of the graphs"),
            (reach, "_record", "reach: recording shapes and windows"),
            (fx_trace._NestedTracer, "_trace", "fx tracing"),
            (fx_trace._NestedTracer, "_copy", "graph copies (one trace per structure)"),
            (fx_fuse, "_share_copy", "the model's copy"),
            (pristine, "snapshot", "snapshots of plain state"),
            (pristine, "restore", "restores of plain state"),
            (fx_fuse, "inventory", "accounting"), (fx_fuse, "account", "accounting"),
            (fx_fuse, "count", "accounting"),
            (fuser.Fuser, "rewrite", "rewrite's own code"),
            (fuser.Fuser, "analyze", "analysis: the rest"),
            (fuser, "classify", "analysis: classification"),
            (fuser, "find_regions", "analysis: region search"),
            (fuser, "copy_norms", "analysis: norm copies"),
            (fuser, "kept_patterns", "analysis: kept patterns"),
            (fuser, "distribute_norms", "analysis: the rest"),
            (fuser, "normalize", "analysis: the rest"),
            (fuser, "_mark_constants", "analysis: the rest"),
            (fuser, "ignorable_nodes", "analysis: the rest"),
            (fuser, "inline_call", "analysis: the rest"),
            (fuser.Fuser, "_decide", "parts tried"), (worth.Attempts, "_try", "parts tried"),
            (worth, "shapes_or_refusal", "parts tried"),
            (fuser.Fuser, "_rewrite_graph", "rewrites and installs"),
            (fuser, "install", "rewrites and installs"),
            (fuser.Fuser, "_record", "rewrites and installs")):
        exclusive(owner, attr, label)
    repfuse.fuse(model, x, verify=True)
    totals, rests, found = [], [], collections.defaultdict(list)
    for _ in range(repeats):
        own.clear()
        total, _, _ = convert.timed(lambda: repfuse.fuse(model, x, verify=True))
        totals.append(total)
        for label in set(own) | set(found):
            found[label].append(own[label])
        rests.append(total - sum(own.values()))
    total = statistics.median(totals)
    print(f"{name} 1x3x{size}x{size}, {threads} thread(s): fuse(verify=True) median "
          f"{total:.3f} s of {repeats}; exclusive time of each part (median):")
    medians = {label: statistics.median(v) for label, v in found.items()}
    rest = statistics.median(rests)
    for label, seconds in sorted(medians.items(), key=lambda kv: -kv[1]):
        print(f"  {label:42} {1e3 * seconds:8.1f} ms")
    print(f"  {'in no part (each conversion less its parts)':42} {1e3 * rest:8.1f} ms")


HEADER = (f"{'model':22} {'step s':>6} {'verify':>7} {'reach':>6} {'trace':>6} "
          f"{'regions':>7} {'proofs':>6} {'n':>4} {'ms/rg':>6} {'f32 chk':>7} {'truth':>6} "
          f"{'exact':>6} {'rest':>5} {'floor':>6}   (all but step s and ms/rg in training steps)")


def row(name: str, size: int, threads: int) -> str:
    _capture_regions()
    step, total, _, _ = _profile(name, size, threads)
    bound = sum(floor_parts())
    t = TOTAL
    proofs = t["prove_region"]
    regions = t["fuse_module"] - t["_run"] - proofs
    check = t["verify_models"] - t["judge"]
    exact = t["_judge_by_exact_kernels"]
    rest = total - t["fuse_module"] - t["verify_models"] - exact
    n = CALLS["prove_region"]
    cells = [total, t["_run"], t["trace"], regions, proofs]
    first = " ".join(f"{v / step:{w}.2f}" for v, w in zip(cells, (7, 6, 6, 7, 6)))
    return (f"{name:22} {step:6.3f} {first} {n:4d} {1e3 * proofs / max(n, 1):6.1f} "
            f"{check / step:7.2f} {t['judge'] / step:6.2f} {exact / step:6.2f} {rest / step:5.2f} "
            f"{bound / step:6.2f}")


def sweep(names: list[str], args) -> None:
    print(f"torch {torch.__version__}, input 1x3x{args.size}x{args.size}, {args.threads} "
          f"thread(s); one timed fuse(verify=True) per model after a warm-up", flush=True)
    print(HEADER, flush=True)
    for name in names:
        cmd = [sys.executable, __file__, name, "--row", "--size", str(args.size),
               "--threads", str(args.threads)]
        print(convert.row_from_process(name, cmd, args.timeout), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None,
                        help="a timm model or yolov8n; several, comma-separated: one row each")
    parser.add_argument("--sweep", action="store_true",
                        help="one row per model of convert.SWEEP and yolov8n")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--floor", action="store_true",
                        help="also the lower bound of a conversion with the same checks")
    parser.add_argument("--parts", action="store_true",
                        help="the exclusive time of each part of the conversion instead")
    args = parser.parse_args()
    if args.row:
        print(row(args.model, args.size, args.threads))
        return
    if args.sweep or (args.model and "," in args.model):
        names = (convert.SWEEP + ",yolov8n").split(",") if args.sweep else args.model.split(",")
        return sweep(names, args)
    if not args.model:
        parser.error("name a model, or pass --sweep")
    if args.parts:
        return parts(args.model, args.size, args.threads)
    if args.floor:
        _capture_regions()
    step, total, result, model = _profile(args.model, args.size, args.threads)
    print(f"{args.model} 1x3x{args.size}x{args.size}, {args.threads} thread(s): training step "
          f"{step:.3f} s, fuse(verify=True) {total:.3f} s = {total / step:.1f} steps")
    for name, seconds in sorted(TOTAL.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {seconds:7.3f} s {seconds / step:6.2f} steps  x{CALLS[name]}")
    for note in result.report.model_checks.notes:
        print(f"  note: {note[:160]}")
    if args.floor:
        floor(args.model, step, total, model, convert.example(args.size))


if __name__ == "__main__":
    main()
