"""ONNX: repfuse's output against the export it came from and the authors' deploy export.

Part 1 (latency). Each timm model (seeded random weights, realistic BatchNorm statistics
as the CLI gives them) is exported in every exporter style: TorchScript with constant
folding (``ts-fold``), TorchScript without (``ts``) and torch.export (``dynamo``); so is
its deploy form (``timm.utils.reparameterize_model``, the authors' own fusion code).
``repfuse.fuse_onnx`` fuses the training-form export. The three files run with
onnxruntime (CPU, all graph optimizations, ``--threads`` intra-op threads), alternately
in one process; the table gives median latencies and the ratios repfuse / original
(target: <= 1.0 within noise) and repfuse / deploy (target: <= 1.05), whether the graph
onnxruntime runs for repfuse's file has the same kernels as the deploy export's (op types,
conv weight shapes and geometry; then any latency difference is noise), and the number
of kernels onnxruntime fuses (Gelu, QuickGelu, LayerNormalization) in each graph.

Part 2 (conversion time, the ONNX front end against the torch one). For each model at
``--timing-size``: ``repfuse.fuse(model, x)`` against ``repfuse.fuse_onnx`` of its
``repfuse.export_onnx`` file, both with verification, alternately, ``--rounds`` times
each; the table gives the medians and ONNX / fx (target: <= 2).

Part 3 (``--verify-arch``, the cost of the proofs in the ONNX front end): for each model's
``repfuse.export_onnx`` file at ``--verify-size``, ``repfuse.fuse_onnx(verify=True)`` against
``repfuse.fuse_onnx(verify=False)``, alternately, ``--rounds`` times each (target: <= 3).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        .venv/bin/python benchmarks/onnx.py [--arch ...] [--timing-arch ...] [--verify-arch ...]
"""

from __future__ import annotations

import os
import sys

# this file is named like the onnx package: keep its folder off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import collections  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import repfuse  # noqa: E402
from repfuse.models.init import init_model  # noqa: E402

STYLES = ("ts-fold", "ts", "dynamo")
FUSED_KERNELS = ("Gelu", "QuickGelu", "LayerNormalization", "SimplifiedLayerNormalization")


def timm_model(arch: str, size: int) -> torch.nn.Module:
    import timm

    return init_model(lambda: timm.create_model(arch, pretrained=False), seed=0,
                      realistic_bn=True, calibration_shape=(2, 3, size, size))


def export(model: torch.nn.Module, size: int, style: str, path: str) -> None:
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if style == "dynamo":
            program = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=18,
                                        dynamic_shapes=({0: "batch"},), verbose=False)
            onnx.save(program.model_proto, path)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                              do_constant_folding=style == "ts-fold", input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})


