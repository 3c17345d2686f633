"""The ``repfuse`` command through click's CliRunner: every command, option family and error path.

Fused outputs are checked independently of repfuse's own checks: with onnxruntime (ONNX) or by
running the written model against the training form in torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import hostile_corpus  # noqa: E402

import repfuse  # noqa: E402
from repfuse.cli.main import cli  # noqa: E402
from repfuse.errors import VerificationError  # noqa: E402
from repfuse.report import Check  # noqa: E402

SHAPE = hostile_corpus.SHAPE


def run(*args, cwd: Path | None = None, **kwargs):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args], **kwargs)
    finally:
        os.chdir(old)


def ok(result):
    assert result.exit_code == 0, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    return result


def one_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def ort_run(path_or_proto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) \
        else Path(path_or_proto).read_bytes()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.fixture
def train_onnx(tmp_path) -> Path:
    """A training-form ONNX block: Conv(x) + BatchNormalization(x) (identity branch)."""
    torch.manual_seed(0)
    model = hostile_corpus.onnx_conv_model()
    for init in model.graph.initializer:
        if init.name in ("m", "b"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.linspace(-1, 1, 3, dtype=np.float32),
                                                       init.name))
        if init.name == "v":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([0.5, 1.5, 2.0], np.float32),
                                                       "v"))
    return hostile_corpus.onnx_file(tmp_path, "train.onnx", model)


# ----------------------------------------------------------------------------- help, version
def test_group_help_and_version():
    result = ok(run("--help"))
    for word in ("convert", "inspect", "verify", "bench", "Exit codes"):
        assert word in result.output
    assert ok(run("--version")).output.strip() == f"repfuse, version {repfuse.__version__}"


@pytest.mark.parametrize("command,words", [
    ("convert", ["--arch", "--factory", "--timm", "--weights", "--input-shape", "--output",
                 "--force", "--no-verify", "--tol", "--json", "--trust-pickle", "--quiet",
                 "--debug", ".safetensors", ".pt2", "atomically"]),
    ("inspect", ["--arch", "--factory", "--timm", "--weights", "--json", "MACs",
                 "Writes nothing"]),
    ("verify", ["REFERENCE", "CANDIDATE", "arch:NAME", "--reference-weights",
                "--candidate-weights", "--tol", "--no-grads", "exit 1"]),
    ("bench", ["--repeat", "--threads", "--plot", "channels_last", "ONNX Runtime",
               "matplotlib"]),
])
def test_subcommand_help(command, words):
    text = " ".join(ok(run(command, "--help")).output.split())
    for word in words:
        assert word in text, word


def test_unknown_command_and_option():
    one_error(run("fuse"), 2, "no such command")
    one_error(run("convert", "--bogus"), 2, "--bogus")
    one_error(run("convert", "--arch", "repvgg_a0"), 2, "-o")


# ----------------------------------------------------------------------------- ONNX convert
def test_convert_onnx(train_onnx, tmp_path):
    out, report = tmp_path / "deploy" / "fused.onnx", tmp_path / "report.json"
    result = ok(run("convert", train_onnx, "-o", out, "--json", report))
    assert "wrote" in result.output and "verified" in result.output
    assert "BatchNormalization" not in op_types(out) and op_types(out).count("Conv") == 1
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(train_onnx, x)[0],
                               rtol=1e-5, atol=1e-5)
    data = json.loads(report.read_text())
    assert data["written"] is True and data["report"]["ok"] is True
    assert data["report"]["regions"][0]["status"] == "fused"
    assert data["figures"]["parameters"]["after"] < data["figures"]["parameters"]["before"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_convert_quiet_and_force(train_onnx, tmp_path):
    out = tmp_path / "fused.onnx"
    out.write_bytes(b"old")
    one_error(run("convert", train_onnx, "-o", out), 2, "already exists", "--force")
    assert out.read_bytes() == b"old"
    result = ok(run("convert", train_onnx, "-o", out, "--force", "--quiet"))
    assert result.output == "" and result.stderr == ""
    assert onnx.load(str(out)).graph.node


def test_convert_no_verify(train_onnx, tmp_path, monkeypatch):
    seen = {}
    real = repfuse.fuse_onnx

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(repfuse, "fuse_onnx", spy)
    result = ok(run("convert", train_onnx, "-o", tmp_path / "f.onnx", "--no-verify"))
    assert seen["verify"] is False and "not verified" in result.output


def test_convert_tol_passed(train_onnx, tmp_path, monkeypatch):
    seen = {}
    real = repfuse.fuse_onnx

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(repfuse, "fuse_onnx", spy)
    ok(run("convert", train_onnx, "-o", tmp_path / "f.onnx", "--tol", "1e-4,1e-3"))
    assert seen["tol"] == (1e-4, 1e-3)
    one_error(run("convert", train_onnx, "-o", tmp_path / "g.onnx", "--tol", "-1"), 2, "--tol")


def test_failed_verification_writes_nothing(train_onnx, tmp_path, monkeypatch):
    real = repfuse.fuse_onnx

    def planted(model, **kwargs):
        result = real(model, **kwargs)
        result.report.model_checks.checks.append(
            Check("output", 0.5, 0.1, 1e-5, 1e-4, False, "planted"))
        return result

    monkeypatch.setattr(repfuse, "fuse_onnx", planted)
    out, report = tmp_path / "f.onnx", tmp_path / "r.json"
    one_error(run("convert", train_onnx, "-o", out, "--json", report), 1,
              "verification failed", "max abs 0.5", "nothing written")
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["written"] is False and data["report"]["ok"] is False


def test_verification_error_is_exit_1(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise VerificationError("outputs differ: max abs 3e-2 > 1e-5")

    monkeypatch.setattr(repfuse, "fuse_onnx", boom)
    path = hostile_corpus.onnx_file(tmp_path, "m.onnx", hostile_corpus.onnx_conv_model())
    one_error(run("convert", path, "-o", tmp_path / "f.onnx"), 1, "verification failed",
              "3e-2")
    assert not (tmp_path / "f.onnx").exists()


def test_unexpected_error_one_line_and_debug(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(repfuse, "fuse_onnx", boom)
    path = hostile_corpus.onnx_file(tmp_path, "m.onnx", hostile_corpus.onnx_conv_model())
    one_error(run("convert", path, "-o", tmp_path / "f.onnx"), 1, "RuntimeError while fusing",
              "kaboom second line", "--debug")
    for args in (["convert", path, "-o", tmp_path / "f.onnx", "--debug"],
                 ["--debug", "convert", path, "-o", tmp_path / "f.onnx"]):
        result = run(*args)     # the traceback, then the same error and exit code
        assert result.exit_code == 1, result.output + result.stderr
        assert "Traceback" in result.stderr and "kaboom" in result.stderr
        assert "RuntimeError while fusing" in result.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_onnx_that_onnxruntime_refuses(tmp_path):
    import onnxruntime as ort

    # The ONNX checker accepts ops of a domain it does not know; onnxruntime has no kernel.
    model = hostile_corpus.onnx_conv_model()
    model.graph.node[-1].output[0] = "a"
    model.graph.node.append(onnx.helper.make_node("Mystery", ["a"], ["y"], domain="org.example",
                                                  name="mystery"))
    model.opset_import.append(onnx.helper.make_opsetid("org.example", 1))
    onnx.checker.check_model(model)
    with pytest.raises(Exception, match="Mystery"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    path = hostile_corpus.onnx_file(tmp_path, "custom_op.onnx", model)
    one_error(run("convert", path, "-o", tmp_path / "o.onnx"), 2, "onnxruntime cannot load it",
              "mystery")
    assert not (tmp_path / "o.onnx").exists()


def test_debug_shows_input_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    one_error(run("convert", bad, "-o", tmp_path / "o.onnx"), 2, "not a valid onnx")
    result = run("convert", bad, "-o", tmp_path / "o.onnx", "--debug")
    assert result.exit_code == 2, result.output + result.stderr
    assert "Traceback" in result.stderr and "InputError" in result.stderr


# ----------------------------------------------------------------------------- inspect
def test_inspect_onnx_writes_nothing(train_onnx, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    result = ok(run("inspect", train_onnx))
    assert "conv3x3" in result.output and "BatchNormalization" in result.output
    assert "1 region(s) would be fused" in result.output
    assert sorted(tmp_path.rglob("*")) == before
    ok(run("inspect", train_onnx, "--json", tmp_path / "i.json"))
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["command"] == "inspect" and data["report"]["regions"]
    assert sorted(tmp_path.rglob("*")) == sorted(before + [tmp_path / "i.json"])


# ----------------------------------------------------------------------------- verify
def test_verify_onnx_pair(train_onnx, tmp_path):
    fused = tmp_path / "fused.onnx"
    ok(run("convert", train_onnx, "-o", fused))
    result = ok(run("verify", train_onnx, fused, "--json", tmp_path / "v.json"))
    assert "equivalent" in result.output
    assert json.loads((tmp_path / "v.json").read_text())["report"]["ok"] is True


def test_verify_catches_a_planted_fault(train_onnx, tmp_path):
    fused = tmp_path / "fused.onnx"
    ok(run("convert", train_onnx, "-o", fused))
    model = onnx.load(str(fused))
    for init in model.graph.initializer:
        if len(init.dims) == 4:
            w = onnx.numpy_helper.to_array(init).copy()
            w.flat[0] *= 1.001
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bad = hostile_corpus.onnx_file(tmp_path, "bad.onnx", model)
    one_error(run("verify", train_onnx, bad), 1, "differs", "max abs")


def test_verify_bad_specs(tmp_path, train_onnx):
    one_error(run("verify", "nope.onnx", train_onnx), 2, "neither a file nor arch:")
    one_error(run("verify", "arch:repvgg_zz", train_onnx), 2, "unknown architecture")
    one_error(run("verify", train_onnx), 2, "CANDIDATE")


def test_verify_torch_models_with_weights(tmp_path):
    a = hostile_corpus.save(tmp_path, "a.pth", hostile_corpus.tiny_state_dict(tmp_path))
    spec = f"factory:{hostile_corpus.factory(tmp_path)}"
    result = ok(run("verify", spec, spec, "--reference-weights", a, "--candidate-weights", a,
                    "--input-shape", SHAPE))
    assert "grad input" in result.output and "equivalent" in result.output
    result = ok(run("verify", spec, spec, "--reference-weights", a, "--candidate-weights", a,
                    "--input-shape", SHAPE, "--no-grads"))
    assert "grad input" not in result.output


# ----------------------------------------------------------------------------- bench
def test_bench_onnx(train_onnx, tmp_path):
    pytest.importorskip("onnxruntime")
    result = ok(run("bench", train_onnx, "--repeat", "2", "--warmup", "0", "--threads", "1",
                    "--json", tmp_path / "b.json"))
    assert "ONNX Runtime" in result.output and "speedup" in result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["training_ms"] > 0 and rows[0]["fused_ms"] > 0
    one_error(run("bench", train_onnx, "--no-onnx"), 2, "nothing to measure")


def test_bench_plot(train_onnx, tmp_path):
    png = tmp_path / "b.png"
    result = run("bench", train_onnx, "--repeat", "1", "--warmup", "0", "--plot", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        one_error(result, 2, "matplotlib", "repfuse[plot]")
        assert not png.exists()
        return
    ok(result)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_refuses_non_png(train_onnx, tmp_path):
    pytest.importorskip("matplotlib")
    one_error(run("bench", train_onnx, "--plot", tmp_path / "b.jpg"), 2, ".png")


def test_paired_latency_alternates():
    from repfuse.cli.measure import paired_latency_ms

    calls = []
    a, b = paired_latency_ms(lambda x: calls.append(("a", x)), 1, lambda x: calls.append(("b", x)),
                             2, repeat=3, warmup=1)
    assert [c[0] for c in calls] == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert a >= 0 and b >= 0
