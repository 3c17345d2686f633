"""The doctor's parts on a small untrained RepVGG-style model: INT8 weights read back from
onnxruntime's QDQ model, the torch module behind each ONNX node, BN-scale outliers,
SQNR, keep-float names, and the refusals (already quantized, several inputs, no
onnxruntime, a failed proof)."""

from __future__ import annotations

import copy
import logging
import math
import sys

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

import helpers.digits as dn  # noqa: E402

import repfuse  # noqa: E402
from repfuse.errors import InputError, VerificationError  # noqa: E402
from repfuse.quant import bnscale, keepfloat, mapping  # noqa: E402
from repfuse.quant.evaluate import sqnr  # noqa: E402
from repfuse.quant.pipeline import check_options, quantize_model  # noqa: E402
from repfuse.quant.qdq import QdqQuantizer  # noqa: E402
from repfuse.quant.weights import dequantized_weights, initializer, weighted_nodes  # noqa: E402
from repfuse.report import Check  # noqa: E402


def small_model(seed=0) -> dn.DigitsNet:
    torch.manual_seed(seed)
    model = dn.DigitsNet(width=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def calibration(n=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def fused():
    """(fused torch module, its dynamo ONNX export)."""
    x = torch.from_numpy(calibration(1))
    model = repfuse.fuse(small_model(), x).model
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        repfuse.export_onnx(model, x, f"{folder}/m.onnx")
        return model, onnx.load(f"{folder}/m.onnx")


def test_int8_weights_read_back_respect_the_scale_of_their_channel_or_tensor(fused):
    _, proto = fused
    nodes = weighted_nodes(proto)
    assert [n.op for n in nodes] == ["Conv"] * 4 + ["Gemm"]
    with QdqQuantizer(proto, calibration()) as quantizer:
        models = {pc: quantizer.quantize(per_channel=pc) for pc in (False, True)}
    for per_channel, qdq in models.items():
        read = dequantized_weights(qdq, nodes)
        assert set(read) == {n.name for n in nodes}
        for node in nodes:
            w = np.moveaxis(initializer(proto, node.weight).astype(np.float64), node.axis, 0)
            w = w.reshape(w.shape[0], -1)
            deq = np.moveaxis(read[node.name], node.axis, 0).reshape(w.shape)
            absmax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max()
            step = absmax / 127
            assert (np.abs(deq - w) <= step / 2 * (1 + 1e-4)).all(), node.name
            if per_channel:    # a per-tensor step would break the bound of small channels
                assert np.abs(deq - w).max(axis=1).min() < step.max() / 2


def test_onnx_nodes_map_to_the_torch_modules_they_came_from(fused):
    model, proto = fused
    nodes = weighted_nodes(proto)
    expected = ["blocks.0.reparam_conv", "blocks.1.reparam_conv", "blocks.2.reparam_conv",
                "blocks.3.reparam_conv", "head"]
    paths = mapping.module_paths(proto, nodes, model)
    assert [paths[n.name] for n in nodes] == expected
    # without metadata and with anonymous initializers, the weights alone decide
    bare = copy.deepcopy(proto)
    for node in bare.graph.node:
        del node.metadata_props[:]
    renames = {t.name: f"w{i}" for i, t in enumerate(bare.graph.initializer)}
    for t in bare.graph.initializer:
        t.name = renames[t.name]
    for node in bare.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    bare_nodes = weighted_nodes(bare)
    paths = mapping.module_paths(bare, bare_nodes, model)
    assert [paths[n.name] for n in bare_nodes] == expected
    # two modules with equal weights: the recorded scope decides; with no scope, nothing
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[3].reparam_conv.weight.copy_(twin.blocks[3].reparam_conv.weight * 0 + 0.5)
        twin.blocks[1].reparam_conv.weight.copy_(twin.blocks[1].reparam_conv.weight * 0 + 0.5)
    same = copy.deepcopy(proto)
    for t in same.graph.initializer:
        if t.name in ("blocks.1.reparam_conv.weight", "blocks.3.reparam_conv.weight"):
            t.CopyFrom(onnx.numpy_helper.from_array(
                np.full(tuple(t.dims), 0.5, np.float32), t.name))
    paths = mapping.module_paths(same, nodes, twin)
    assert [paths[n.name] for n in nodes] == expected
    assert mapping.module_paths(bare, bare_nodes, None) == {}


def test_bn_scale_outliers_are_named_by_branch_and_channel():
    bn = torch.nn.BatchNorm2d(4, eps=1e-5).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.6, 1.0]))
    net = torch.nn.Sequential(bn, torch.nn.BatchNorm2d(4).eval())
    scales = bnscale.torch_branch_scales(net, ["0", "1", "missing"])
    assert [s.branch for s in scales] == ["0", "1"]
    np.testing.assert_allclose(scales[0].scales[:2], [1 / math.sqrt(1 + 1e-5),
                                                      2 / math.sqrt(4 + 1e-5)])
    found = bnscale.outliers("layer", scales)
    assert [(o.branch, o.channel) for o in found] == [("0", 2)]
    assert found[0].scale == pytest.approx(0.6 / math.sqrt(1e-5))
    assert found[0].ratio > 50 and found[0].median == pytest.approx(1.0, abs=1e-5)
    assert bnscale.outliers("layer", scales, factor=1e4) == []


