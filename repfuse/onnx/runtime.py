"""onnxruntime: sessions, random inputs, and the comparison of two ONNX models."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from repfuse.errors import InputError, first_line
from repfuse.proofs.compare import compare, failed
from repfuse.report import Check, VerifyReport

_DEFAULT_DIM = 32  # size used for a symbolic non-batch dimension when making random inputs


def ort_session(proto: onnx.ModelProto | bytes, *, optimize: bool = False,
                threads: int | None = None):
    """An onnxruntime CPU session of a model (or its serialized bytes); graph
    optimizations disabled unless ``optimize``."""
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as exc:
        raise InputError("onnxruntime is not installed; pip install onnxruntime "
                         "(or pass verify=False / check=False)") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    return ort.InferenceSession(data, opts,
                                providers=["CPUExecutionProvider"])


_NP_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
              onnx.TensorProto.FLOAT16: np.float16}


def random_feeds(proto: onnx.ModelProto, *, batch: int = 2, seed: int = 0,
                 dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random standard-normal inputs for every graph input; symbolic first dims get
    ``batch``, other symbolic dims ``dims[name]`` or 32."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in proto.graph.initializer}
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif axis == 0:
                shape.append(batch)
            else:
                shape.append((dims or {}).get(d.dim_param, _DEFAULT_DIM))
        dtype = _NP_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise InputError(f"graph input '{inp.name}' has element type "
                             f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; only float "
                             "inputs can be checked with random data (pass verify=False)")
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def compare_outputs(name: str, reference: Sequence, candidate: Sequence,
                    tol=None) -> list[Check]:
    """One ``repfuse.proofs.compare`` check per output (tolerance by dtype, or ``tol``)."""
    if len(reference) != len(candidate):
        return [failed(name, f"{len(candidate)} outputs, reference has {len(reference)}")]
    checks = []
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        label = name if len(reference) == 1 else f"{name}, output {i}"
        checks.append(compare(label, torch.as_tensor(np.asarray(ref)),
                              torch.as_tensor(np.asarray(cand)), tol))
    return checks


def verify_onnx_pair(reference: onnx.ModelProto, candidate: onnx.ModelProto, *,
                     tol=None, batches: Sequence[int] = (1, 3), seed: int = 0,
                     threads: int | None = None,
                     serialized: tuple[bytes, bytes] | None = None) -> VerifyReport:
    """Run both models with onnxruntime (no graph optimizations, ``threads`` intra-op
    threads, or onnxruntime's default) on the same random inputs; checks per batch size
    (the second one only when the batch is dynamic). ``serialized``: both models'
    bytes, when the caller has them (a large model is slow to serialize)."""
    ref_data, cand_data = serialized or (reference, candidate)
    try:
        ref_sess = ort_session(ref_data, threads=threads)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise InputError(f"onnxruntime cannot load the original model ({ort_reason(exc)}); "
                         "pass verify=False to skip the check") from None
    cand_sess = ort_session(cand_data, threads=threads)
    report = VerifyReport(notes=["onnxruntime, graph optimizations disabled, random inputs"])
    batches = batches if _has_dynamic_batch(reference) else batches[:1]
    for k, batch in enumerate(batches):
        feeds = random_feeds(reference, batch=batch, seed=seed + k)
        try:
            expected = ref_sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
            raise InputError(f"onnxruntime cannot run the original model on random inputs "
                             f"({shapes}): {ort_reason(exc)}; pass verify=False to skip the "
                             "check") from None
        report.checks += compare_outputs(f"onnxruntime outputs, batch {batch}", expected,
                                         cand_sess.run(None, feeds), tol)
    return report


def ort_reason(exc: BaseException, limit: int = 200) -> str:
    """The reason in an onnxruntime error, without its code prefix, the model path and the
    C++ source location: '[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:Fatal
    error: org.example:Mystery(-1) is not a registered function/op' -> 'org.example:Mystery(-1)
    is not a registered function/op'. Other exceptions: 'TypeName: first line'."""
    text = " ".join(str(exc).split())
    if "[ONNXRuntimeError]" not in text:
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0] if first else ''}"[:limit]
    text = re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed: ?", "", text)
    text = re.sub(r"^(Fatal error|Node \S* error): ?", "", text)
    location = re.match(r"\S+\.(?:cc|cpp|h):\d+ [^(]*\(", text)
    if location:  # skip the C++ signature: balanced parentheses after the location
        depth, end = 1, location.end()
        while end < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        text = text[end:].lstrip()
    return text[:limit]


def _has_dynamic_batch(proto: onnx.ModelProto) -> bool:
    inits = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return True
    return False


class OnnxRunner(nn.Module):
    """An ONNX model run by onnxruntime (graph optimizations off) behind an nn.Module face."""

    def __init__(self, proto, label: str):
        super().__init__()
        self.session = ort_session(proto)
        self.label = label
        self.inputs = self.session.get_inputs()

    def forward(self, *args):
        if len(args) != len(self.inputs):
            raise InputError(
                f"{self.label} takes {len(self.inputs)} inputs, not {len(args)}")
        feeds = {}
        for meta, a in zip(self.inputs, args):
            dtype = np.float16 if "float16" in meta.type else (
                np.float64 if "double" in meta.type else np.float32)
            feeds[meta.name] = a.detach().cpu().numpy().astype(dtype)
        try:
            outs = self.session.run(None, feeds)
        except Exception as exc:
            raise InputError(
                f"{self.label}: onnxruntime cannot run it on an input of shape "
                f"{tuple(args[0].shape)} ({first_line(exc, 200)}); "
                "check --input-shape") from None
        outs = tuple(torch.from_numpy(np.asarray(o)) for o in outs)
        return outs[0] if len(outs) == 1 else outs
