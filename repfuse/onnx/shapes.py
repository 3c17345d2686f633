"""Shapes of an ONNX graph's values, for finding regions (their layouts and channels).

ONNX's own shape inference stops at ``Reshape(y, Shape(x))`` when a dimension is
symbolic (the batch): the TorchScript exporter writes ``reshape_as`` that way, and every
value after it would have no shape. onnxruntime's symbolic shape inference follows such
reshapes; its shapes fill the values ONNX's inference left without one (ONNX's are kept
where it has them: the symbolic one names the channel axis of a flattened value
symbolically).
"""

from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)


def _dims(info: onnx.ValueInfoProto) -> list | None:
    """The dims of a value's shape (ints, or None where unknown), or None without one."""
    t = info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _incomplete(proto: onnx.ModelProto) -> set[str]:
    """Node outputs whose shape (or a size in it) ONNX's inference did not find."""
    infos = {v.name: v for v in (*proto.graph.value_info, *proto.graph.output)}
    out = set()
    for node in proto.graph.node:
        for name in node.output:
            dims = _dims(infos[name]) if name in infos else None
            if name and (dims is None or None in dims):
                out.add(name)
    return out


def _merge(target: onnx.ValueInfoProto, source: onnx.ValueInfoProto) -> None:
    """Give ``target`` the sizes ``source`` knows and it does not (same rank), or
    ``source``'s shape when it has none."""
    mine, theirs = _dims(target), _dims(source)
    if theirs is None:
        return
    if mine is None:
        target.type.tensor_type.shape.CopyFrom(source.type.tensor_type.shape)
        if not target.type.tensor_type.elem_type:
            target.type.tensor_type.elem_type = source.type.tensor_type.elem_type
        return
    if len(mine) != len(theirs):
        return
    for dim, size in zip(target.type.tensor_type.shape.dim, theirs):
        if not dim.HasField("dim_value") and size is not None:
            dim.dim_value = size


def _reshapes_by_shape(proto: onnx.ModelProto) -> bool:
    shapes = {o for n in proto.graph.node if n.op_type == "Shape" for o in n.output}
    return any(n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in shapes
               for n in proto.graph.node)


def infer_shapes(proto: onnx.ModelProto, data: bytes | None = None) -> onnx.ModelProto:
    """``proto`` (serialized: ``data``, when given) with the value shapes ONNX's shape
    inference finds, completed by onnxruntime's symbolic inference after
    ``Reshape(y, Shape(x))`` (see the module docstring); ``proto`` itself when neither can
    run."""
    try:
        out = onnx.shape_inference.infer_shapes(proto if data is None else data)
    except Exception:  # noqa: BLE001 - shapes are a help, not a requirement
        return proto
    incomplete = _incomplete(out)
    if not incomplete or not _reshapes_by_shape(out):
        return out
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        symbolic = SymbolicShapeInference.infer_shapes(out, auto_merge=True)
    except Exception as err:  # noqa: BLE001 - optional (onnxruntime), best effort
        log.debug("symbolic shape inference failed: %s", err)
        return out
    if symbolic is None:
        return out
    infos = {v.name: v for v in out.graph.value_info}
    for found in symbolic.graph.value_info:
        if found.name not in incomplete:
            continue
        if found.name not in infos:
            infos[found.name] = out.graph.value_info.add(name=found.name)
            infos[found.name].type.tensor_type.elem_type = found.type.tensor_type.elem_type
        _merge(infos[found.name], found)
    return out
