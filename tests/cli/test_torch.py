"""The ``repfuse`` command on PyTorch models (--arch, --factory, --timm, pickles, .pt2), the
``make demo`` command end to end, and the installed console script as a subprocess.

Written models are checked against the training form independently of repfuse's checks:
the ONNX file with onnxruntime, the .pt2 program in torch, state dicts by loading them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import hostile_corpus  # noqa: E402
from torch import nn

import repfuse  # noqa: E402
from repfuse import models  # noqa: E402
from repfuse.cli.main import cli  # noqa: E402

SHAPE = hostile_corpus.SHAPE
X_SHAPE = tuple(int(s) for s in SHAPE.split(","))


def run(*args, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def ok(result):
    assert result.exit_code == 0, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    return result


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((a.double() - b.double()).abs().max())
    assert err <= rel * float(b.double().abs().max()) + 1e-6, err


@pytest.fixture
def trained(tmp_path):
    """The corpus's tiny two-region net with non-trivial BN statistics, saved as a nested,
    DataParallel-prefixed checkpoint; returns (model, checkpoint path, factory spec)."""
    model = hostile_corpus.tiny_module(tmp_path)
    ckpt = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                            model.state_dict().items()}}, ckpt)
    return model, ckpt, hostile_corpus.factory(tmp_path)


def test_demo_command_end_to_end(tmp_path):
    """What ``make demo`` runs (smaller input), then ``repfuse verify`` on its output."""
    result = ok(run("convert", "--arch", "repvgg_a0", "-o", "build/repvgg_a0.onnx", "--force",
                    "--input-shape", "1,3,32,32", cwd=tmp_path))
    assert "seeded random weights" in result.stderr
    assert "22 region(s) fused" in result.output
    assert re.search(r"verified: outputs max rel err \S+ \(max abs \S+\); input gradients "
                     r"max rel err", " ".join(result.output.split()))
    out = tmp_path / "build" / "repvgg_a0.onnx"
    import onnx
    import onnxruntime as ort

    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 22 and "BatchNormalization" not in ops and "Add" not in ops
    reference = models.create("repvgg_a0", seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        close(got, reference(x), rel=1e-4)
    result = ok(run("verify", "arch:repvgg_a0", out, "--input-shape", "1,3,32,32",
                    cwd=tmp_path))
    assert "equivalent" in result.output


@pytest.mark.parametrize("suffix", [".pt2", ".safetensors", ".pt"])
def test_convert_factory_with_checkpoint(trained, tmp_path, suffix):
    model, ckpt, spec = trained
    out = tmp_path / f"deploy{suffix}"
    result = ok(run("convert", "--factory", spec, "--weights", ckpt, "-o", out,
                    "--input-shape", SHAPE, "--json", tmp_path / "r.json"))
    assert "['state_dict']" in result.stderr and "seeded random" not in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["written"] and [r["status"] for r in report["report"]["regions"]] == \
        ["fused", "fused"]
    x = torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        if suffix == ".pt2":
            fused = torch.export.load(str(out)).module()
        else:
            from repfuse.io.checkpoint import read_checkpoint as load_checkpoint

            fused = repfuse.fuse(model, x, verify=False).model
            written = load_checkpoint(out)
            assert not any("running" in k for k in written)
            fused.load_state_dict(written, strict=True)
        close(fused(x), expected)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)] if suffix != ".pt2" else []
    assert suffix == ".pt2" or len(convs) == 2


def test_convert_pt2_and_pickle_inputs(trained, tmp_path):
    model, _, _ = trained
    x = torch.randn(X_SHAPE)
    program = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(program))
    result = ok(run("convert", program, "--trust-pickle", "-o", tmp_path / "a.pt2"))
    assert "torch.export" in result.output and "2 region(s) fused" in result.output
    fused = torch.export.load(str(tmp_path / "a.pt2")).module()
    with torch.no_grad():
        close(fused(x), model(x))
    whole = tmp_path / "whole.pt"
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        seq[1].running_var.uniform_(0.5, 2.0)
        seq[1].running_mean.normal_()
    torch.save(seq, whole)
    ok(run("convert", whole, "--trust-pickle", "-o", tmp_path / "b.pt2", "--input-shape",
           SHAPE))
    with torch.no_grad():
        close(torch.export.load(str(tmp_path / "b.pt2")).module()(x), seq(x))


def test_inspect_counts(trained, tmp_path):
    model, ckpt, spec = trained
    result = ok(run("inspect", "--factory", spec, "--weights", ckpt, "--input-shape", SHAPE,
                    "--json", tmp_path / "i.json"))
    assert "block" in result.output and "conv3x3+bn + conv1x1+bn + bn" in result.output
    data = json.loads((tmp_path / "i.json").read_text())
    # MACs by hand at 16x16: stem 8*3*9*256, dense 8*8*9*256, 1x1 8*8*256, head 8*10.
    assert data["figures"]["macs"] == {"before": 55296 + 147456 + 16384 + 80,
                                       "after": 55296 + 147456 + 80}
    params = sum(p.numel() for p in model.parameters())
    assert data["figures"]["parameters"]["before"] == params
    # fused: stem conv 8*3*9 + 8, block conv 8*8*9 + 8, head 8*10 + 10
    assert data["figures"]["parameters"]["after"] == 224 + 584 + 90
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["i.json", "tinynet.py", "train.pth"] + [p.name for p in tmp_path.iterdir()
                                                 if p.name == "__pycache__"])


def test_regions_left_alone_are_explained(tmp_path):
    spec = hostile_corpus.factory(tmp_path, "build_shared")
    result = ok(run("inspect", "--factory", spec, "--input-shape", SHAPE, "--json",
                    tmp_path / "i.json"))
    assert "not fused as a whole" in result.output and "left alone" in result.output
    assert "used 2 times" in result.output
    regions = json.loads((tmp_path / "i.json").read_text())["report"]["regions"]
    assert regions and all(r["status"] != "fused" and r["reason"] for r in regions)
    out = tmp_path / "same.pt2"
    result = ok(run("convert", "--factory", spec, "--input-shape", SHAPE, "-o", out))
    assert "0 region(s) fused, 1 left alone" in result.output and out.exists()


def test_factory_as_module_name(tmp_path, monkeypatch):
    (tmp_path / "pkg_tinynet.py").write_text(hostile_corpus.TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = ok(run("inspect", "--factory", "pkg_tinynet:build", "--input-shape", SHAPE))
    assert "2 region(s) would be fused" in result.output
    result = run("inspect", "--factory", "pkg_tinynet:nope", "--input-shape", SHAPE)
    assert result.exit_code == 2 and "no attribute 'nope'" in result.stderr
    result = run("inspect", "--factory", "no_such_pkg_xyz:build")
    assert result.exit_code == 2 and "no module named 'no_such_pkg_xyz'" in result.stderr


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    result = run("inspect", "--timm", "repvgg_a0")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "timm, which is not installed; pip install 'repfuse[timm]'" in result.stderr


def test_inspect_timm(tmp_path):
    pytest.importorskip("timm")
    result = ok(run("inspect", "--timm", "repvgg_a0", "--input-shape", "1,3,32,32"))
    assert "22 region(s) would be fused" in result.output


def test_bench_factory(trained, tmp_path):
    _, ckpt, spec = trained
    result = ok(run("bench", "--factory", spec, "--weights", ckpt, "--input-shape", SHAPE,
                    "--repeat", "2", "--warmup", "0", "--threads", "1", "--no-onnx",
                    "--json", tmp_path / "b.json"))
    assert "channels_last" in result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torch eager, NCHW", "torch eager, channels_last"]
    assert all(r["training_ms"] > 0 and r["fused_ms"] > 0 for r in rows)


def _console_script() -> str:
    candidate = Path(sys.executable).parent / "repfuse"
    found = str(candidate) if candidate.exists() else shutil.which("repfuse")
    assert found, "the repfuse console script is not installed"
    return found


def test_installed_console_script(trained, tmp_path):
    model, ckpt, spec = trained
    script = _console_script()
    env = {**os.environ, "COLUMNS": "120"}
    out = tmp_path / "deploy.pt2"
    done = subprocess.run([script, "convert", "--factory", spec, "--weights", str(ckpt), "-o",
                           str(out), "--input-shape", SHAPE], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrote" in done.stdout and out.exists()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        close(torch.export.load(str(out)).module()(x), model(x))
    bad = subprocess.run([script, "convert", "--factory", spec, "--weights", str(ckpt), "-o",
                          str(ckpt), "--force"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("Error:")
    assert "input file" in bad.stderr
    assert bool(torch.isfinite(torch.load(ckpt, weights_only=True)["state_dict"][
        "module.head.weight"]).all())


def test_factory_without_weights_is_the_same_model_every_run(tmp_path):
    """Without --weights the initial weights come from the seed, not from torch's global
    generator: two commands (here .pt2 and .onnx outputs) convert the same model, so
    `repfuse verify` finds them equal; the global generator is left as it was."""
    spec = hostile_corpus.factory(tmp_path)
    torch.manual_seed(123)
    ok(run("convert", "--factory", spec, "--input-shape", SHAPE, "-o", tmp_path / "a.pt2"))
    torch.randn(5)      # the global generator moves on between the two commands
    ok(run("convert", "--factory", spec, "--input-shape", SHAPE, "-o", tmp_path / "b.onnx"))
    result = run("verify", tmp_path / "a.pt2", tmp_path / "b.onnx", "--trust-pickle",
                 "--input-shape", SHAPE)
    assert result.exit_code == 0, result.output + result.stderr
    before = torch.random.get_rng_state()
    ok(run("convert", "--factory", spec, "--input-shape", SHAPE, "-o", tmp_path / "c.pt"))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.randn(7)
    ok(run("convert", "--factory", spec, "--input-shape", SHAPE, "-o", tmp_path / "d.pt"))
    c, d = (torch.load(tmp_path / n, weights_only=True) for n in ("c.pt", "d.pt"))
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)


def test_fused_state_dict_loads_into_the_fused_structure(tmp_path):
    """README's recipe: a .safetensors output loads (strict) into fuse(...).model of any
    training-form instance and computes the converted model."""
    from safetensors.torch import load_file

    import repfuse
    from repfuse import models

    out = tmp_path / "a0.safetensors"
    ok(run("convert", "--arch", "repvgg_a0", "--input-shape", "1,3,32,32", "-o", out))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    deploy = repfuse.fuse(models.create("repvgg_a0", seed=7), x, verify=False).model
    deploy.load_state_dict(load_file(out), strict=True)
    reference = models.create("repvgg_a0", seed=0)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), reference(x), rtol=1e-4, atol=1e-4)


def test_bfloat16_model_without_weights(tmp_path):
    """A bfloat16 model from --factory: seeded BN calibration runs in the model's dtype, the
    conversion passes verification on rounding (judged against float64), and an .onnx
    output, which onnxruntime cannot run in bfloat16, is refused with the reason."""
    (tmp_path / "halfnet.py").write_text(
        "import torch\nfrom repfuse.models import create\n\n"
        "def build():\n    return create('repvgg_a0', seed=0).to(torch.bfloat16)\n")
    spec = f"{tmp_path / 'halfnet.py'}:build"
    result = ok(run("convert", "--factory", spec, "--input-shape", "1,3,32,32", "-o",
                    tmp_path / "h.safetensors"))
    assert "22 region(s) fused" in result.output
    from safetensors.torch import load_file
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "h.safetensors").values())
    result = run("convert", "--factory", spec, "--input-shape", "1,3,32,32", "-o",
                 tmp_path / "h.onnx")
    assert result.exit_code == 2, result.output + result.stderr
    assert "onnxruntime cannot run the exported model" in result.stderr
    assert "bfloat16" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "h.onnx").exists()
