"""``repfuse quantize`` and ``repfuse inspect --int8`` through click's CliRunner, on the
digits classifier with the planted dead-channel outlier."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")

import helpers.digits as dn  # noqa: E402

import repfuse  # noqa: E402
from repfuse.cli.main import cli  # noqa: E402

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers",
                      "digits.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The planted model as a training-form ONNX file and as a state dict, calibration."""
    folder = tmp_path_factory.mktemp("int8_cli")
    data = dn.load()
    planted, branch, channel = dn.plant_dead_channel(dn.trained(), data)
    repfuse.export_onnx(planted, torch.from_numpy(data.train_x[:1]), folder / "train.onnx")
    torch.save(planted.state_dict(), folder / "train.pt")
    np.save(folder / "calib.npy", data.train_x[:128])
    return folder, branch, channel


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False,
                                env={"COLUMNS": "120"})
    return result.exit_code, result.output


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_quantize_writes_a_checked_qdq_model_and_names_the_cause(files, tmp_path):
    folder, branch, channel = files
    out, report = tmp_path / "int8.onnx", tmp_path / "report.json"
    code, text = invoke("quantize", folder / "train.onnx", "--calib", folder / "calib.npy",
                        "--per-tensor", "-o", out, "--json", report)
    assert code == 0, text
    assert f"wrote {out}" in text and "kept in float:" in text
    assert branch in text and "400" in text
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    data = json.loads(report.read_text())
    assert data["written"] and data["report"]["ok"]
    assert "blocks.1" in data["report"]["kept_float"]
    assert [(o["branch"], o["channel"]) for o in data["report"]["outliers"]] == [
        (branch, channel)]


def test_below_target_writes_nothing_and_exits_1(files, tmp_path):
    folder, *_ = files
    out, report = tmp_path / "int8.onnx", tmp_path / "report.json"
    code, text = invoke("quantize", folder / "train.onnx", "--calib", folder / "calib.npy",
                        "--per-tensor", "--keep-float", "none", "-o", out, "--json", report)
    assert code == 1
    assert "below target" in text and "nothing written" in text
    assert not out.exists()
    assert json.loads(report.read_text())["written"] is False
    code, text = invoke("quantize", folder / "train.onnx", "--calib", folder / "calib.npy",
                        "--per-tensor", "--keep-float", "blocks.1,blocks.0", "-o", out)
    assert code == 0 and out.exists()


def test_a_torch_model_from_a_factory(files, tmp_path):
    folder, branch, channel = files
    out = tmp_path / "int8.onnx"
    code, text = invoke("quantize", "--factory", f"{HELPER}:DigitsNet",
                        "--weights", folder / "train.pt", "--calib", folder / "calib.npy",
                        "-o", out)
    assert code == 0, text
    assert "blocks.1.reparam_conv" in text and branch in text
    assert "fused and proved: 4 region(s)" in text


@pytest.mark.parametrize("case", ["no calib", "shape", "nan", "empty folder", "quantized",
                                  "suffix", "input as output", "exists", "mean for an array"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(files, tmp_path, case):
    folder, *_ = files
    model, calib = folder / "train.onnx", folder / "calib.npy"
    out = tmp_path / "int8.onnx"
    args = [model, "--calib", calib, "-o", out]
    if case == "no calib":
        args, words = [model, "-o", out], "--calib is required"
    elif case == "shape":
        np.save(tmp_path / "c.npy", np.zeros((4, 3, 8, 8), np.float32))
        args[2], words = tmp_path / "c.npy", "takes N,1,8,8"
    elif case == "nan":
        bad = np.load(calib)
        bad[3, 0, 2, 2] = np.nan
        np.save(tmp_path / "c.npy", bad)
        args[2], words = tmp_path / "c.npy", "NaN/Inf"
    elif case == "empty folder":
        (tmp_path / "images").mkdir()
        args[2], words = tmp_path / "images", "holds no images"
    elif case == "quantized":
        first = tmp_path / "first.onnx"
        assert invoke("quantize", model, "--calib", calib, "-o", first)[0] == 0
        args[0], words = first, "already quantized"
    elif case == "suffix":
        args[-1], out, words = tmp_path / "int8.pt", tmp_path / "int8.pt", "use one of .onnx"
    elif case == "mean for an array":
        args, words = [*args, "--mean", "0.5"], "--mean/--std normalize a folder of images"
    elif case == "input as output":
        args[-1], out, words = model, model, "never overwrites its input"
    else:
        out.write_bytes(b"keep me")
        words = "already exists"
    before = listing(tmp_path)
    code, text = invoke("quantize", *args, "-q")
    assert code == 2, text
    assert words in text and len(text.strip().splitlines()) == 1, text
    assert listing(tmp_path) == before
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    assert onnx.load(model).graph.node     # the input is untouched


def test_inspect_int8_prints_the_doctor_and_writes_nothing(files):
    folder, branch, channel = files
    before = listing(folder)
    code, text = invoke("inspect", folder / "train.onnx", "--int8", "--calib",
                        folder / "calib.npy", "--per-tensor")
    assert code == 0, text
    assert "INT8 doctor" in text and branch in text and "output SQNR" in text
    assert listing(folder) == before
    code, text = invoke("inspect", folder / "train.onnx", "--int8")
    assert code == 2 and "--calib is required" in text
    code, text = invoke("inspect", folder / "train.onnx", "--calib", folder / "calib.npy")
    assert code == 2 and "--int8" in text


def test_a_folder_of_images_calibrates_with_mean_and_std(files, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    folder, branch, _ = files
    images = tmp_path / "images"
    images.mkdir()
    for i, digit in enumerate(dn.load().train_x[:64, 0] * dn.STD + dn.MEAN):
        pixels = np.clip(np.rint(digit * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i:03d}.png")
    code, text = invoke("inspect", folder / "train.onnx", "--int8", "--calib", images,
                        "--mean", str(dn.MEAN), "--std", str(dn.STD))
    assert code == 0, text
    assert "64 image(s) resized to 8x8" in text and branch in text
