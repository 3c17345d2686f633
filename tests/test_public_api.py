"""The names ``repfuse`` exports: the four functions, their result and report types,
and the errors; ``import repfuse`` does not import torch (the CLI's --help stays fast)."""

from __future__ import annotations

import subprocess
import sys

import torch

import repfuse
from repfuse.models import create


def test_results_and_reports_are_exported():
    model = create("repvgg_a0").eval()
    result = repfuse.fuse(model, torch.randn(1, 3, 32, 32))
    assert isinstance(result, repfuse.FuseResult)
    assert isinstance(result.report, repfuse.FuseReport)
    assert all(isinstance(r, repfuse.RegionReport) for r in result.report.regions)
    assert isinstance(result.report.model_checks, repfuse.VerifyReport)
    assert all(isinstance(c, repfuse.Check) for c in result.report.model_checks.checks)
    assert issubclass(repfuse.NotFusable, repfuse.ReparamError)
    assert set(repfuse.__all__) <= set(dir(repfuse))
    for name in repfuse.__all__:
        assert getattr(repfuse, name) is not None


def test_import_is_light():
    code = "import sys, repfuse; print('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["False", "False"]
