"""Linear / BatchNorm1d, ConvTranspose2d and Conv1d regions through ``fuse_onnx``, with both
exporters (torch.export-based, and TorchScript without constant folding so that the
BatchNormalization nodes are there): one layer per region, no BatchNormalization left, the
report proven ok, ONNX Runtime agrees with torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers.layer_blocks import BLOCKS, build
from helpers.onnx_graphs import ort_run, rel_err, torchscript_export

import repfuse

#: the ONNX ops a fused region of each layer type is written as (the first one counted)
LAYER_OPS = {torch.nn.Linear: ("Gemm", "MatMul"), torch.nn.Conv1d: ("Conv",),
             torch.nn.ConvTranspose2d: ("ConvTranspose",)}


def _dynamo(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), None, dynamo=True, verbose=False,
                                    opset_version=18, dynamic_shapes=({0: "batch"},))
    return program.model_proto


@pytest.mark.parametrize("style", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_becomes_one_layer_per_region(name, style):
    model, x, layer, regions = build(name)
    proto = _dynamo(model, x) if style == "dynamo" else torchscript_export(model, x, 17)
    result = repfuse.fuse_onnx(proto)
    report = result.report
    assert report.ok and report.verified, report.to_dict()
    assert not report.skipped, [r.to_dict() for r in report.skipped]
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops
    assert sum(ops.count(op) for op in LAYER_OPS[layer]) == regions, ops
    with torch.no_grad():
        expected = model(x).numpy()
    for batch in (1, x.shape[0] + 1):
        xb = np.random.default_rng(batch).standard_normal((batch, *x.shape[1:]))
        xb = xb.astype(np.float32)
        got = ort_run(result.model, xb)
        assert rel_err(ort_run(proto, xb), got) <= 1e-5
    assert rel_err(expected, ort_run(result.model, x.numpy())) <= 1e-5
