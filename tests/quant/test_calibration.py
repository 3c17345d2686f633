"""Calibration data for INT8: every accepted source, and every refusal (one clear error)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from repfuse.errors import InputError
from repfuse.quant.calibration import load_calibration

SHAPE = (1, 3, 4, 5)


def batch(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *SHAPE[1:])).astype(np.float32)


def test_tensor_array_sequence_and_files_give_the_same_float32_batch(tmp_path):
    data = batch()
    np.save(tmp_path / "c.npy", data.astype(np.float64))
    torch.save(torch.from_numpy(data), tmp_path / "c.pt")
    torch.save({"images": torch.from_numpy(data)}, tmp_path / "d.pt")
    sources = [torch.from_numpy(data), data.astype(np.float16).astype(np.float32),
               [torch.from_numpy(data[:2]), data[2:]], tmp_path / "c.npy",
               str(tmp_path / "c.pt"), tmp_path / "d.pt"]
    for source in sources:
        calib = load_calibration(source, SHAPE)
        assert calib.data.dtype == np.float32 and calib.data.shape == data.shape
        np.testing.assert_allclose(calib.data, data, atol=2e-3)
    limited = load_calibration(data, SHAPE, limit=4)
    assert limited.data.shape[0] == 4 and "first 4 of 6" in limited.notes[0]


@pytest.mark.parametrize("bad, words", [
    (np.zeros((0, 3, 4, 5), np.float32), "empty"),
    (np.ones((2, 3, 4, 5), np.int64), "dtype int64"),
    (np.ones((2, 3, 5, 4), np.float32), "has shape 2,3,5,4, but the model takes N,3,4,5"),
    (np.ones((2, 4, 5, 3), np.float32), "channels last"),
    (np.ones((3, 4, 5), np.float32), "has shape 3,4,5"),
    ({"a": torch.ones(1), "b": torch.ones(1)}, "dict with 2 tensors"),
    ("not a tensor", "no such file"),
    (None, "no calibration data"),
])
def test_bad_calibration_is_one_clear_error(bad, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        load_calibration(bad, SHAPE)
    assert "\n" not in str(err.value)


def test_nan_and_inf_are_refused_with_the_sample():
    data = batch()
    data[4, 1, 2, 3] = np.inf
    data[5, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"2 NaN/Inf value\(s\) \(first in sample 4\)"):
        load_calibration(data, SHAPE)


def test_files_are_read_without_unpickling(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([object()] * 2), allow_pickle=True)
    with pytest.raises(InputError, match="without pickled objects"):
        load_calibration(tmp_path / "objects.npy", SHAPE)
    torch.save({"x": Fraction(1, 2)}, tmp_path / "custom.pt")
    with pytest.raises(InputError, match=r"weights_only=True"):
        load_calibration(tmp_path / "custom.pt", SHAPE)
    (tmp_path / "c.txt").write_text("1 2 3")
    with pytest.raises(InputError, match="unknown kind .txt"):
        load_calibration(tmp_path / "c.txt", SHAPE)


def test_a_folder_of_images_is_resized_and_normalized(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((4, 5), (9, 7))]
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    calib = load_calibration(tmp_path, SHAPE, mean=mean, std=std)
    assert calib.data.shape == (2, 3, 4, 5)
    expected = (pixels[0].astype(np.float32) / 255 - mean) / std    # same size: no resampling
    np.testing.assert_allclose(calib.data[0], expected.transpose(2, 0, 1), atol=1e-6)
    resized = np.asarray(Image.fromarray(pixels[1]).resize((5, 4), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(calib.data[1], ((resized / 255 - mean) / std).transpose(2, 0, 1),
                               atol=1e-5)
    gray = load_calibration(tmp_path, (1, 1, 4, 5))
    assert gray.data.shape == (2, 1, 4, 5) and 0 <= gray.data.min() and gray.data.max() <= 1
    assert any("scaled to [0, 1]" in n for n in gray.notes)


def test_image_folder_refusals(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(InputError, match="holds no images"):
        load_calibration(tmp_path, SHAPE)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png cannot be read"):
        load_calibration(tmp_path, SHAPE)
    with pytest.raises(InputError, match="--mean has 2 values; give 1 or 3"):
        load_calibration(tmp_path, SHAPE, mean=(0.1, 0.2))
    with pytest.raises(InputError, match="need an input shape"):
        load_calibration(tmp_path, None)
