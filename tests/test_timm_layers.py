"""timm families whose heads and token mixers use Linear + BatchNorm1d (random weights and
statistics), without timm's reparameterize code: through ``repfuse.fuse`` the parameters
and norm layers are at most those of ``timm.utils.reparameterize_model`` on the same
weights, no norm layer is left (NextViT's pre-norms, each read by several layers, are
copied into their readers: ``fx.readers``) and the outputs equal the training form's;
through export -> ``fuse_onnx`` no BatchNormalization is left (``onnx.readers``)."""

from __future__ import annotations

import copy

import onnx
import pytest
import timm
import torch
import torch.nn as nn
from helpers.onnx_graphs import ort_run, rel_err
from test_redteam_timm import randomize

import repfuse

NORMS = nn.modules.batchnorm._BatchNorm
#: the input size each model needs (LeViT and EfficientViT fix their attention biases' grid)
SIZES = {"repvit_m0_9": 64, "nextvit_small": 64, "levit_128s": 224, "efficientvit_m0": 224}


def _build(arch: str):
    torch.manual_seed(0)
    model = randomize(timm.create_model(arch, pretrained=False)).eval()
    return model, torch.randn(1, 3, SIZES[arch], SIZES[arch])


def _counts(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(isinstance(m, NORMS) for m in model.modules()))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SIZES))
def test_fuse_matches_or_beats_timm_reparameterize(arch, monkeypatch):
    model, x = _build(arch)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    for m in model.modules():   # timm's own fusing code must not run
        for attr in ("fuse", "reparameterize"):
            if callable(getattr(type(m), attr, None)):
                monkeypatch.setattr(type(m), attr, _refuse)
    result = repfuse.fuse(model, x, verify=False)
    params, norms = _counts(result.model)
    timm_params, timm_norms = _counts(deploy)
    assert params <= timm_params and norms <= timm_norms, (params, norms, timm_params,
                                                           timm_norms)
    assert norms == 0, [(layer.path, layer.reason) for layer in result.report.layers
                        if layer.kind == "norm" and str(layer.status) != "fused"]
    assert not result.report.skipped, [r.to_dict() for r in result.report.skipped]
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def _refuse(*args, **kwargs):
    raise AssertionError("timm's own fusing code was called")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SIZES))
def test_export_then_fuse_onnx_leaves_no_batch_norm(arch, tmp_path):
    model, x = _build(arch)
    path = tmp_path / f"{arch}.onnx"
    assert repfuse.export_onnx(model, x, path, dynamic_batch=False).ok
    original = onnx.load(str(path))
    assert any(n.op_type == "BatchNormalization" for n in original.graph.node)
    result = repfuse.fuse_onnx(original)
    assert result.report.ok
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops, [r.to_dict() for r in result.report.skipped]
    assert rel_err(ort_run(original, x.numpy()), ort_run(result.model, x.numpy())) <= 1e-5
