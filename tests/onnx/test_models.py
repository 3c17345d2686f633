"""fuse_onnx on exports of repfuse.models repvgg_a0 and mobileone_s0 (random weights,
realistic BN statistics) in both exporter styles: the torch.export-based exporter (BN
already folded into the convs) and the TorchScript exporter without constant folding
(Conv -> BatchNormalization chains)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers.onnx_graphs import ort_run, rel_err, torchscript_export

import repfuse
from repfuse import models

# convs of the inference forms (one per block), as in the published deploy models
BLOCKS = {"repvgg_a0": 22, "mobileone_s0": 43}


@pytest.fixture(scope="module", params=["repvgg_a0", "mobileone_s0"])
def arch(request):
    return request.param, models.create(request.param, seed=0).eval()


@pytest.fixture(scope="module")
def exports(arch, tmp_path_factory):
    name, model = arch
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    assert repfuse.export_onnx(model, x, path).ok
    return {"default": onnx.load(str(path)), "unfolded": torchscript_export(model, x, 17)}


@pytest.mark.parametrize("style", ["default", "unfolded"])
def test_every_block_becomes_one_conv(arch, exports, style):
    name, model = arch
    original = exports[style]
    before = [n.op_type for n in original.graph.node]
    assert "BatchNormalization" in before and before.count("Conv") > BLOCKS[name]
    res = repfuse.fuse_onnx(original)
    after = [n.op_type for n in res.model.graph.node]
    assert after.count("Conv") == BLOCKS[name]
    assert "BatchNormalization" not in after and "Add" not in after
    assert len(res.report.fused) == BLOCKS[name] and not res.report.skipped
    assert res.report.ok and all(r.proofs.ok for r in res.report.fused)
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    fused_out, original_out = ort_run(res.model, x), ort_run(original, x)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    # Within 1e-5 of the original, unless the original itself is further than that from
    # the float64 result (float32 rounding over 40+ layers with realistic BN statistics):
    # then the fused model must be about as accurate as the original (within 2x).
    floor = rel_err(exact, original_out)
    assert rel_err(original_out, fused_out) <= max(1e-5, 3 * floor)
    assert rel_err(exact, fused_out) <= max(1e-5, 2 * floor)
