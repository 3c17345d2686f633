"""fuse_onnx on graphs written directly with onnx.helper: every rule, opsets 13..21,
regions that must be left alone, idempotency, and random blocks (tests/fuzz_blocks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.fuzz_blocks import block_specs
from helpers.onnx_graphs import G, assert_same, ops, repvgg_block, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import repfuse
from repfuse.errors import VerificationError


@pytest.mark.parametrize("opset", [13, 15, 17, 19, 21])
@pytest.mark.parametrize("const_nodes", [False, True])
def test_repvgg_block_every_opset(opset, const_nodes):
    _, m = repvgg_block(opset, const_nodes)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Relu"]
    assert res.report.ops_before == {"BatchNormalization": 3, "Conv": 2, "Relu": 1, "Sum": 1,
                                     **({"Constant": 12} if const_nodes else {})}
    assert res.report.ops_after == {"Conv": 1, "Relu": 1}
    assert res.model.opset_import[0].version == opset
    (region,) = res.report.regions
    assert region.status == "fused" and region.result == "conv3x3"
    assert sorted(region.branches) == ["bn", "conv1x1+bn", "conv3x3+bn"]
    assert region.proofs is not None and region.proofs.ok
    assert res.report.ok and res.report.verified
    assert_same(m, res.model, batch=1)
    assert_same(m, res.model, batch=5)


def test_scales_shifts_pool_identity_dropout_concat():
    """Mul/Div/Add/Sub by scalar and per-channel constants (initializers and Constant
    nodes), Neg, AveragePool, Identity, Dropout and a channel Concat in one region."""
    g = G(4)
    a = g.conv("x", 4, 4, 3)
    a = g.op("Mul", [a, g.const(np.full((1, 4, 1, 1), 0.7))])
    a = g.op("Div", [a, g.const(np.float32(1.5), as_node=True)])
    b = g.op("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    b = g.op("Sub", [g.const(np.linspace(-1, 1, 4).reshape(4, 1, 1)), b])
    c = g.op("Identity", [g.op("Neg", [g.conv("x", 4, 4, (1, 3), pads=[0, 1, 0, 1])])])
    c = g.op("Dropout", [c])
    s = g.op("Add", [g.op("Add", [a, b]), c])
    s = g.op("Sub", [s, g.const(np.float32(0.25))])
    d = g.conv("x", 4, 2, 5, dilation=1)
    y = g.op("Concat", [s, d], axis=1)
    m = g.model(g.op("Relu", [y]), 17)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Relu"]
    conv = res.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [5, 5] and attrs["pads"] == [2, 2, 2, 2]
    assert_same(m, res.model)


def test_exporter_style_constant_subgraphs():
    """Biases computed from Shape / Expand / CastLike of constants (the unoptimized
    torch.export output) and statistics behind Identity nodes are constants."""
    g = G(4)
    zero = g.const(np.float32(0.0), as_node=True)
    w = g.const(g.rng.standard_normal((4, 4, 3, 3)) * 0.3)
    count = g.op("Shape", [w], start=0, end=1)
    bias = g.op("Expand", [g.op("CastLike", [zero, "x"]), count])
    a = g.op("Conv", ["x", g.op("Identity", [w]), bias], kernel_shape=[3, 3], pads=[1] * 4)
    y = g.op("Add", [g.bn(a, 4), g.bn("x", 4)])
    m = g.model(g.op("Relu", [y]), 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Relu"]
    assert len(res.model.graph.initializer) == 2  # only the fused weight and bias remain
    assert_same(m, res.model)


def test_pad_then_conv_becomes_one_conv_with_asymmetric_pads():
    g = G(4)
    p = g.op("Pad", ["x", _int_const(g, [0, 0, 0, 1, 0, 0, 1, 0])])
    y = g.bn(g.conv(p, 4, 4, 3, pads=[0, 0, 0, 0], stride=2), 4)
    m = g.model(g.op("Relu", [y]), 18, size=9)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Relu"]
    attrs = {a.name: helper.get_attribute_value(a) for a in res.model.graph.node[0].attribute}
    assert attrs["pads"] == [0, 1, 1, 0] and attrs["strides"] == [2, 2]
    assert_same(m, res.model, size=9)


def _int_const(g: G, values):
    n = g.name("pads")
    g.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), n))
    return n


def test_same_upper_and_grouped_and_strided():
    g = G(4)
    a = g.op("Conv", ["x", g.const(g.rng.standard_normal((4, 2, 2, 2)))], kernel_shape=[2, 2],
             auto_pad="SAME_UPPER", group=2)
    b = g.conv("x", 4, 4, 1, bias=False)
    y = g.bn(g.op("Add", [a, b]), 4)
    m = g.model(g.op("Relu", [y]), 13, size=7)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Relu"]
    assert_same(m, res.model, size=7)


def test_intermediate_used_outside_is_left_alone_and_reported():
    g = G(4)
    a = g.conv("x", 4, 4, 3, bias=False)
    bn = g.bn(a, 4)
    y = g.op("Add", [bn, g.conv("x", 4, 4, 1)])
    m = g.model(g.op("Relu", [y]), 18, outputs=(a,))   # the raw conv output is a graph output
    res = repfuse.fuse_onnx(m)
    skipped = res.report.skipped
    assert skipped and "graph output" in skipped[0].reason
    assert "BatchNormalization" in ops(res.model) and "Add" in ops(res.model)
    assert_same(m, res.model)

    g = G(4)
    a = g.bn(g.conv("x", 4, 4, 3, bias=False), 4)
    y = g.op("Add", [a, g.conv("x", 4, 4, 1)])
    m = g.model(g.op("Mul", [g.op("Relu", [y]), g.op("Sigmoid", [a])]), 18)
    res = repfuse.fuse_onnx(m)
    assert any("Sigmoid" in r.reason for r in res.report.skipped + res.report.split)
    # the conv -> BN below the shared value is still fused on its own
    assert ops(res.model).count("BatchNormalization") == 0
    assert ops(res.model).count("Add") == 1
    assert_same(m, res.model)


def test_not_fusable_region_is_reported():
    """AveragePool without count_include_pad reading padding is not a convolution."""
    g = G(4)
    b = g.op("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    y = g.op("Add", [g.bn(g.conv("x", 4, 4, 3), 4), b])
    m = g.model(g.op("Relu", [y]), 18)
    res = repfuse.fuse_onnx(m)
    (split,) = res.report.split      # refused as a whole; its conv+BN part is fused
    assert "count_include_pad" in split.reason, split.reason
    assert [r.branches for r in res.report.fused] == [["conv3x3+bn"]]
    assert ops(res.model) == ["AveragePool", "Conv", "Add", "Relu"]
    assert_same(m, res.model)


def test_batchnorm_on_sequences_becomes_a_1d_conv_other_ranks_left_alone():
    g = G(4)
    flat = g.op("Reshape", [g.op("Relu", ["x"]), _int_const(g, [0, 4, -1])])  # (N, 4, 64)
    y = g.op("Add", [g.bn(flat, 4), flat])      # BN + identity on (N, C, L): a 1-D conv
    m = g.model(g.op("Relu", [y]), 18)
    m.graph.output[0].type.tensor_type.shape.Clear()
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Relu", "Reshape", "Conv", "Relu"] and res.report.ok
    (conv,) = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert [list(a.ints) for a in conv.attribute if a.name == "kernel_shape"] == [[1]]
    assert_same(m, res.model)
    g = G(4)
    cube = g.op("Reshape", [g.op("Relu", ["x"]), _int_const(g, [0, 4, 2, 4, -1])])  # 5-D
    y = g.op("Add", [g.bn(cube, 4), cube])
    m = g.model(g.op("Relu", [y]), 18)
    m.graph.output[0].type.tensor_type.shape.Clear()
    res = repfuse.fuse_onnx(m)
    assert "BatchNormalization" in ops(res.model)
    assert res.report.skipped and "rank 5" in res.report.skipped[0].reason
    assert_same(m, res.model)


def test_idempotent_and_model_proto_not_modified():
    _, m = repvgg_block()
    before = m.SerializeToString()
    once = repfuse.fuse_onnx(m).model
    assert m.SerializeToString() == before
    twice = repfuse.fuse_onnx(once)
    assert twice.report.fused == [] and ops(twice.model) == ops(once)


def test_verification_failure_raises(monkeypatch):
    import repfuse.onnx.rewrite as rw

    original = rw.replace_with_conv

    def broken(graph, nodes, x, output, fused):
        fused.bias = fused.bias + 1.0
        return original(graph, nodes, x, output, fused)

    monkeypatch.setattr("repfuse.onnx.regions.replace_with_conv", broken)
    _, m = repvgg_block()
    with pytest.raises(VerificationError, match="disagrees") as info:
        repfuse.fuse_onnx(m)
    assert not info.value.report.model_checks.ok


@settings(max_examples=25)
@given(spec=block_specs(), opset=st.sampled_from([13, 17, 21]))
def test_random_blocks_keep_their_function(spec, opset):
    m = spec.onnx(opset)
    if m is None:
        return
    res = repfuse.fuse_onnx(m)
    x = spec.example_input().numpy().astype(np.float32)
    for a, b in zip(run(m, x), run(res.model, x)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 + 1e-4 * np.abs(a).max()
    for region in res.report.fused:
        assert region.proofs.ok
    if not (res.report.skipped or res.report.split) and \
            not any(b.relu_inside for b in spec.branches):
        # the whole block is one linear region: one Conv (then Relu / output Identity),
        # unless it is a lone BatchNormalization (nothing to fold it into or merge it with)
        lone_bn = ops(m).count("BatchNormalization") == 1 and not {"Conv", "Add", "Sum", "Sub",
                                                                    "Concat"} & set(ops(m))
        assert lone_bn or "BatchNormalization" not in ops(res.model)
        assert ops(res.model).count("Conv") <= 1
        if res.report.fused:
            assert ops(res.model).count("Conv") == 1


def test_overridable_initializers_are_not_fused_and_noted():
    _, m = repvgg_block()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT,
                                                           list(t.dims)))
    res = repfuse.fuse_onnx(m)
    assert res.report.fused == [] and ops(res.model) == ops(m)
    assert any("keep_initializers_as_inputs" in n for n in res.report.notes)


def test_model_that_cannot_run_on_random_inputs():
    g = G(4)
    y = g.op("Reshape", [g.op("Relu", [g.bn(g.conv("x", 4, 4, 3), 4)]),
                         _int_const(g, [-1, 4 * 7 * 7])])
    m = g.model(y, 18, size="S")
    m.graph.output[0].type.tensor_type.shape.Clear()
    with pytest.raises(repfuse.errors.InputError, match="cannot run the original model.*"
                                                        "verify=False"):
        repfuse.fuse_onnx(m)
    res = repfuse.fuse_onnx(m, verify=False)
    assert ops(res.model) == ["Conv", "Relu", "Reshape"]


def test_refused_region_is_fused_in_parts():
    """RepGhost's tail: 1x1+BN feeding a padded depthwise 3x3+BN and a BN, summed. As one
    region the 1x1's bias would pass through the 3x3's zero padding; the pass fuses the
    1x1+BN, then (a later pass, the new Conv as the input) the depthwise sum."""
    g = G(4)
    x1 = g.bn(g.conv("x", 4, 6, 1, bias=False), 6)
    y = g.op("Add", [g.bn(g.conv(x1, 6, 6, 3, group=6, bias=False), 6), g.bn(x1, 6)])
    m = g.model(g.op("Relu", [y]), 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Conv", "Relu"]
    (split,) = res.report.split
    assert "zero padding" in split.reason and not res.report.skipped
    assert len(res.report.fused) == 2
    assert_same(m, res.model)


def test_region_that_would_grow_is_fused_in_parts():
    """A stride-2 depthwise 3x3+BN then a 1x1+BN (a RepGhost shortcut): one Conv would
    have 5x the parameters, so each conv keeps its own (BN folded)."""
    g = G(4)
    y = g.bn(g.conv(g.bn(g.conv("x", 4, 4, 3, stride=2, group=4, bias=False), 4), 4, 16, 1,
                    bias=False), 16)
    m = g.model(g.op("Relu", [y]), 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Conv", "Relu"]
    (split,) = res.report.split
    assert "multiply the parameters" in split.reason
    assert_same(m, res.model)


def test_refused_region_is_cut_at_a_dominator():
    """A 1x1 conv with bias feeding a padded 3x3 (refused: the bias would pass through
    zero padding), then a RepVGG block on that value. Every sub-region that starts at the
    input holds the refused pair; the RepVGG part, which reads only the 3x3's output, is
    fused on its own and the pair is left as it is."""
    g = G(4)
    v = g.conv(g.conv("x", 4, 6, 1), 6, 6, 3)
    y = g.op("Sum", [g.bn(g.conv(v, 6, 6, 3, bias=False), 6),
                     g.bn(g.conv(v, 6, 6, 1, bias=False), 6), g.bn(v, 6)])
    m = g.model(g.op("Relu", [y]), 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Conv", "Conv", "Relu"]
    (fused,) = res.report.fused
    assert sorted(fused.branches) == sorted(["conv3x3+bn", "conv1x1+bn", "bn"]), fused.branches
    (split,) = res.report.split
    assert "zero padding" in split.reason and f"cut at '{v}'" in split.reason, split.reason
    assert not res.report.skipped
    assert_same(m, res.model)


def test_suffix_cuts_are_the_dominated_parts():
    """Only values every path passes through are cuts: inside a RepVGG block (three
    branches from the input) there is none; after a chain there is one per link."""
    import onnx_ir as ir

    from repfuse.onnx.regions import find_candidates, linear_ops, suffix_cuts

    g = G(4)
    a = g.conv("x", 4, 4, 1)
    b = g.bn(a, 4)
    y = g.op("Sum", [g.bn(g.conv(b, 4, 4, 3, bias=False), 4), g.bn(b, 4)])
    model = ir.serde.deserialize_model(g.model(g.op("Relu", [y]), 18))
    ops_ = linear_ops(model.graph)
    cand = find_candidates(model.graph, ops_)[0]
    assert len(cand.nodes) == 6
    cuts = suffix_cuts(cand, ops_)
    assert [c.input.name for c in cuts] == [a, b]
    assert [len(c.nodes) for c in cuts] == [5, 4]
    _, repvgg = repvgg_block()
    model = ir.serde.deserialize_model(repvgg)
    ops_ = linear_ops(model.graph)
    assert suffix_cuts(find_candidates(model.graph, ops_)[0], ops_) == []


def test_part_that_fails_its_proof_is_left_and_named():
    """When the part after a cut fails its per-region proof, nothing of it is written and
    the refused region's reason says so."""
    import onnx_ir as ir

    from repfuse.onnx.regions import fuse_graph
    from repfuse.report import Check, VerifyReport

    g = G(4)
    v = g.conv(g.conv("x", 4, 6, 1), 6, 6, 3)
    y = g.op("Add", [g.bn(g.conv(v, 6, 6, 3, bias=False), 6), g.bn(v, 6)])
    model = ir.serde.deserialize_model(g.model(g.op("Relu", [y]), 18))

    def failing(expr, fused):
        return VerifyReport(checks=[Check("output[random]", 1.0, 1.0, 0.0, 0.0, False)])

    reports = fuse_graph(model, check=failing)
    assert [n.op_type for n in model.graph][-3:] == ["BatchNormalization", "Add", "Relu"]
    (whole,) = [r for r in reports if "zero padding" in r.reason]
    assert whole.status == "skipped" and f"the part after '{v}'" in whole.reason
    assert "proof failed" in whole.reason


