"""ONNX files: safe loading and atomic saving.

Loading never reads outside the model's folder: external-data locations that are
absolute or climb out of the folder (``..``, symlinks) are refused with
``InputError``. Saving goes through a temporary file in the destination folder and
``os.replace``, so a reader never sees a half-written file, and an input file is never
overwritten.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

from repfuse.errors import InputError, first_line
from repfuse.io.atomic import atomic_write


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


#: Largest number of elements accepted for one declared input or initializer shape.
MAX_ELEMENTS = 1 << 31


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _check_shapes(model, source: str) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = _dims(vi)
        numeric = [d for d in dims if isinstance(d, int)]
        if any(d < 0 for d in numeric):
            raise InputError(f"{source}: {vi.name!r} declares a negative dimension {dims}")
        total = 1
        for d in numeric:
            total *= max(d, 1)
        if total > MAX_ELEMENTS:
            raise InputError(f"{source}: {vi.name!r} declares shape {dims} "
                             f"({total:.3g} elements); that is not a real model input")
    for init in model.graph.initializer:
        total = 1
        for d in init.dims:
            total *= max(int(d), 1)
        if any(int(d) < 0 for d in init.dims) or total > MAX_ELEMENTS:
            raise InputError(f"{source}: initializer {init.name!r} declares shape "
                             f"{list(init.dims)}; the file is corrupt")


def _check_finite_initializers(model, source: str) -> None:
    """Refuse NaN or infinite values in floating-point initializers, naming the first one."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.size:
            bad = ~np.isfinite(array.astype(np.float64, copy=False))
            if bad.any():
                kind = "NaN" if np.isnan(array.astype(np.float64)).any() else "infinite"
                raise InputError(f"{source}: initializer {init.name!r} has {int(bad.sum())} "
                                 f"{kind} value(s) of {array.size}; the model is corrupt")


def _parse(path: str) -> onnx.ModelProto:
    """Parse an ONNX file without its external data; one-line errors for what is not one."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (expected an ONNX model)")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file (0 bytes); not an ONNX model")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise several kinds
        raise InputError(f"{path}: not an ONNX model (not a valid ONNX protobuf: "
                         f"{first_line(exc)})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputError(f"{path}: not an ONNX model (no graph or no nodes)")
    return proto


def load_onnx(model, *, check: bool = True) -> tuple[onnx.ModelProto, str]:
    """Load ``model`` (a path or an ``onnx.ModelProto``) safely and validate it: the one
    ONNX loader behind the API and the CLI.

    Checks: it parses; declared input/output and initializer shapes are sane; external
    data is read only from the model's folder; with ``check`` also every node input is
    provided, the ONNX checker passes and floating initializers are finite.
    Returns ``(proto, source)`` where ``source`` names the model in messages.
    """
    if isinstance(model, onnx.ModelProto):
        source = "ONNX model"
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        _check_shapes(proto, source)
        check_external_data(proto, None, source)
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        proto = _parse(source)
        _check_shapes(proto, source)
        base_dir = os.path.dirname(os.path.abspath(source))
        if check_external_data(proto, base_dir, source):
            try:
                onnx.load_external_data_for_model(proto, base_dir)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{source}: cannot read external data ({exc})") from None
    else:
        raise InputError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    if check:
        check_graph_inputs(proto, source)
        try:    # a file is checked as it is on disk: no copy of a large model in memory
            onnx.checker.check_model(source if isinstance(model, (str, os.PathLike))
                                     else proto)
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise InputError(f"{source}: fails the ONNX checker: {first_line(exc)}") from None
        _check_finite_initializers(proto, source)
    return proto, source


# ---------------------------------------------------------------------------- saving
def save_onnx(proto: onnx.ModelProto, path, *, inputs: Sequence = (), force: bool = True) -> str:
    """Save ``proto`` atomically (``repfuse.io.atomic_write``; initializers inline, so the
    model must be under 2 GB). Never over one of ``inputs``. Returns the path written."""
    if proto.ByteSize() >= 2**31 - 1:
        raise InputError(f"{path}: model is larger than 2 GB; ONNX needs external data for it")
    out = atomic_write(path, lambda tmp: onnx.save_model(proto, os.fspath(tmp)), force=force,
                       inputs=inputs)
    return os.path.abspath(os.fspath(out))


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type of the main graph (sorted by name)."""
    counts = Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
                     for n in proto.graph.node)
    return dict(sorted(counts.items()))


def onnx_input_shape(model) -> tuple[int, ...] | None:
    """The first graph input's declared shape, when every dimension but batch is known."""
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = _dims(vi)
        if not dims or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            return None
        return (dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 1, *dims[1:])
    return None