def test_the_onnx_path_names_the_planted_branch(tmp_path):
    model = small_model(1)
    with torch.no_grad():
        model.blocks[1].identity.running_var[2] = 0.0
    path = tmp_path / "train.onnx"
    repfuse.export_onnx(model, torch.from_numpy(calibration(1)), path)
    report = quantize_model(path, calibration(), per_channel=False, keep_float="none",
                            latency_repeat=0).report
    assert [(o.layer, o.branch, o.channel) for o in report.outliers] == [
        ("blocks.1", "blocks.1.identity", 2)]


def test_the_public_function_survives_importing_the_package():
    import repfuse.quant.pipeline  # noqa: F401  (binds repfuse.quant, never repfuse.quantize)

    assert callable(repfuse.quantize) and repfuse.quantize.__module__ == "repfuse.api"
    assert isinstance(repfuse.QuantizeReport, type)


def test_sqnr_and_agreement():
    ref = [np.array([[3.0, 4.0]])]
    assert sqnr(ref, ref) == math.inf
    assert sqnr(ref, [np.array([[3.0, 4.5]])]) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr([np.zeros(2)], [np.ones(2)]) == -math.inf


def test_refusals(fused, tmp_path, monkeypatch):
    model, proto = fused
    data = calibration()
    result = quantize_model(proto, data, keep_float="none", latency_repeat=0)
    with pytest.raises(InputError, match="already quantized .*DequantizeLinear"):
        quantize_model(result.model, data)
    dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(dynamic, np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="no quantized layer named 'blocks.1.reparam'.*"
                                         "blocks.1.reparam_conv"):
        keepfloat.resolve(["blocks.1.reparam"], result.report.layers)
    for bad in ({"keep_float": "some"}, {"keep_float": 3}, {"target_sqnr": math.nan}):
        with pytest.raises(InputError):
            check_options(**{"keep_float": "auto", "target_sqnr": 30.0, **bad})
    with pytest.raises(InputError, match="takes N,1,8,8"):
        quantize_model(proto, np.zeros((2, 3, 8, 8), np.float32))
    two = copy.deepcopy(proto)
    two.graph.input.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                              [1]))
    with pytest.raises(InputError, match="2 inputs"):
        quantize_model(two, data)
    import onnxruntime.quantization as ortq

    def broken(*args, **kwargs):
        raise ValueError("Conv_7 has no shape\nand more")

    with monkeypatch.context() as m:
        m.setattr(ortq, "quantize_static", broken)
        with pytest.raises(InputError, match=r"quantizer cannot quantize this model "
                                             r"\(ValueError: Conv_7 has no shape\)$"):
            quantize_model(proto, data)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(InputError, match=r"pip install 'repfuse\[onnxruntime\]'"):
        quantize_model(proto, data)


def test_a_failed_proof_quantizes_nothing(monkeypatch):
    import repfuse.quant.prepare as prepare

    real = prepare.fuse_torch_model

    def failing(*args, **kwargs):
        result = real(*args, **kwargs)
        result.report.model_checks.checks.append(Check("output", 1.0, 1.0, 0.0, 0.0, False))
        return result

    monkeypatch.setattr(prepare, "fuse_torch_model", failing)
    with pytest.raises(VerificationError, match="disagrees with the training form"):
        quantize_model(small_model(), calibration())


def test_nothing_is_printed_and_no_logging_handler_is_left(fused, capfd):
    _, proto = fused
    root = logging.getLogger()
    before = list(root.handlers)
    quantize_model(proto, calibration(), latency_repeat=1)
    assert root.handlers == before
    out, err = capfd.readouterr()
    assert out == "" and err == ""
