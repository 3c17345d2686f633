"""Calibration data: a batch of real model inputs, from a tensor, an array, a ``.npy`` /
``.pt`` file (read with ``torch.load(weights_only=True)``) or a folder of images.

Everything ends as one float32 array ``(N, *input_shape[1:])``, validated: floating
point, the model's input shape, at least one sample, no NaN or Inf. Random data is never
made up here: scales computed from it would be meaningless.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from repfuse.errors import InputError, first_line


@dataclass
class Calibration:
    """``data``: float32 ``(N, C, H, W)`` (any rank the model takes); ``source``: what it
    came from, for messages and the report."""

    data: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": int(self.data.shape[0]),
                "shape": list(self.data.shape[1:]), "notes": list(self.notes)}


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def _from_pt(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files
        raise InputError(f"calibration file {path}: cannot be read with "
                         f"torch.load(weights_only=True) ({first_line(exc)}); save a plain "
                         "tensor") from None


def _unwrap(value: object, source: str) -> np.ndarray:
    """A tensor, an array, a sequence of them (concatenated on the batch axis), or a dict
    holding exactly one of these."""
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, (torch.Tensor, np.ndarray))]
        if len(tensors) != 1:
            raise InputError(f"calibration data {source} is a dict with {len(tensors)} tensors "
                             f"(keys {sorted(map(str, value))[:6]}); save the input batch "
                             "alone as one tensor")
        value = tensors[0]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy() if value.dtype != torch.bfloat16 \
            else value.detach().float().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (torch.Tensor, np.ndarray)) for v in value):
        parts = [_unwrap(v, source) for v in value]
        if len({p.shape[1:] for p in parts}) != 1 or len({p.ndim for p in parts}) != 1:
            raise InputError(f"calibration data {source}: the batches have different shapes "
                             f"({', '.join(_shape_text(p.shape) for p in parts[:4])})")
        return np.concatenate(parts, axis=0)
    raise InputError(f"calibration data {source} is a {type(value).__name__}; give a tensor, "
                     "a numpy array, a .npy or .pt file, or a folder of images")


def _read_path(path: Path, input_shape, mean, std, limit) -> tuple[np.ndarray, list[str]]:
    if path.is_dir():
        from repfuse.quant.images import load_images

        if input_shape is None:
            raise InputError(f"calibration folder {path}: the images need an input shape to be "
                             "resized to; pass example_inputs (CLI: --input-shape)")
        return load_images(path, input_shape, mean=mean, std=std, limit=limit)
    if not path.is_file():
        raise InputError(f"calibration data {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False), []
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"calibration file {path}: not a .npy array without pickled "
                             f"objects ({type(exc).__name__}: {first_line(exc)})") from None
    if suffix in (".pt", ".pth"):
        return _unwrap(_from_pt(path), os.fspath(path)), []
    raise InputError(f"calibration file {path}: unknown kind {suffix or '(no suffix)'}; give a "
                     ".npy or .pt file, or a folder of images")


def check_batch(data: np.ndarray, input_shape, source: str) -> np.ndarray:
    """``data`` as float32, refused (``InputError``) when it is not floating point, has the
    wrong shape, holds no sample or has NaN / Inf values."""
    if data.dtype.kind != "f":
        raise InputError(
            f"calibration data {source} has dtype {data.dtype}; give floating-point inputs "
            "preprocessed exactly as the model expects (for raw images give a folder, "
            "with --mean/--std)")
    if data.ndim == 0 or data.shape[0] == 0:
        raise InputError(f"calibration data {source} is empty; give at least one sample "
                         "(a few hundred real inputs is typical)")
    if input_shape is not None:
        want = tuple(int(d) for d in input_shape)
        if data.ndim != len(want) or tuple(data.shape[1:]) != want[1:]:
            raise InputError(
                f"calibration data {source} has shape {_shape_text(data.shape)}, but the model "
                f"takes N,{_shape_text(want[1:])}; give a batch of inputs of that shape"
                + (" (channels last? transpose to channels first)"
                   if data.ndim == 4 and tuple(data.shape[1:]) == (*want[2:], want[1]) else ""))
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.argwhere(bad.reshape(data.shape[0], -1).any(axis=1))[0, 0])
        raise InputError(f"calibration data {source} has {int(bad.sum())} NaN/Inf value(s) "
                         f"(first in sample {first}); clean the data")
    return np.ascontiguousarray(data, dtype=np.float32)


def load_calibration(calibration, input_shape=None, *, mean=None, std=None,
                     limit: int | None = None) -> Calibration:
    """Calibration data from ``calibration`` (tensor, array, sequence of them, path of a
    ``.npy`` / ``.pt`` file or of a folder of images), checked against ``input_shape``
    (the model's input shape including the batch dimension; None: any shape). ``mean`` /
    ``std`` normalize images only; ``limit`` keeps the first ``limit`` samples."""
    if isinstance(calibration, Calibration):
        data, source, notes = calibration.data, calibration.source, list(calibration.notes)
    elif isinstance(calibration, (str, os.PathLike)):
        source = os.fspath(calibration)
        data, notes = _read_path(Path(calibration), input_shape, mean, std, limit)
    elif calibration is None:
        raise InputError("no calibration data: give a batch of real inputs (a tensor, a .npy "
                         "or .pt file, or a folder of images); random data gives "
                         "meaningless scales")
    else:
        source = f"({type(calibration).__name__})"
        data, notes = _unwrap(calibration, source), []
    data = check_batch(np.asarray(data), input_shape, source)
    if limit is not None and data.shape[0] > limit:
        notes.append(f"used the first {limit} of {data.shape[0]} samples")
        data = data[:limit]
    return Calibration(data, source, notes)
