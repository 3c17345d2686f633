"""Fuzzing: random multi-branch blocks through ``repfuse.fuse`` and ``repfuse.fuse_onnx``
(Conv2d blocks, and blocks of Linear / BatchNorm1d, Conv1d and ConvTranspose2d layers).

Every block is either fused and proven equal, or left alone with a reason: never
wrong. ``REPFUSE_FUZZ_EXAMPLES`` sets the number of cases (CI: 500; ``make fuzz``:
10,000); the counts of fused / left-alone regions are printed at the end.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.fuzz_blocks import block_specs
from helpers.fuzz_layers import LayerBranch, LayerSpec, layer_block_specs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import repfuse

EXAMPLES = int(os.environ.get("REPFUSE_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    lines = [f"{k}: {v}" for k, v in sorted(COUNTS.items())]
    print("\nfuzz counts (" + str(EXAMPLES) + " cases per test): " + ", ".join(lines))


def _record(prefix: str, report) -> None:
    COUNTS[f"{prefix} cases"] += 1
    COUNTS[f"{prefix} regions fused"] += len(report.fused)
    COUNTS[f"{prefix} regions left alone"] += len(report.skipped)
    COUNTS[f"{prefix} regions fused in parts"] += len(report.split)
    if not report.fused:
        COUNTS[f"{prefix} cases with nothing fused"] += 1


def _never_wrong_fx(spec, prefix: str):
    block = spec.module().double()
    x = spec.example_input(torch.float64)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        expected = block(x)
    result = repfuse.fuse(block, x, verify=True)
    report = result.report
    for region in report.skipped + report.split:
        assert region.reason, f"region {region.path} left alone without a reason"
    for region in report.fused:
        assert region.proofs is None or region.proofs.ok, region.to_dict()
    assert report.ok, report.to_dict()
    with torch.no_grad():
        got = result.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # the input model is untouched
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _record(prefix, report)


@FUZZ
@given(spec=block_specs())
def test_fuse_is_never_wrong(spec):
    _never_wrong_fx(spec, "fx")


@FUZZ
@given(spec=layer_block_specs())
def test_fuse_layers_is_never_wrong(spec):
    _never_wrong_fx(spec, "fx layers")


def _never_wrong_onnx(spec, prefix: str):
    import onnxruntime as ort

    model = spec.onnx(opset=[13, 15, 17, 18, 21][spec.seed % 5])
    if model is None:
        COUNTS[f"{prefix} cases not expressible"] += 1
        return
    x = spec.example_input(torch.float32).numpy()

    def run(m):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    expected = run(model)
    result = repfuse.fuse_onnx(model, verify=True)
    report = result.report
    for region in report.skipped:
        assert region.reason, f"region {region.path} left alone without a reason"
    assert report.ok, report.to_dict()
    got = run(result.model)
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= 2e-5 * scale
    _record(prefix, report)


@FUZZ
@given(spec=block_specs())
def test_fuse_onnx_is_never_wrong(spec):
    _never_wrong_onnx(spec, "onnx")


#: A pooled Linear head whose graph output is declared 4-D while it computes (N, C): the
#: output Identity's shapes disagree in rank (onnx_ir's identity elimination refused it).
_DECLARED_RANK = LayerSpec(
    kind="linear", cin=2, cout=2, stride=1, size=4, tokens=False, pooled="mean",
    norm_style="transpose", combine="concat", post_bn=False, act="relu", seed=0,
    branches=[LayerBranch(kind="identity", kernel=1, padding=(0, 0), dilation=1, groups=1,
                          bias=False, pre_bn=False, bn=False, scale="none", negate=True,
                          padding_mode="zeros")])


@FUZZ
@given(spec=layer_block_specs())
@example(spec=_DECLARED_RANK)
def test_fuse_onnx_layers_is_never_wrong(spec):
    _never_wrong_onnx(spec, "onnx layers")


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(spec=st.one_of(block_specs(), layer_block_specs()))
def test_generator_forms_agree(spec):
    """The generator's torch module and ONNX graph compute the same function."""
    import onnxruntime as ort

    model = spec.onnx()
    if model is None:
        return
    x = spec.example_input(torch.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = spec.module()(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
