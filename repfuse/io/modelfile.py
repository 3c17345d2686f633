"""Model files: ``torch.export`` programs and pickled modules (ONNX files: ``repfuse.onnx.io``).

Nothing here runs code from a file unless the caller passes ``trust_pickle=True``:
``torch.export.load`` and whole-module pickles both unpickle Python objects.
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from repfuse.errors import InputError, UnsafeInputError, first_line
from repfuse.io.checkpoint import read_pickle_checkpoint


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
    """A whole ``nn.Module`` saved with ``torch.save(model)`` or ``pickle.dump`` (only with
    ``trust_pickle``)."""
    source = os.fspath(path)
    if not trust_pickle:
        try:
            obj = read_pickle_checkpoint(path, trust_pickle=False)
        except UnsafeInputError as exc:
            what = f" that imports {', '.join(exc.imports[:3])}" if exc.imports else ""
            raise UnsafeInputError(
                f"{source} is a pickled Python object (a whole model?){what}; unpickling it "
                "could run code from the file. Pass --trust-pickle if the file is trusted",
                imports=exc.imports) from None
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
