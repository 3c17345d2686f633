"""Hostile and broken inputs through the ``repfuse`` command (corpus in hostile_corpus.py).

Every case must end with its exit code (2 for bad input, 1 where a verification fails), one
``Error:`` line naming the problem, no traceback, no output file, input files unchanged, and
no code run from a pickle (marker files never created).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import hostile_corpus  # noqa: E402

from repfuse.cli.main import cli  # noqa: E402


def run(args, cwd: Path | None = None):
    runner = CliRunner()
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_corpus_is_large_enough():
    assert len(hostile_corpus.CASES) >= 30


@pytest.mark.parametrize("name", sorted(hostile_corpus.CASES))
def test_hostile_case(name, tmp_path):
    folder = tmp_path / "case"
    case = hostile_corpus.build(name, folder)
    result = run(case.args, case.cwd)
    text = result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), text
    assert "Traceback" not in text, text
    assert result.exit_code == case.code, text
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0].lower()
    for needle in case.needles:
        assert needle.lower() in line, f"{needle!r} not in {errors[0]!r}"
    assert len(errors[0]) < 480, errors[0]
    if case.output is not None:
        assert not case.output.exists(), f"{case.output} was written"
    for path, data in case.unchanged.items():
        assert path.read_bytes() == data, f"{path} changed"
    if case.marker is not None:
        assert not case.marker.exists(), "a pickle ran code"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["evil_checkpoint", "evil_model_file"])
def test_evil_pickles_really_run_code_when_trusted(name, tmp_path):
    """The corpus's hostile pickles are real: unpickling them does create the marker."""
    case = hostile_corpus.build(name, tmp_path)
    path = next(p for p in case.unchanged)
    torch.load(path, weights_only=False)
    assert case.marker.exists()


def test_trusted_model_pickle_converts(tmp_path):
    """A whole pickled model is fine once the user says the file is trusted."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.normal_()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    out = tmp_path / "fused.pt"
    result = run(["convert", path, "--trust-pickle", "-o", out, "--input-shape",
                  hostile_corpus.SHAPE])
    assert result.exit_code == 0, result.output + result.stderr
    assert out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_convert(dtype, tmp_path):
    """float16 / bfloat16 checkpoints load into the float32 model (said in a note) and the
    fused model matches the training form built from the same rounded weights."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v)
          for k, v in hostile_corpus.tiny_state_dict(tmp_path).items()}
    ckpt = tmp_path / "half.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "fused.safetensors"
    result = run(["convert", "--factory", hostile_corpus.factory(tmp_path), "--weights", ckpt,
                  "-o", out, "--input-shape", hostile_corpus.SHAPE])
    assert result.exit_code == 0, result.output + result.stderr
    assert str(dtype).replace("torch.", "") in result.stderr
    from safetensors.torch import load_file

    fused = load_file(out)
    assert all(t.dtype == torch.float32 for t in fused.values())
    assert not any("bn" in k or "running" in k for k in fused)


def test_zero_running_var_converts_exactly(tmp_path):
    """A zero running variance (a dead channel) is legitimate: converted, with a note, and the
    written program matches the training form."""
    model = hostile_corpus.tiny_module(tmp_path)
    with torch.no_grad():
        model.block.one[1].running_var[2] = 0.0
    ckpt = tmp_path / "zero_var.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "fused.pt2"
    result = run(["convert", "--factory", hostile_corpus.factory(tmp_path), "--weights", ckpt,
                  "-o", out, "--input-shape", hostile_corpus.SHAPE])
    assert result.exit_code == 0, result.output + result.stderr
    assert "running_var is 0 in 1 of 8" in " ".join(result.stderr.split())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected, got = model(x), torch.export.load(str(out)).module()(x)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()) + 1e-6
