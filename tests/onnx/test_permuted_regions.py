"""Regions that move the channel axis through export and ``fuse_onnx``: UniRepLKNet's
MatMul (+ Add) -> Transpose(0, 3, 1, 2) -> BatchNormalization -> Mul becomes MatMul + Add
followed by the Transpose, and the mirror (BatchNormalization -> Transpose(0, 2, 3, 1) ->
MatMul) the Transpose then MatMul + Add; no BatchNormalization is left, ONNX Runtime agrees
with the training form (float64 where ONNX Runtime runs the ops in float64)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers.layer_blocks import randomize
from helpers.onnx_graphs import ort_run, rel_err, torchscript_export
from helpers.unireplk import FFNTail, MirrorHead, UniRepLKNetSmall

import repfuse
from repfuse.errors import VerificationError


def _dynamo(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), None, dynamo=True, verbose=False,
                                    opset_version=18, dynamic_shapes=({0: "batch"},))
    return program.model_proto


def _ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def _fuse(proto):
    result = repfuse.fuse_onnx(proto)
    report = result.report
    assert report.ok and report.verified, report.to_dict()
    assert all(r.proofs is not None and r.proofs.ok for r in report.fused)
    assert "BatchNormalization" not in _ops(result.model)
    return result


@pytest.mark.parametrize("style", ["dynamo", "torchscript"])
def test_unireplknet_ffn_fuses_into_matmul_then_transpose(style):
    torch.manual_seed(0)
    model = randomize(UniRepLKNetSmall())
    x = torch.randn(2, 3, 16, 14)
    proto = _dynamo(model, x) if style == "dynamo" else torchscript_export(model, x, 17)
    assert "BatchNormalization" in _ops(proto)
    result = _fuse(proto)
    ffn = [r for r in result.report.fused if r.result == "linear+permute"]
    assert len(ffn) == 3 and all("linear+bn+scale" in b for r in ffn for b in r.branches)
    ops = _ops(result.model)
    # one MatMul per Linear of the model (the head's Gemm aside): nothing duplicated
    assert ops.count("MatMul") == 6
    for i, op in enumerate(ops):       # each fused FFN tail: MatMul, Add, Transpose
        if op == "MatMul" and ops[i + 2] == "Transpose":
            assert ops[i + 1] == "Add"
    assert sum(ops[i:i + 3] == ["MatMul", "Add", "Transpose"] for i in range(len(ops))) == 3
    with torch.no_grad():
        truth = model.double()(x.double()).numpy()
    for batch in (1, 3):
        xb = np.random.default_rng(batch).standard_normal((batch, 3, 16, 14)).astype(np.float32)
        assert rel_err(ort_run(proto, xb), ort_run(result.model, xb)) <= 1e-5
    assert rel_err(truth, ort_run(result.model, x.numpy())) <= 1e-5


@pytest.mark.parametrize("name", ["ffn_tail", "mirror"])
def test_float64_region_equals_the_training_form(name):
    torch.manual_seed(1)
    if name == "ffn_tail":
        model, x = FFNTail(12, 5, bias=True, layer_scale=True), torch.randn(2, 4, 3, 12)
        order = ["MatMul", "Add", "Transpose"]
    else:
        model, x = MirrorHead(5, 7, bias=True), torch.randn(2, 5, 4, 3)
        order = ["Transpose", "MatMul", "Add"]
    model, x = randomize(model).double(), x.double()
    result = _fuse(torchscript_export(model, x, 17))
    assert _ops(result.model) == order
    (region,) = result.report.fused
    with torch.no_grad():
        want = model(x).numpy()
    got = ort_run(result.model, x.numpy())
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_wrong_transpose_written_is_caught(monkeypatch):
    """A fused layer written with the wrong Transpose fails the model check."""
    import repfuse.onnx.rewrite as rw

    real = rw.relayout

    def swapped(fused):
        before, inner, after = real(fused)
        return before, inner, (0, 2, 3, 1) if after else after   # not the inverse move
    monkeypatch.setattr(rw, "relayout", swapped)
    model = randomize(FFNTail(6, 6, bias=False, layer_scale=False))
    x = torch.randn(2, 4, 5, 6)    # H != W: the wrong move gives another shape
    with pytest.raises(VerificationError):
        repfuse.fuse_onnx(torchscript_export(model, x, 17))
