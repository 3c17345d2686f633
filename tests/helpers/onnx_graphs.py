"""A tiny ONNX graph builder and helpers to run and compare ONNX models."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper


class G:
    """A tiny graph builder: NCHW float input ``x`` with ``c`` channels."""

    def __init__(self, c: int = 4, seed: int = 0):
        self.c, self.nodes, self.inits, self.n = c, [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def const(self, array, as_node: bool = False):
        n = self.name("c")
        t = numpy_helper.from_array(np.asarray(array, dtype=np.float32), n)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [n], value=t))
        else:
            self.inits.append(t)
        return n

    def op(self, op, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k, pads=None, stride=1, group=1, dilation=1, bias=True):
        kh, kw = (k, k) if isinstance(k, int) else k
        if pads is None:
            pads = [dilation * (kh - 1) // 2, dilation * (kw - 1) // 2] * 2
        ins = [x, self.const(self.rng.standard_normal((cout, cin // group, kh, kw)) * 0.3)]
        if bias:
            ins.append(self.const(self.rng.standard_normal(cout) * 0.1))
        return self.op("Conv", ins, kernel_shape=[kh, kw], pads=pads, strides=[stride] * 2,
                       group=group, dilations=[dilation] * 2)

    def bn(self, x, c, as_nodes: bool = False):
        r = self.rng
        return self.op("BatchNormalization", [
            x, self.const(r.random(c) + 0.5, as_nodes), self.const(r.standard_normal(c) * .3,
                                                                   as_nodes),
            self.const(r.standard_normal(c) * .5, as_nodes),
            self.const(r.random(c) * 1.5 + .5, as_nodes)], epsilon=1e-3)

    def model(self, y, opset: int = 18, outputs=(), batch="N", size: int = 8):
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, self.c, size, size])],
            [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["N", "C", "H", "W"])
             for v in (y, *outputs)],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def run(model, x):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def ops(model):
    return [n.op_type for n in model.graph.node]


def assert_same(original, fused, batch=2, size=8, c=4, rtol=1e-5):
    x = np.random.default_rng(7).standard_normal((batch, c, size, size)).astype(np.float32)
    for a, b in zip(run(original, x), run(fused, x)):
        assert a.shape == b.shape
        assert rel_err(a, b) <= rtol


def repvgg_block(opset=18, const_nodes=False):
    g = G(4)
    a = g.conv("x", 4, 4, 3, bias=False)
    a = g.bn(a, 4, const_nodes)
    b = g.bn(g.conv("x", 4, 4, 1, bias=False), 4, const_nodes)
    y = g.op("Sum", [a, b, g.bn("x", 4, const_nodes)])
    return g, g.model(g.op("Relu", [y]), opset)


def torchscript_export(model, x, opset):
    """A TorchScript-exporter ONNX model without constant folding (BN nodes kept)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, do_constant_folding=False,
                          opset_version=opset, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def ort_run(model, x):
    """The first output of ``model`` on ``x`` with onnxruntime, optimizations off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