def test_region_after_a_residual_add_of_two_inputs():
    """An Add joining two different inputs (a residual) is a boundary, not a reason to
    drop every linear node after it: the next block's Conv -> BN still fuses
    (MobileNetV3's inverted residuals, FastViT's stages)."""
    g = G(4)
    r = g.op("Relu", ["x"])
    s = g.op("Add", [r, "x"])
    y = g.op("Relu", [g.bn(g.conv(s, 4, 4, 3, bias=False), 4)])
    m = g.model(y, 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Relu", "Add", "Conv", "Relu"]
    (fused,) = res.report.fused
    assert fused.branches == ["conv3x3+bn"]
    assert_same(m, res.model)


def test_castlike_reading_a_value_inside_only_for_its_type():
    """The torch exporter casts scalar constants like an activation (CastLike(3, v));
    that use reads v's element type only: the region still fuses and the CastLike takes
    its type from the region's input."""
    g = G(4)
    u = g.conv("x", 4, 4, 3, bias=False)
    v = g.bn(u, 4)
    three = g.op("CastLike", [g.const(3.0), u])
    y = g.op("Add", [g.op("Relu", [v]), three])
    m = g.model(y, 18)
    res = repfuse.fuse_onnx(m)
    assert "BatchNormalization" not in ops(res.model) and ops(res.model).count("Conv") == 1
    (cast,) = [n for n in res.model.graph.node if n.op_type == "CastLike"]
    assert cast.input[1] == "x"
    assert_same(m, res.model)


def test_region_whose_input_alias_is_used_outside_is_cut_after_it():
    """Identity -> Conv -> BN where the Identity's output is also read outside: the
    region as a whole would hide that value; the part after it fuses."""
    g = G(4)
    a = g.op("Identity", ["x"])
    y = g.op("Add", [g.op("Relu", [g.bn(g.conv(a, 4, 4, 3, bias=False), 4)]), a])
    m = g.model(y, 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Relu", "Add"]     # the Identity is cleaned away
    (split,) = res.report.split
    assert "also used by" in split.reason and f"cut at '{a}'" in split.reason
    assert_same(m, res.model)


def test_zero_bias_parameters_are_cut_like_nonzero_ones():
    """RepGhost's tail with freshly initialised BNs (scale 1, shift 0, mean 0, var 1): the
    1x1+BN's bias is zero, so one Conv would match the outputs but not the gradient of
    the BN's shift. The region is cut as with trained weights; no proof fails."""
    g = G(4)
    ones, zeros = g.const(np.ones(6)), g.const(np.zeros(6))

    def fresh_bn(v):
        return g.op("BatchNormalization", [v, ones, zeros, zeros, ones], epsilon=1e-5)

    x1 = fresh_bn(g.conv("x", 4, 6, 1, bias=False))
    y = g.op("Add", [fresh_bn(g.conv(x1, 6, 6, 3, group=6, bias=False)), fresh_bn(x1)])
    m = g.model(g.op("Relu", [y]), 18)
    res = repfuse.fuse_onnx(m)
    assert ops(res.model) == ["Conv", "Conv", "Relu"]
    assert not res.report.skipped and all(r.proofs.ok for r in res.report.fused)
    (split,) = res.report.split
    assert "even while it is zero" in split.reason
    assert_same(m, res.model)
