"""INT8 after fusion on real data: a RepVGG-style classifier trained on scikit-learn's
digits, fused, proven and quantized per tensor, per channel and with keep-float auto;
then QARepVGG's failure planted (a dead channel's identity-BN scale of 400) and found.

Accuracies are asserted against the float model's, measured in the same run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")

import helpers.digits as dn  # noqa: E402

import repfuse  # noqa: E402
from repfuse.quant.evaluate import run  # noqa: E402

CALIBRATION = 256           # training images used for calibration
POINT = 0.01                # one point of accuracy


@pytest.fixture(scope="module")
def digits():
    return dn.load()


@pytest.fixture(scope="module")
def model():
    return dn.trained()


def torch_accuracy(model, digits) -> float:
    with torch.no_grad():
        return dn.accuracy(model(torch.from_numpy(digits.test_x)).numpy(), digits.test_y)


def onnx_accuracy(proto, digits) -> float:
    return dn.accuracy(run(proto, "x", digits.test_x)[0], digits.test_y)


def test_the_float_model_learned_the_digits(digits, model):
    assert torch_accuracy(model, digits) >= 0.95


def _pre_relu_range(module, data) -> tuple[float, float]:
    seen = []
    handle = module.act.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            dn.trained()(torch.from_numpy(data))
    finally:
        handle.remove()
    return float(seen[0].min()), float(seen[0].max())


def test_quantize_a_torch_model_fuses_proves_and_names_layers(digits, model):
    calib = digits.train_x[:CALIBRATION]
    with torch.inference_mode():        # as in a deployment script
        result = repfuse.quantize(model, torch.from_numpy(calib), latency_repeat=5)
    report = result.report
    float_acc = torch_accuracy(model, digits)
    assert onnx_accuracy(result.float_model, digits) == float_acc      # fused, exported
    assert onnx_accuracy(result.model, digits) >= float_acc - POINT
    assert report.ok and report.output_sqnr >= report.target_sqnr
    assert report.fuse_report.verified and len(report.fuse_report.fused) == 4
    assert [layer.name for layer in report.layers] == [
        "blocks.0.reparam_conv", "blocks.1.reparam_conv", "blocks.2.reparam_conv",
        "blocks.3.reparam_conv", "head"]
    assert report.outliers == []
    for layer in report.layers:
        assert math.isfinite(layer.sensitivity)
        assert layer.weight_sqnr_channel_median >= layer.weight_sqnr_tensor_median - 0.5
    # the activation range is the fused conv's output: the sum of the branches before ReLU
    low, high = _pre_relu_range(model.blocks[0], calib)
    first = report.layers[0]
    assert first.act_min == pytest.approx(low, abs=1e-4)
    assert first.act_max == pytest.approx(high, abs=1e-4)
    assert report.latency.float_ms > 0 and report.latency.int8_ms > 0
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["module"] == first.module


@pytest.fixture(scope="module")
def training_onnx(tmp_path_factory, model, digits):
    path = tmp_path_factory.mktemp("digits") / "digits_train.onnx"
    repfuse.export_onnx(model, torch.from_numpy(digits.train_x[:1]), path)
    return path


@pytest.mark.parametrize("per_channel, keep_float", [(False, "none"), (True, "none"),
                                                     (False, "auto")])
def test_modes_on_the_trained_model(digits, model, training_onnx, per_channel, keep_float):
    result = repfuse.quantize(training_onnx, digits.train_x[:CALIBRATION],
                              per_channel=per_channel, keep_float=keep_float,
                              latency_repeat=0)
    report = result.report
    assert report.steps[0].startswith("fused with fuse_onnx and proved: 4 region(s)")
    assert [layer.module for layer in report.layers] == [
        "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    float_acc = torch_accuracy(model, digits)
    slack = 2 * POINT if not per_channel and keep_float == "none" else POINT
    assert onnx_accuracy(result.model, digits) >= float_acc - slack
    if keep_float == "auto":
        assert report.ok
        if report.output_sqnr_all_int8 >= report.target_sqnr:
            assert report.kept_float == []


def test_planted_dead_channel_is_named_and_auto_keep_float_recovers(digits, model):
    planted, branch, channel = dn.plant_dead_channel(model, digits)
    float_acc = torch_accuracy(planted, digits)
    assert float_acc >= torch_accuracy(model, digits) - 2 * POINT   # a dead channel, no more
    calib = digits.train_x[:CALIBRATION]

    with torch.no_grad():
        per_tensor = repfuse.quantize(planted, calib, per_channel=False,
                                      keep_float="none", latency_repeat=0)
    report = per_tensor.report
    assert {(o.layer, o.branch, o.channel) for o in report.outliers} == {
        ("blocks.1.reparam_conv", branch, channel)}
    outlier = report.outliers[0]
    assert outlier.scale == pytest.approx(400.0, rel=1e-4) and outlier.ratio > 50
    layers = {layer.name: layer for layer in report.layers}
    assert layers["blocks.1.reparam_conv"].outliers == report.outliers
    assert layers["blocks.1.reparam_conv"].weight_absmax_channel == channel
    # per tensor, the scale sized for 400 rounds the rest of the layer to a few levels
    assert layers["blocks.1.reparam_conv"].weight_sqnr_tensor_median < 10
    assert layers["blocks.1.reparam_conv"].weight_zeroed_tensor > 0.9
    assert all(layer.weight_sqnr_tensor_median > 20 for name, layer in layers.items()
               if name != "blocks.1.reparam_conv")
    assert min(layers, key=lambda n: layers[n].sensitivity) == "blocks.1.reparam_conv"
    assert not report.ok
    assert onnx_accuracy(per_tensor.model, digits) < float_acc - 20 * POINT  # it really hurts

    per_channel = repfuse.quantize(planted, calib, per_channel=True, keep_float="none",
                                   latency_repeat=0)
    crushed = {layer.name: layer for layer in per_channel.report.layers}["blocks.1.reparam_conv"]
    # per channel, the outlier's own output channel still loses every other weight (its
    # SQNR, dominated by the 400, does not show it; the zeroed fraction does)
    assert crushed.weight_zeroed_channel > 0.9
    assert crushed.weight_sqnr_channel_median > 20

    auto = repfuse.quantize(planted, calib, per_channel=False, keep_float="auto",
                            latency_repeat=0)
    assert "blocks.1.reparam_conv" in auto.report.kept_float
    assert auto.report.ok
    assert onnx_accuracy(auto.model, digits) >= float_acc - POINT
    assert np.isfinite(auto.report.output_sqnr)