def session(path: str, threads: int, dump: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if dump:
        opts.optimized_model_filepath = dump
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def optimized(path: str, folder: str) -> onnx.ModelProto:
    """The graph onnxruntime runs (its optimized model as it saves it)."""
    dump = os.path.join(folder, "optimized.onnx")
    session(path, 1, dump)
    return onnx.load(dump)


def fused_kernels(model: onnx.ModelProto) -> str:
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return " ".join(f"{k}:{ops[k]}" for k in FUSED_KERNELS if ops[k]) or "-"


def kernels_signature(model: onnx.ModelProto) -> collections.Counter:
    """Every node of the optimized graph by op type, and for convolutions the weight
    shape and geometry: two files with the same signature run the same kernels."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = collections.Counter()
    for n in model.graph.node:
        attrs = tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a)))
                             for a in n.attribute if a.name in (
                                 "group", "strides", "pads", "dilations", "activation")))
        weight = dims.get(n.input[1]) if "Conv" in n.op_type and len(n.input) > 1 else None
        out[(n.op_type, weight, attrs)] += 1
    return out


def latencies(paths: dict, size: int, threads: int, repeats: int, warmup: int) -> dict:
    """Median milliseconds per file, the files run alternately."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    name = next(iter(sessions.values())).get_inputs()[0].name
    times = {k: [] for k in sessions}
    for i in range(warmup + repeats):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {name: x})
            if i >= warmup:
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_table(args, folder: str) -> None:
    print(f"\nonnxruntime CPU, all graph optimizations, {args.threads} thread(s), input "
          f"{args.size}x{args.size}, batch 1, median of {args.repeats}, files alternated")
    print(f"{'arch':<16} {'export':<7} {'original':>9} {'repfuse':>9} {'deploy':>9} "
          f"{'rf/orig':>8} {'rf/deploy':>9} {'same as deploy':>14}  "
          "fused kernels (original | repfuse | deploy)")
    for arch in args.arch:
        model = timm_model(arch, args.size)
        import timm

        deploy = timm.utils.reparameterize_model(copy.deepcopy(model)).eval()
        for style in STYLES:
            paths = {k: os.path.join(folder, f"{arch}.{style}.{k}.onnx")
                     for k in ("original", "repfuse", "deploy")}
            export(model, args.size, style, paths["original"])
            export(deploy, args.size, style, paths["deploy"])
            onnx.save(repfuse.fuse_onnx(paths["original"]).model, paths["repfuse"])
            med = latencies(paths, args.size, args.threads, args.repeats, args.warmup)
            graphs = {k: optimized(p, folder) for k, p in paths.items()}
            kernels = " | ".join(fused_kernels(g) for g in graphs.values())
            same = kernels_signature(graphs["repfuse"]) == kernels_signature(graphs["deploy"])
            print(f"{arch:<16} {style:<7} {med['original']:>9.2f} {med['repfuse']:>9.2f} "
                  f"{med['deploy']:>9.2f} {med['repfuse'] / med['original']:>8.2f} "
                  f"{med['repfuse'] / med['deploy']:>9.2f} {'yes' if same else 'no':>14}  "
                  f"{kernels}", flush=True)


def timing_table(args, folder: str) -> None:
    size = args.timing_size
    print(f"\nconversion time with verification, input {size}x{size}, median of "
          f"{args.rounds} alternated rounds (torch threads: the library's own choice, "
          f"from {torch.get_num_threads()})")
    print(f"{'arch':<16} {'fx (s)':>8} {'onnx (s)':>9} {'onnx/fx':>8}")
    for arch in args.timing_arch:
        model = timm_model(arch, size)
        x = torch.randn(1, 3, size, size)
        path = os.path.join(folder, f"{arch}.timing.onnx")
        repfuse.export_onnx(model, x, path)
        fx, ox = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            repfuse.fuse(model, x)
            fx.append(time.perf_counter() - start)
            start = time.perf_counter()
            repfuse.fuse_onnx(path)
            ox.append(time.perf_counter() - start)
        f, o = statistics.median(fx), statistics.median(ox)
        print(f"{arch:<16} {f:>8.2f} {o:>9.2f} {o / f:>8.2f}", flush=True)


def verify_cost_table(args, folder: str) -> None:
    size = args.verify_size
    print(f"\nfuse_onnx with and without verification, input {size}x{size}, median of "
          f"{args.rounds} alternated rounds")
    print(f"{'arch':<16} {'fast (s)':>9} {'proven (s)':>11} {'ratio':>7}")
    for arch in args.verify_arch:
        model = timm_model(arch, size)
        path = os.path.join(folder, f"{arch}.verify.onnx")
        repfuse.export_onnx(model, torch.randn(1, 3, size, size), path)
        fast, proven = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            repfuse.fuse_onnx(path, verify=False)
            fast.append(time.perf_counter() - start)
            start = time.perf_counter()
            repfuse.fuse_onnx(path, verify=True)
            proven.append(time.perf_counter() - start)
        f, p = statistics.median(fast), statistics.median(proven)
        print(f"{arch:<16} {f:>9.2f} {p:>11.2f} {p / f:>6.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*",
                        default=["repvgg_a0", "mobileone_s0", "repghostnet_050", "fastvit_t8"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timing-arch", nargs="*",
                        default=["repvgg_a0", "mobileone_s0", "repghostnet_050", "fastvit_t8",
                                 "repvit_m0_9", "nextvit_small"])
    parser.add_argument("--timing-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--verify-arch", nargs="*", default=["repvgg_a0", "mobileone_s0"])
    parser.add_argument("--verify-size", type=int, default=224)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        if args.arch:
            latency_table(args, folder)
        if args.timing_arch:
            timing_table(args, folder)
        if args.verify_arch:
            verify_cost_table(args, folder)


if __name__ == "__main__":
    main()
