"""fuse_onnx on exports of timm's training-form repvgg_a0 (random weights and BN
statistics): the torch.export-based exporter (BN folded into the convs, BN identity
branches left) and the TorchScript exporter without constant folding (Conv ->
BatchNormalization chains, Identity copies of shared statistics)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers.onnx_graphs import ort_run, rel_err, torchscript_export

import repfuse

timm = pytest.importorskip("timm")

N_BLOCKS = 22  # repvgg_a0: stem + 2 + 4 + 14 + 1


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def repvgg():
    torch.manual_seed(0)
    return randomize_bn(timm.create_model("repvgg_a0", pretrained=False))


@pytest.fixture(scope="module")
def exports(repvgg, tmp_path_factory):
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path_factory.mktemp("timm") / "repvgg_a0.onnx"
    report = repfuse.export_onnx(repvgg, x, path)
    assert report.ok and "dynamo" in report.notes[0]
    return {"default": onnx.load(str(path)), "unfolded-13": torchscript_export(repvgg, x, 13)}


@pytest.mark.parametrize("style", ["default", "unfolded-13"])
def test_every_block_becomes_one_conv(repvgg, exports, style):
    original = exports[style]
    before = [n.op_type for n in original.graph.node]
    assert before.count("BatchNormalization") >= N_BLOCKS - 5 and before.count("Add") > 30
    res = repfuse.fuse_onnx(original)
    after = [n.op_type for n in res.model.graph.node]
    assert after.count("Conv") == N_BLOCKS
    assert "BatchNormalization" not in after and "Add" not in after
    assert "Identity" not in after and "Expand" not in after
    assert len(res.report.fused) == N_BLOCKS and not res.report.skipped
    assert res.report.ok and res.report.verified
    assert res.report.ops_after["Conv"] == N_BLOCKS
    assert res.report.params_after < res.report.params_before
    if style == "default":  # regions are named after the torch module holding them
        paths = sorted(r.path.split()[0] for r in res.report.fused)
        assert paths[-3:] == ["stages.2.9", "stages.3.0", "stem"]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        ref = ort_run(original, x)
        assert rel_err(ref, ort_run(res.model, x)) <= 1e-5
        with torch.no_grad():
            assert rel_err(repvgg(torch.from_numpy(x)).numpy(), ort_run(res.model, x)) <= 1e-5


def test_fuse_then_export_equals_export_then_fuse(repvgg, exports, tmp_path):
    """The torch front end and the ONNX front end give the same inference model."""
    x = torch.randn(1, 3, 64, 64)
    fused_torch = repfuse.fuse(repvgg, x).model
    path = tmp_path / "fused.onnx"
    report = repfuse.export_onnx(fused_torch, x, path, opset=17)
    assert report.ok and "TorchScript" in report.notes[0]
    a = onnx.load(str(path))
    b = repfuse.fuse_onnx(exports["default"]).model
    assert [n.op_type for n in a.graph.node].count("Conv") == N_BLOCKS
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert rel_err(ort_run(a, x), ort_run(b, x)) <= 1e-5
