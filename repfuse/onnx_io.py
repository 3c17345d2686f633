"""ONNX files: safe loading, atomic saving, onnxruntime runs and comparisons.

Loading never reads outside the model's folder: external-data locations that are
absolute or climb out of the folder (``..``, symlinks) are refused with
``InputError``. Saving goes through a temporary file in the destination folder and
``os.replace``, so a reader never sees a half-written file, and an input file is never
overwritten.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from repfuse.errors import InputError
from repfuse.proofs import compare, failed
from repfuse.report import Check, VerifyReport

_DEFAULT_DIM = 32  # size used for a symbolic non-batch dimension when making random inputs


# ---------------------------------------------------------------------------- loading
def _tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Every TensorProto of ``graph`` and its subgraphs (initializers, attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def check_external_data(proto: onnx.ModelProto, base_dir: str | None, source: str) -> bool:
    """Refuse external data that lies outside ``base_dir``; returns whether there is any."""
    found = False
    for tensor in _tensors(proto.graph):
        location = _external_location(tensor)
        if location is None:
            continue
        found = True
        if base_dir is None:
            raise InputError(
                f"{source}: initializer '{tensor.name}' is stored as external data "
                f"('{location}'); pass the model's file path instead of a ModelProto")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise InputError(
                f"{source}: initializer '{tensor.name}' has external data location "
                f"{location!r}; only relative paths inside the model's folder are accepted")
        parts = Path(location.replace("\\", "/")).parts
        if ".." in parts:
            raise InputError(
                f"{source}: initializer '{tensor.name}' has external data location "
                f"{location!r} that leaves the model's folder; move the data next to the model")
        root = os.path.realpath(base_dir)
        target = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, target]) != root:
            raise InputError(
                f"{source}: external data {location!r} of initializer '{tensor.name}' "
                "resolves outside the model's folder (symlink?); copy the data next to the model")
        if not os.path.isfile(target):
            raise InputError(
                f"{source}: external data file {location!r} of initializer '{tensor.name}' "
                "does not exist next to the model")
    return found


def check_graph_inputs(proto: onnx.ModelProto, source: str) -> None:
    """Every node input must come from a graph input, an initializer or an earlier node."""
    known = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
    known |= {s.values.name for s in proto.graph.sparse_initializer}
    known.add("")
    for node in proto.graph.node:
        for name in node.input:
            if name not in known:
                raise InputError(
                    f"{source}: node '{node.name or node.op_type}' ({node.op_type}) reads "
                    f"'{name}', which no graph input, initializer or earlier node provides "
                    "(missing initializer?); re-export the model")
        known.update(node.output)
    for out in proto.graph.output:
        if out.name not in known:
            raise InputError(f"{source}: graph output '{out.name}' is never computed")


def load_onnx(model, *, check: bool = True) -> tuple[onnx.ModelProto, str]:
    """Load ``model`` (a path or an ``onnx.ModelProto``) safely and validate it.

    Returns ``(proto, source)`` where ``source`` names the model in messages.
    External data is read only from the model's folder.
    """
    if isinstance(model, onnx.ModelProto):
        source = "ONNX model"
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        check_external_data(proto, None, source)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        source = path
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds
            raise InputError(f"{path}: not an ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
        if not proto.graph.node and not proto.graph.output:
            raise InputError(f"{path}: not an ONNX model (no graph found)")
        base_dir = os.path.dirname(os.path.abspath(path))
        if check_external_data(proto, base_dir, source):
            try:
                onnx.load_external_data_for_model(proto, base_dir)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{path}: cannot read external data ({exc})") from None
    else:
        raise InputError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    if check:
        check_graph_inputs(proto, source)
        try:
            onnx.checker.check_model(proto)
        except (onnx.checker.ValidationError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise InputError(f"{source}: fails the ONNX checker: {first}") from None
    return proto, source


# ---------------------------------------------------------------------------- saving
def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def write_atomic(data: bytes, path, *, inputs: Sequence = ()) -> str:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    Refuses to overwrite any of ``inputs``. Returns the absolute path written."""
    path = os.path.abspath(os.fspath(path))
    for src in inputs:
        if src is not None and os.path.exists(path) and _same_file(path, os.fspath(src)):
            raise InputError(f"{path}: refusing to overwrite the input file; choose another path")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_onnx(proto: onnx.ModelProto, path, *, inputs: Sequence = ()) -> str:
    """Save ``proto`` atomically (initializers inline; the model must be under 2 GB)."""
    if proto.ByteSize() >= 2**31 - 1:
        raise InputError(f"{path}: model is larger than 2 GB; ONNX needs external data for it")
    return write_atomic(proto.SerializeToString(), path, inputs=inputs)


# ---------------------------------------------------------------------------- running
def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type of the main graph (sorted by name)."""
    counts = Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
                     for n in proto.graph.node)
    return dict(sorted(counts.items()))


def ort_session(proto: onnx.ModelProto, *, optimize: bool = False, threads: int | None = None):
    """An onnxruntime CPU session; graph optimizations disabled unless ``optimize``."""
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
    return ort.InferenceSession(proto.SerializeToString(), opts,
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
                     tol=None, batches: Sequence[int] = (1, 3), seed: int = 0) -> VerifyReport:
    """Run both models with onnxruntime (no graph optimizations) on the same random
    inputs; checks per batch size (the second one only when the batch is dynamic)."""
    try:
        ref_sess = ort_session(reference)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise InputError(f"onnxruntime cannot load the original model ({ort_reason(exc)}); "
                         "pass verify=False to skip the check") from None
    cand_sess = ort_session(candidate)
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
