"""fuse_onnx keeps activation and normalization patterns that runtimes fuse (a GELU written
out as Div / Erf / Add / Mul / Mul, HardSigmoid, HardSwish, SiLU, LayerNorm, RMSNorm)
whole, fuses the branches around them, and writes a graph with nothing left to remove."""

from __future__ import annotations

import collections
import io
import math
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import repfuse

C = 8


class Block:
    """x -> (conv3x3 + BN | conv1x1 + BN) summed -> ``pattern`` -> conv1x1 -> y."""

    def __init__(self, seed: int = 0, const_nodes: bool = False):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0
        self.const_nodes = const_nodes

    def const(self, value) -> str:
        self.n += 1
        name = f"k{self.n}"
        tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        if self.const_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op_type, inputs, **attrs) -> str:
        self.n += 1
        out = f"{op_type.lower()}{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x, k):
        r = self.rng
        y = self.op("Conv", [x, self.const(r.standard_normal((C, C, k, k)) * .3)],
                    kernel_shape=[k, k], pads=[k // 2] * 4)
        return self.op("BatchNormalization", [
            y, self.const(r.random(C) + .5), self.const(r.standard_normal(C) * .3),
            self.const(r.standard_normal(C) * .5), self.const(r.random(C) + .5)])

    def model(self, pattern) -> tuple[onnx.ModelProto, set[str], np.ndarray]:
        s = self.op("Add", [self.conv_bn("x", 3), self.conv_bn("x", 1)])
        first = len(self.nodes)
        y = pattern(self, s)
        kept = {n.name for n in self.nodes[first:] if n.op_type != "Constant"}
        w2 = self.rng.standard_normal((C, C, 1, 1)).astype(np.float32) * .3
        out = self.op("Conv", [y, self.const(w2)], kernel_shape=[1, 1])
        graph = helper.make_graph(
            self.nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                ["N", C, 8, 8])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", C, 8, 8])],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model, kept, w2


def gelu(b, x):             # torch.nn.GELU as the TorchScript exporter writes it
    a = b.op("Add", [b.op("Erf", [b.op("Div", [x, b.const(math.sqrt(2))])]), b.const(1.0)])
    return b.op("Mul", [b.op("Mul", [x, a]), b.const(0.5)])


def gelu_half_first(b, x):  # x * 0.5 * (1 + erf(x / sqrt(2))) written in Python
    a = b.op("Add", [b.op("Erf", [b.op("Div", [x, b.const(math.sqrt(2))])]), b.const(1.0)])
    return b.op("Mul", [b.op("Mul", [x, b.const(0.5)]), a])


def gelu_times_rsqrt2(b, x):    # x * (1 + erf(x * 0.7071)) / 2
    a = b.op("Add", [b.const(1.0), b.op("Erf", [b.op("Mul", [b.const(1 / math.sqrt(2)), x])])])
    return b.op("Div", [b.op("Mul", [a, x]), b.const(2.0)])


def gelu_dynamo(b, x):      # x * (0.5 * (1 + erf(x / sqrt(2)))), as the dynamo exporter
    a = b.op("Add", [b.op("Erf", [b.op("Div", [x, b.const(math.sqrt(2))])]), b.const(1.0)])
    return b.op("Mul", [x, b.op("Mul", [b.const(0.5), a])])


def gelu_tanh(b, x):
    cube = b.op("Mul", [b.op("Pow", [x, b.const(3.0)]), b.const(0.044715)])
    t = b.op("Tanh", [b.op("Mul", [b.op("Add", [x, cube]), b.const(math.sqrt(2 / math.pi))])])
    return b.op("Mul", [b.op("Mul", [x, b.op("Add", [t, b.const(1.0)])]), b.const(0.5)])


def hardsigmoid(b, x):
    clip = b.op("Clip", [b.op("Add", [x, b.const(3.0)]), b.const(0.0), b.const(6.0)])
    return b.op("Div", [clip, b.const(6.0)])


def hardswish(b, x):
    clip = b.op("Clip", [b.op("Add", [x, b.const(3.0)]), b.const(0.0), b.const(6.0)])
    return b.op("Div", [b.op("Mul", [x, clip]), b.const(6.0)])


def silu(b, x):
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _layernorm(b, x, gamma, beta):     # over the last axis (W)
    d = b.op("Sub", [x, b.op("ReduceMean", [x], axes=[-1])])
    var = b.op("ReduceMean", [b.op("Pow", [d, b.const(2.0)])], axes=[-1])
    y = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, b.const(1e-5)])])])
    return b.op("Add", [b.op("Mul", [y, b.const(gamma)]), b.const(beta)])


