"""INT8 weights in a 7-bit range (onnxruntime's reduce_range) where this CPU would saturate
uint8 x int8 products (x86-64 without VNNI), as asked otherwise; the report says which and
why, and the CLI passes --reduce-range / --full-range through."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

pytest.importorskip("onnxruntime")

import repfuse  # noqa: E402
from repfuse.quant import pipeline  # noqa: E402
from repfuse.quant.cpu import cpu_flags, u8s8_saturates  # noqa: E402

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", AVX2, True),
    ("x86_64", AVX2 | {"avx512f", "avx512bw"}, True),
    ("x86_64", AVX2 | {"avx512f", "avx512_vnni"}, False),
    ("AMD64", AVX2 | {"avx_vnni"}, False),
    ("x86_64", frozenset(), False),                 # flags unknown: not claimed
    ("aarch64", frozenset({"asimd", "asimddp"}), False),
    ("arm64", frozenset(), False),
])
def test_which_cpus_saturate(machine, flags, saturates):
    assert u8s8_saturates(machine, flags) is saturates


def test_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n"
                    "\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


@pytest.fixture(scope="module")
def calibration():
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _weight_range(proto: onnx.ModelProto) -> int:
    """The largest magnitude of an int8 weight in a QDQ model."""
    return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
               for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8)


@pytest.mark.parametrize("saturates", [True, False])
def test_auto_follows_the_cpu(calibration, monkeypatch, saturates):
    monkeypatch.setattr(pipeline, "u8s8_saturates", lambda: saturates)
    result = repfuse.quantize(Net().eval(), calibration, keep_float="none", latency_repeat=0)
    report = result.report
    assert report.reduce_range is saturates
    assert report.to_dict()["reduce_range"] is saturates
    # per channel, every channel's largest weight reaches the end of its range
    assert _weight_range(result.model) == (64 if saturates else 127)
    assert ("7-bit range" in report.steps[-1]) is saturates
    assert "without VNNI" in report.steps[-1] if saturates else True
    assert not any("saturates" in n for n in report.notes)


@pytest.mark.parametrize("asked", [True, False])
def test_asked_range_wins_and_a_saturating_full_range_is_noted(calibration, monkeypatch,
                                                                asked):
    monkeypatch.setattr(pipeline, "u8s8_saturates", lambda: True)
    result = repfuse.quantize(Net().eval(), calibration, keep_float="none", latency_repeat=0,
                              reduce_range=asked)
    assert result.report.reduce_range is asked
    assert _weight_range(result.model) == (64 if asked else 127)
    assert any("saturates" in n and "--reduce-range" in n
               for n in result.report.notes) is (not asked)


def test_cli_passes_the_range_through(calibration, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from repfuse.cli.main import cli

    monkeypatch.setattr(pipeline, "u8s8_saturates", lambda: False)
    source = tmp_path / "train.onnx"
    repfuse.export_onnx(Net().eval(), calibration[:1], source)
    np.save(tmp_path / "calib.npy", calibration.numpy())
    for flag, expected in (("--reduce-range", True), ("--full-range", False)):
        out, report = tmp_path / f"int8{flag}.onnx", tmp_path / f"report{flag}.json"
        result = CliRunner().invoke(cli, ["quantize", str(source), "--calib",
                                          str(tmp_path / "calib.npy"), "--keep-float", "none",
                                          "--target-sqnr", "0", flag, "-o", str(out),
                                          "--json", str(report)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(report.read_text())["report"]["reduce_range"] is expected
        assert _weight_range(onnx.load(out)) == (64 if expected else 127)
