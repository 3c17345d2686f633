"""A folder of images as calibration data: decoded with Pillow, resized to the model's
input size, scaled to [0, 1] and normalized with ``mean`` / ``std`` per channel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repfuse.errors import InputError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _per_channel(values: Sequence[float] | None, channels: int, default: float,
                 name: str) -> np.ndarray:
    if values is None:
        return np.full((channels, 1, 1), default, dtype=np.float32)
    arr = np.asarray(list(values), dtype=np.float32).reshape(-1)
    if arr.size not in (1, channels):
        raise InputError(f"--{name} has {arr.size} values; give 1 or {channels} (one per "
                         "input channel)")
    if name == "std" and not (arr > 0).all():
        raise InputError(f"--std {list(arr)}: every value must be positive")
    return np.broadcast_to(arr.reshape(-1, 1, 1), (channels, 1, 1)).astype(np.float32)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(folder: Path, input_shape: Sequence[int], *, mean=None, std=None,
                limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """``(N, C, H, W)`` float32 from the images in ``folder`` (C = 1: grayscale, 3: RGB)."""
    if len(input_shape) != 4 or input_shape[1] not in (1, 3):
        raise InputError(f"a folder of images can calibrate a model taking N,1,H,W or N,3,H,W "
                         f"inputs, not {','.join(map(str, input_shape))}; save the inputs as a "
                         ".npy array instead")
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading a folder of images needs Pillow; pip install pillow (or "
                         "save the preprocessed inputs as a .npy array)") from None
    files = image_files(folder)
    if not files:
        raise InputError(f"calibration folder {folder} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    notes = []
    if limit is not None and len(files) > limit:
        notes.append(f"used the first {limit} of {len(files)} images (sorted by name)")
        files = files[:limit]
    channels, height, width = (int(d) for d in input_shape[1:])
    m = _per_channel(mean, channels, 0.0, "mean")
    s = _per_channel(std, channels, 1.0, "std")
    if mean is None and std is None:
        notes.append("no --mean/--std: pixels scaled to [0, 1] without normalization")
    out = np.empty((len(files), channels, height, width), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if channels == 3 else "L")
                img = img.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad files
            raise InputError(f"calibration image {path} cannot be read ({type(exc).__name__}: "
                             f"{first_line(exc)}); remove it or replace it") from None
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = (pixels - m) / s
    notes.append(f"{len(files)} image(s) resized to {height}x{width}")
    return out, notes
