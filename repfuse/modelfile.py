"""Model files: ONNX (validated before use), ``torch.export`` programs, pickled modules.

Nothing here runs code from a file unless the caller passes ``trust_pickle=True``:
``torch.export.load`` and whole-module pickles both unpickle Python objects.
"""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from repfuse.checkpoint import first_line, read_pickle_checkpoint
from repfuse.errors import InputError, UnsafeInputError

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


def load_onnx(path: str | os.PathLike):
    """Read and validate an ONNX file: parse, declared shapes, external data (only inside the
    model's folder), node inputs and the ONNX checker. Returns an ``onnx.ModelProto``."""
    import onnx
    from google.protobuf.message import DecodeError

    from repfuse.onnx_io import load_onnx as load_checked

    path = Path(path)
    source = os.fspath(path)
    if not path.is_file():
        raise InputError(f"ONNX file {source!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{source!r} is empty (0 bytes); not an ONNX model")
    try:
        header = onnx.load_model(source, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, TypeError) as exc:
        raise InputError(f"{source!r} is not a valid ONNX model ({first_line(exc)})") from None
    if not header.HasField("graph") or len(header.graph.node) == 0:
        raise InputError(f"{source!r} is not a valid ONNX model (no graph or no nodes)")
    _check_shapes(header, source)
    del header
    model, _ = load_checked(source, check=True)
    _check_finite_initializers(model, source)
    return model


def _check_finite_initializers(model, source: str) -> None:
    """Refuse NaN or infinite values in floating-point initializers, naming the first one."""
    import numpy as np
    from onnx import numpy_helper

    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.size:
            bad = ~np.isfinite(array.astype(np.float64, copy=False))
            if bad.any():
                kind = "NaN" if np.isnan(array.astype(np.float64)).any() else "infinite"
                raise InputError(f"{source}: initializer {init.name!r} has {int(bad.sum())} "
                                 f"{kind} value(s) of {array.size}; the model is corrupt")


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


def load_exported_program(path: str | os.PathLike, *, trust_pickle: bool = False):
    """``torch.export.load`` a ``.pt2`` file (it unpickles parts of the file: trusted only)."""
    source = os.fspath(path)
    if not trust_pickle:
        raise UnsafeInputError(
            f"{source}: loading a .pt2 program unpickles Python objects from the file, which "
            "can run code; pass --trust-pickle if the file is trusted")
    try:
        return torch.export.load(source)
    except Exception as exc:
        raise InputError(f"{source!r} is not a loadable torch.export program "
                         f"({first_line(exc)})") from None


def _aten_lowering() -> dict:
    import operator

    import torch.nn.functional as F

    aten = torch.ops.aten
    return {aten.conv2d.default: F.conv2d, aten.cat.default: torch.cat,
            aten.mul.Tensor: operator.mul, aten.div.Tensor: operator.truediv,
            aten.neg.default: operator.neg, aten.add.Tensor: operator.add,
            aten.sub.Tensor: operator.sub, aten.relu.default: torch.relu}


def lower_aten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite the ATen calls of an exported graph that linear regions are made of (conv2d,
    batch_norm, add, sub, mul, div, neg, cat) as the torch functions they stand for, so the
    fx front end sees the same graph as for an ``nn.Module``. In place; returns ``gm``."""
    import torch.nn.functional as F

    table = _aten_lowering()
    bn = torch.ops.aten.batch_norm.default
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in table and "alpha" not in node.kwargs:
            node.target = table[node.target]
        elif node.target == bn and len(node.args) >= 8 and not node.kwargs:
            x, w, b, mean, var, training, momentum, eps = node.args[:8]
            node.target = F.batch_norm
            node.args = (x, mean, var, w, b, training, momentum, eps)
    gm.graph.lint()
    gm.recompile()
    return gm


def program_module(program, example: torch.Tensor | None = None) -> nn.Module:
    """An ``nn.Module`` for an exported program that repfuse can fuse: a plain GraphModule
    (the unlifted module refuses ``.eval()``) with its ATen ops lowered (see ``lower_aten``).
    When ``example`` is given, the lowered module must reproduce the program's output on it,
    otherwise the unlowered module is returned."""
    unlifted = program.module()
    plain = torch.fx.GraphModule(unlifted, unlifted.graph)
    lowered = lower_aten(torch.fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph)))
    if example is None:
        return lowered
    with torch.no_grad():
        try:
            same = torch.equal(lowered(example), plain(example))
        except Exception:
            same = False
    return lowered if same else plain


def program_input_shape(program) -> tuple[int, ...] | None:
    """The shape of an exported program's first user input (symbolic sizes become 1)."""
    try:
        for spec in program.graph_signature.input_specs:
            if spec.kind.name == "USER_INPUT":
                node = next(n for n in program.graph.nodes if n.name == spec.arg.name)
                val = node.meta.get("val")
                return tuple(int(s) if isinstance(s, int) else 1 for s in val.shape)
    except Exception:
        return None
    return None


def load_pickled_module(path: str | os.PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """A whole ``nn.Module`` saved with ``torch.save(model)`` (only with ``trust_pickle``)."""
    source = os.fspath(path)
    if not trust_pickle:
        try:
            obj = read_pickle_checkpoint(path, trust_pickle=False)
        except UnsafeInputError:
            raise UnsafeInputError(
                f"{source} is a pickled Python object (a whole model?); unpickling it could run "
                "code from the file. Pass --trust-pickle if the file is trusted") from None
        raise InputError(
            f"{source} holds a {type(obj).__name__} of weights, not a model; pass it as "
            "--weights together with --arch, --factory or --timm")
    try:
        obj = read_pickle_checkpoint(path, trust_pickle=True)
    except (pickle.UnpicklingError, AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise InputError(f"{source}: cannot unpickle the model ({first_line(exc)}); its "
                         "classes must be importable") from None
    if isinstance(obj, torch.jit.ScriptModule):
        raise InputError(f"{source} is a TorchScript module; repfuse needs an nn.Module or an "
                         "ONNX / .pt2 file")
    if not isinstance(obj, nn.Module):
        raise InputError(f"{source} holds a {type(obj).__name__}, not an nn.Module; pass "
                         "weights with --weights and the architecture with --arch/--factory")
    return obj