def layernorm(b, x):        # the affine per element of the last axis
    return _layernorm(b, x, b.rng.random(8) + 0.5, b.rng.standard_normal(8))


def layernorm_scalar_affine(b, x):     # a scalar affine would fold into the next conv
    return _layernorm(b, x, 1.5, 0.25)


def _rmsnorm(b, x, gamma, square):
    squared = b.op("Pow", [x, b.const(2.0)]) if square == "pow" else b.op("Mul", [x, x])
    ms = b.op("ReduceMean", [squared], axes=[-1])
    y = b.op("Div", [x, b.op("Sqrt", [b.op("Add", [ms, b.const(1e-6)])])])
    return b.op("Mul", [y, b.const(gamma)])


def rmsnorm(b, x):
    return _rmsnorm(b, x, b.rng.random(8) + 0.5, "pow")


def rmsnorm_scalar_scale(b, x):
    return _rmsnorm(b, x, 1.5, "mul")


#: patterns, and the kernel onnxruntime's CPU optimizer fuses each into (None: it runs
#: them as written, other runtimes fuse them)
PATTERNS = {gelu: "Gelu", gelu_half_first: "Gelu", gelu_times_rsqrt2: None, gelu_dynamo: None,
            gelu_tanh: None,
            hardsigmoid: None, hardswish: None, silu: "QuickGelu",
            layernorm: "LayerNormalization", layernorm_scalar_affine: None,
            rmsnorm: "SimplifiedLayerNormalization", rmsnorm_scalar_scale: None}


def optimized_ops(model: onnx.ModelProto) -> collections.Counter:
    """Op counts of the graph onnxruntime runs after its graph optimizations."""
    with tempfile.TemporaryDirectory() as folder:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(
            opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=lambda f: f.__name__)
def test_pattern_is_kept_and_the_branches_before_it_fuse(pattern):
    model, kept, w2 = Block().model(pattern)
    result = repfuse.fuse_onnx(model)
    fused = result.model
    nodes = {n.name: n for n in fused.graph.node}
    assert kept <= set(nodes), f"pattern nodes removed: {kept - set(nodes)}"
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and not any(n.op_type == "BatchNormalization"
                                       for n in fused.graph.node)
    assert [c.input[0] for c in convs].count("x") == 1      # the two branches are one conv
    last = next(c for c in convs if c.input[0] != "x")
    np.testing.assert_array_equal(inits[last.input[1]], w2)     # nothing folded into it
    assert any(pattern.__name__.split("_")[0] in note for note in result.report.notes)
    kernel = PATTERNS[pattern]
    if kernel is not None:
        assert optimized_ops(model)[kernel] == 1
        assert optimized_ops(fused)[kernel] == 1


def test_a_scale_outside_any_pattern_still_folds():
    def relu_half(b, x):
        return b.op("Mul", [b.op("Relu", [x]), b.const(0.5)])

    model, _, w2 = Block().model(relu_half)
    fused = repfuse.fuse_onnx(model).model
    assert not any(n.op_type == "Mul" for n in fused.graph.node)
    conv = next(n for n in fused.graph.node if n.op_type == "Conv" and n.input[0] != "x")
    weight = next(numpy_helper.to_array(t) for t in fused.graph.initializer
                  if t.name == conv.input[1])
    np.testing.assert_allclose(weight, w2 * 0.5, rtol=1e-6)


def test_a_constant_not_matching_the_pattern_is_not_kept():
    def almost_gelu(b, x):      # * 0.4 instead of * 0.5: not a GELU, the scale folds
        a = b.op("Add", [b.op("Erf", [b.op("Div", [x, b.const(math.sqrt(2))])]),
                         b.const(1.0)])
        return b.op("Mul", [b.op("Mul", [x, a]), b.const(0.4)])

    model, _, _ = Block().model(almost_gelu)
    result = repfuse.fuse_onnx(model)
    assert [n.op_type for n in result.model.graph.node].count("Mul") == 1
    assert not any("gelu" in note for note in result.report.notes)


# ---------------------------------------------------------------------- clean output
def assert_clean(model: onnx.ModelProto) -> None:
    """Nothing that a graph cleaner (onnxslim, onnxsim) would remove."""
    g = model.graph
    read = collections.Counter(i for n in g.node for i in n.input if i)
    outputs = {o.name for o in g.output}
    for n in g.node:
        assert any(o in read or o in outputs for o in n.output), f"dead node {n.name}"
        assert n.op_type not in ("Identity", "Constant"), f"{n.op_type} node {n.name}"
    inits = {t.name: t for t in g.initializer}
    assert all(name in read for name in inits), "unused initializer"
    produced = {o for n in g.node for o in n.output}
    assert all(v.name in produced for v in g.value_info)
    for n in g.node:
        if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]:
            assert np.any(numpy_helper.to_array(inits[n.input[2]])), "all-zero Conv bias"


