"""Writers for each output format of a fused model (pass them to ``atomic_write``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from repfuse.errors import InputError

OUTPUT_FORMATS = {
    ".onnx": "ONNX model",
    ".pt2": "torch.export program",
    ".safetensors": "state dict (safetensors)",
    ".pt": "state dict (torch.save)",
    ".pth": "state dict (torch.save)",
}


def output_format(path: str | os.PathLike, allowed: Iterable[str] | None = None) -> str:
    """The output format picked by ``path``'s suffix (``".onnx"``, ``".pt2"``, ...)."""
    suffix = Path(path).suffix.lower()
    allowed = list(allowed) if allowed is not None else list(OUTPUT_FORMATS)
    if suffix not in allowed:
        raise InputError(
            f"output {os.fspath(path)!r}: unknown format {suffix or '(no suffix)'}; "
            f"use one of {', '.join(allowed)}")
    return suffix


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as independent, contiguous CPU tensors (no shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def write_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict to ``path`` (not atomic: pass this to ``atomic_write``)."""
    path = Path(path)
    fmt = path.name.rsplit(".", 1)[-1].lower()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, os.fspath(path), metadata={"format": "pt", "producer": "repfuse"})
    else:
        torch.save(state_dict, path)


def export_program(module: torch.nn.Module, example_inputs: tuple, *,
                   dynamic_batch: bool = True):
    """``torch.export`` the module; with ``dynamic_batch`` the first dimension of every input
    is symbolic (traced on a batch of at least 2: torch specialises sizes 0 and 1)."""
    if dynamic_batch:
        args = tuple(a.repeat(2, *([1] * (a.dim() - 1))) if isinstance(a, torch.Tensor)
                     and a.dim() > 0 and a.shape[0] == 1 else a for a in example_inputs)
        dims = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0
                     else None for a in args)
        try:
            return torch.export.export(module, args, dynamic_shapes=dims)
        except Exception:
            pass
    return torch.export.export(module, tuple(example_inputs))


def write_exported_program(module: torch.nn.Module, example_inputs: tuple,
                           path: str | os.PathLike, *, dynamic_batch: bool = True) -> None:
    """``torch.export`` the module on ``example_inputs`` and save the program to ``path``."""
    program = export_program(module, example_inputs, dynamic_batch=dynamic_batch)
    torch.export.save(program, os.fspath(path))


def write_onnx_proto(model, path: str | os.PathLike) -> None:
    """Save an ``onnx.ModelProto`` to ``path`` as one self-contained file."""
    import onnx

    onnx.save_model(model, os.fspath(path))
