"""``repfuse.quantize``: fuse and prove (``prepare``), run the doctor, choose what stays in
float, quantize with onnxruntime, check the INT8 model and time it against the float one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from repfuse.errors import InputError
from repfuse.quant.cpu import u8s8_saturates
from repfuse.quant.doctor import activation_ranges, layer_reports, sensitivities
from repfuse.quant.evaluate import Scorer, all_finite, sqnr, top1_agreement
from repfuse.quant.keepfloat import Choice, greedy, resolve
from repfuse.quant.latency import measure_latency
from repfuse.quant.mapping import module_paths
from repfuse.quant.prepare import prepare
from repfuse.quant.qdq import QdqQuantizer, input_name, quantization
from repfuse.quant.report import Latency, QuantizeReport, QuantizeResult
from repfuse.quant.weights import weighted_nodes

#: Sensitivities are measured on at most this many calibration samples.
SENSITIVITY_SAMPLES = 64


def check_options(keep_float, target_sqnr) -> None:
    if not isinstance(target_sqnr, (int, float)) or not math.isfinite(target_sqnr):
        raise InputError(f"target_sqnr={target_sqnr!r} must be a finite number of dB "
                         "(30 is a good start)")
    if isinstance(keep_float, str):
        if keep_float not in ("auto", "none"):
            raise InputError(f"keep_float={keep_float!r}: give 'auto', 'none' or a list of "
                             "layer names")
    elif keep_float is not None and not (isinstance(keep_float, Sequence) and all(
            isinstance(n, str) for n in keep_float)):
        raise InputError(f"keep_float={keep_float!r}: give 'auto', 'none' or a list of layer "
                         "names")


def _choose(keep_float, quantizer, layers, scorer, *, per_channel, target, full) -> Choice:
    if keep_float == "auto":
        return greedy(quantizer, layers, scorer, per_channel=per_channel, target=target,
                      start=full)
    if keep_float in (None, "none") or not keep_float:
        return Choice([], full[0], full[1])
    kept = resolve(keep_float, layers)
    model = quantizer.quantize(per_channel=per_channel, exclude=kept)
    return Choice(kept, model, scorer.sqnr(model))


def _mode(per_channel: bool) -> str:
    return "per output channel" if per_channel else "per tensor"


def _range(reduce: bool, asked: bool | None) -> str:
    if not reduce:
        return ""
    why = "as asked" if asked is not None else \
        "this CPU (x86-64 without VNNI) would saturate full-range uint8 x int8 products"
    return f" in a 7-bit range (reduce_range: {why})"


def quantize_model(model, calibration, *, example_inputs=None, per_channel: bool = True,
                   keep_float="auto", target_sqnr: float = 30.0, mean=None, std=None,
                   limit: int | None = None, tol=None, latency_repeat: int = 20,
                   threads: int | None = None,
                   reduce_range: bool | None = None) -> QuantizeResult:
    """See ``repfuse.quantize``."""
    check_options(keep_float, target_sqnr)
    saturates = u8s8_saturates()
    reduce = saturates if reduce_range is None else bool(reduce_range)
    quantization()      # onnxruntime present, before any work
    prep = prepare(model, calibration, example_inputs=example_inputs, mean=mean, std=std,
                   limit=limit, tol=tol)
    proto, data = prep.proto, prep.calibration.data
    nodes = weighted_nodes(proto)
    if not nodes:
        raise InputError(f"{prep.label} has no Conv, Gemm or MatMul with a constant weight: "
                         "nothing to quantize")
    name = input_name(proto)
    report = QuantizeReport(source=prep.label, per_channel=per_channel,
                            target_sqnr=float(target_sqnr), reduce_range=reduce,
                            calibration=prep.calibration.to_dict(), steps=list(prep.steps),
                            fuse_report=prep.fuse_report)
    with QdqQuantizer(proto, data, reduce_range=reduce) as quantizer:
        per_tensor_model = quantizer.quantize(per_channel=False)
        per_channel_model = quantizer.quantize(per_channel=True)
        full = per_channel_model if per_channel else per_tensor_model
        scorer = Scorer(proto, name, data)
        few = Scorer(proto, name, data[:SENSITIVITY_SAMPLES]) \
            if len(data) > SENSITIVITY_SAMPLES else scorer
        report.layers = layer_reports(
            proto, nodes, module_paths(proto, nodes, prep.fused_module), per_tensor_model,
            per_channel_model, activation_ranges(proto, nodes, name, data),
            sensitivities(quantizer, nodes, few, per_channel=per_channel), prep.branch_scales)
        report.output_sqnr_all_int8 = scorer.sqnr(full)
        choice = _choose(keep_float, quantizer, report.layers, scorer, per_channel=per_channel,
                         target=target_sqnr, full=(full, report.output_sqnr_all_int8))
        outputs = scorer.outputs(choice.model)
        report.output_sqnr = sqnr(scorer.reference, outputs)
        report.top1_agreement = top1_agreement(scorer.reference, outputs)
        report.finite = all_finite(outputs)
    onnx.checker.check_model(choice.model)
    for layer in report.layers:
        layer.kept_float = layer.node in choice.kept
    report.kept_float = [layer.name for layer in report.layers if layer.kept_float]
    report.outliers = sorted((o for layer in report.layers for o in layer.outliers),
                             key=lambda o: -o.ratio)
    report.steps.append(
        f"quantized with onnxruntime.quantization.quantize_static: QDQ, uint8 activations, "
        f"int8 weights {_mode(per_channel)}{_range(reduce, reduce_range)}, "
        f"MinMax calibration on {len(data)} sample(s)")
    if saturates and not reduce:
        report.notes.append(
            "this CPU (x86-64 without VNNI) saturates onnxruntime's uint8 x int8 products "
            "with full-range weights, and the SQNR measured here includes it; "
            "reduce_range=True (--reduce-range) gives 7-bit weights that do not saturate")
    if keep_float == "auto":
        report.steps.append(f"keep-float auto (target {target_sqnr:g} dB): "
                            f"{len(choice.kept)} layer(s) kept in float")
    elif choice.kept:
        report.steps.append(f"{len(choice.kept)} layer(s) kept in float as asked")
    if latency_repeat > 0:
        models = {"float": proto, "int8": choice.model}
        if choice.kept:
            models["all_int8"] = full
        times = measure_latency(models, name, data, repeat=latency_repeat, threads=threads)
        report.latency = Latency(times["float"], times["int8"], times.get("all_int8"),
                                 threads, latency_repeat)
    return QuantizeResult(choice.model, proto, report)