def _slim_changes(model: onnx.ModelProto) -> dict:
    onnxslim = pytest.importorskip("onnxslim")
    slim = onnxslim.slim(onnx.ModelProto.FromString(model.SerializeToString()))

    def summary(m):
        return (collections.Counter(n.op_type for n in m.graph.node), len(m.graph.initializer),
                sum(int(np.prod(t.dims)) for t in m.graph.initializer))
    before, after = summary(model), summary(slim)
    return {} if before == after else {"before": before, "after": after}


def _unclean_model() -> onnx.ModelProto:
    """Constant nodes and an Identity copy of a parameter in the input, a region that
    becomes a conv without bias."""
    def scaled(b, x):
        return b.op("Mul", [b.op("Relu", [x]), b.const(0.5)])

    model, _, _ = Block(const_nodes=True).model(scaled)
    conv = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Conv")
    weight = model.graph.node[conv].input[1]
    model.graph.node.insert(conv, helper.make_node("Identity", [weight], ["w_copy"],
                                                   name="w_copy"))
    model.graph.node[conv + 1].input[1] = "w_copy"
    onnx.checker.check_model(model)
    assert {"Constant", "Identity"} <= {n.op_type for n in model.graph.node}
    return model


def test_output_has_nothing_left_to_remove():
    """The fused graph has no Constant or Identity node, no dead node, no unused
    initializer and no all-zero bias."""
    assert_clean(repfuse.fuse_onnx(_unclean_model()).model)


def test_onnxslim_finds_nothing_to_remove():
    """The same graph through onnxslim, where it is installed (not a dependency)."""
    assert not _slim_changes(repfuse.fuse_onnx(_unclean_model()).model)


def test_clean_output_keeps_graph_outputs_and_overridable_inputs():
    model, _, _ = Block().model(silu)
    model.graph.output.append(helper.make_tensor_value_info(model.graph.node[-2].output[0],
                                                            TensorProto.FLOAT, ["N", C, 8, 8]))
    fused = repfuse.fuse_onnx(model).model
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]


# ------------------------------------------------------------------ real exports
class GeluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.Conv2d(C, C, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(C), nn.BatchNorm2d(C)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.proj(self.act(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def _torchscript_export(model: nn.Module, x: torch.Tensor, fold: bool) -> onnx.ModelProto:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17,
                              do_constant_folding=fold, input_names=["x"])
    except Exception as exc:  # noqa: BLE001 - an exporter that is gone is not our failure
        pytest.skip(f"TorchScript ONNX exporter unavailable: {type(exc).__name__}")
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "constant-folded"])
def test_torchscript_export_keeps_its_gelu_and_fuses_the_branches(fold):
    torch.manual_seed(0)
    block = GeluBlock()
    with torch.no_grad():
        for bn in (block.bn_a, block.bn_b):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    model = _torchscript_export(block, torch.randn(1, C, 8, 8), fold)
    result = repfuse.fuse_onnx(model)
    assert optimized_ops(model)["Gelu"] == optimized_ops(result.model)["Gelu"] == 1
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["Conv"] == 2 and ops["BatchNormalization"] == 0
    assert_clean(result.model)


@pytest.mark.slow
def test_fastvit_torchscript_export_keeps_every_gelu():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("fastvit_t8", pretrained=False).eval()
    proto = _torchscript_export(model, torch.randn(1, 3, 64, 64), True)
    result = repfuse.fuse_onnx(proto)
    before, after = optimized_ops(proto), optimized_ops(result.model)
    assert after["Gelu"] == before["Gelu"] >= 16
    assert after["Conv"] + after.get("FusedConv", 0) < before["Conv"] + before["FusedConv"]
    assert_clean(result.model)


def test_a_norm_no_region_holds_is_reported_with_its_reason(tmp_path):
    """A BatchNormalization after a Concat of convs (MixConv) stays in the ONNX graph: the
    report says so and why, instead of '0 left alone'."""
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.b = nn.Conv2d(4, 4, 5, padding=2, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            x1, x2 = x.split(4, 1)
            return torch.relu(self.bn(torch.cat([self.a(x1), self.b(x2)], 1)))

    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 8)
    path = tmp_path / "mix.onnx"
    repfuse.export_onnx(Mix().eval(), x, path, dynamic_batch=False)
    report = repfuse.fuse_onnx(onnx.load(str(path))).report
    norms = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    assert len(report.skipped) == len(norms) == 1
    assert "Concat" in report.skipped[0].reason and "join" in report.skipped[0].reason
