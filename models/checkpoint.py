"""Loading training checkpoints into the reference architectures, strictly."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from repfuse.errors import InputError

SHOWN = 3  # keys listed per kind of mismatch


def unwrap_state_dict(obj) -> dict[str, Tensor]:
    """The tensor mapping inside a checkpoint: ``obj`` itself, or its ``"state_dict"`` /
    ``"model"`` entry; a ``"module."`` prefix (data-parallel training) is removed."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise InputError(f"checkpoint is a {type(obj).__name__}, not a state dict "
                         "(a mapping from parameter names to tensors)")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise InputError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _read(path: str | os.PathLike) -> dict[str, Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path!r} as tensors only "
                         f"({type(exc).__name__}); save it as a plain state dict") from None


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]
             ) -> tuple[list[str], list[str], list[tuple[str, str, str]]]:
    """(missing keys, unexpected keys, [(key, checkpoint shape, model shape)])."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, _shape(v), _shape(expected[k])) for k, v in state_dict.items()
              if k in expected and v.shape != expected[k].shape]
    return missing, unexpected, shapes


def describe_mismatch(missing, unexpected, shapes) -> str:
    """One line naming a few keys of each kind of mismatch, with their counts."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (" + ", ".join(missing[:SHOWN])
                     + (", ..." if len(missing) > SHOWN else "") + ")")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (" + ", ".join(unexpected[:SHOWN])
                     + (", ..." if len(unexpected) > SHOWN else "") + ")")
    if shapes:
        parts.append(f"{len(shapes)} mis-shaped (" + ", ".join(
            f"{k}: checkpoint {a} vs model {b}" for k, a, b in shapes[:SHOWN])
            + (", ..." if len(shapes) > SHOWN else "") + ")")
    return "; ".join(parts)


def load_checkpoint(model: nn.Module, checkpoint, *, name: str | None = None) -> nn.Module:
    """Load ``checkpoint`` (a state dict, a dict holding one under ``"state_dict"`` /
    ``"model"``, a module, or a path to a ``.pth`` / ``.safetensors`` file, read with
    ``weights_only=True``) into ``model`` with ``strict=True``; return ``model``.

    Any mismatch raises ``InputError`` that names the missing, unexpected and
    mis-shaped keys (a few of each, with counts) before anything is copied.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _read(checkpoint)
    state_dict = unwrap_state_dict(checkpoint)
    missing, unexpected, shapes = mismatch(model, state_dict)
    if missing or unexpected or shapes:
        what = name or type(model).__name__
        raise InputError(f"checkpoint does not fit {what}: "
                         f"{describe_mismatch(missing, unexpected, shapes)}; "
                         "load it into the architecture it was saved from")
    model.load_state_dict(state_dict, strict=True)
    return model
