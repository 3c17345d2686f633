"""Random blocks of the layers beyond Conv2d for fuzzing: Linear / BatchNorm1d on vectors
and tokens, Conv1d on sequences, ConvTranspose2d on images.

One ``LayerSpec`` describes a block: parallel branches (a layer with a BN before and / or
after it, a bias, a scalar or per-channel scale, a negation; identity and BN branches),
combined by a sum, an average or a channel concat, optionally followed by a BN and an
activation. Tokens' BatchNorm1d runs through transposes or through a flatten and
``reshape_as`` (as real models write them). Some blocks cannot be fused exactly (strided
or padded transposed convs after a BN, padded convs after a biased BN, misaligned
branches, reflect padding): the passes must leave those alone.

``LayerSpec.module()`` builds it as an ``nn.Module`` and ``LayerSpec.onnx(opset)`` as an
ONNX graph of the same function (same weights), or None where ONNX has no such graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st


@dataclass
class LayerBranch:
    kind: str                      # "layer" | "identity" | "bn"
    kernel: int = 1
    padding: tuple[int, int] = (0, 0)       # (lo, hi) for conv1d; (p, output padding) deconv
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    pre_bn: bool = False
    bn: bool = False
    scale: str = "none"            # "none" | "scalar" | "channel"
    negate: bool = False
    padding_mode: str = "zeros"


@dataclass
class LayerSpec:
    kind: str                      # "linear" | "conv1d" | "deconv"
    cin: int
    cout: int
    stride: int = 1
    size: int = 5                  # L of tokens / sequences, H = W - 1 of images
    tokens: bool = False           # linear: (N, L, C) instead of (N, C)
    pooled: str = ""               # linear on (N, C): from (N, C, H, W) through a BN2d and
                                   # "mean" (x.mean((2, 3))) or "adaptive" (pool + flatten)
    norm_style: str = "transpose"  # tokens' BatchNorm1d: "transpose" | "flatten"
    branches: list[LayerBranch] = field(default_factory=list)
    combine: str = "add"           # "add" | "average" | "concat"
    post_bn: bool = False
    act: str = "relu"
    seed: int = 0

    @property
    def out_channels(self) -> int:
        return self.cout * len(self.branches) if self.combine == "concat" else self.cout

    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            if self.pooled:
                return (3, self.cin, self.size - 1, self.size)
            return (2, self.size, self.cin) if self.tokens else (3, self.cin)
        if self.kind == "conv1d":
            return (2, self.cin, self.size)
        return (2, self.cin, self.size - 1, self.size)

    def example_input(self, dtype=torch.float64) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.input_shape(), generator=g, dtype=dtype)

    def module(self) -> nn.Module:
        return LayerBlock(self)

    def onnx(self, opset: int = 18):
        return _to_onnx(self, self.module(), opset)


def _extent(br: LayerBranch) -> int:
    """How much longer than ``(size - 1) * stride + 1`` a transposed branch's output is."""
    p, op = br.padding
    return br.dilation * (br.kernel - 1) - 2 * p + op


def _layer_branch(draw, kind: str, cin: int, cout: int, stride: int,
                  extent: int | None = None) -> LayerBranch:
    common = dict(bias=draw(st.booleans()), bn=draw(st.booleans()),
                  pre_bn=draw(st.integers(0, 3)) == 0,
                  scale=draw(st.sampled_from(["none", "none", "scalar", "channel"])),
                  negate=draw(st.integers(0, 5)) == 0)
    if kind == "linear":
        return LayerBranch("layer", **common)
    divisors = [g for g in (1, 2, cin) if cin % g == 0 and cout % g == 0]
    groups = draw(st.sampled_from(divisors))
    k, d = draw(st.integers(1, 4)), draw(st.sampled_from([1, 1, 2]))
    if kind == "conv1d":
        total = d * (k - 1)
        lo = total // 2 + (1 if draw(st.integers(0, 9)) == 0 and total else 0)
        return LayerBranch("layer", k, (min(lo, total), total - min(lo, total)), d, groups,
                           padding_mode="reflect" if draw(st.integers(0, 12)) == 0
                           else "zeros", **common)
    op = draw(st.integers(0, max(stride, d) - 1))
    # at most half the taps' reach (plus the output padding) cropped: the output is never
    # shorter than (size - 1) * stride + 1, so every input size gives a valid layer
    p = draw(st.integers(0, (d * (k - 1) + op) // 2))
    if extent is not None:  # the output size of the first branch: (k, d, p, op) to match
        options = [(k, d, (d * (k - 1) + op - extent) // 2, op) for k in range(1, 5)
                   for d in (1, 2) for op in range(max(stride, d))
                   if (d * (k - 1) + op - extent) % 2 == 0
                   and 0 <= (d * (k - 1) + op - extent) // 2 <= d * (k - 1)]
        k, d, p, op = draw(st.sampled_from(options))
    return LayerBranch("layer", k, (p, op), d, groups, **common)


@st.composite
def layer_block_specs(draw) -> LayerSpec:
    kind = draw(st.sampled_from(["linear", "linear", "conv1d", "deconv"]))
    cin = draw(st.sampled_from([2, 4, 6]))
    cout = cin if draw(st.booleans()) else draw(st.sampled_from([2, 4, 8]))
    stride = 1 if kind == "linear" else draw(st.sampled_from([1, 1, 2, 3]))
    combine = draw(st.sampled_from(["add", "add", "average", "concat"]))
    if combine == "concat":
        cout = cin
    branches = []
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["layer", "layer", "layer"]
        if cin == cout and stride == 1 and kind != "deconv":
            kinds += ["identity", "bn"]
        branch_kind = draw(st.sampled_from(kinds))
        if branch_kind == "layer":
            first = next((b for b in branches if b.kind == "layer"), None)
            extent = _extent(first) if kind == "deconv" and first is not None else None
            branches.append(_layer_branch(draw, kind, cin, cout, stride, extent))
        else:
            branches.append(LayerBranch(branch_kind, bn=branch_kind == "bn",
                                        scale=draw(st.sampled_from(["none", "channel"])),
                                        negate=draw(st.integers(0, 5)) == 0))
    tokens = draw(st.booleans())
    pooled = "" if tokens or kind != "linear" else draw(st.sampled_from(
        ["", "", "mean", "adaptive"]))
    return LayerSpec(kind, cin, cout, stride, draw(st.integers(4, 8)),
                     tokens=tokens, pooled=pooled,
                     norm_style=draw(st.sampled_from(["transpose", "flatten"])),
                     branches=branches, combine=combine,
                     post_bn=combine != "concat" and draw(st.booleans()),
                     act=draw(st.sampled_from(["relu", "none"])),
                     seed=draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------------------- torch
def _bn(cls, channels: int, g: torch.Generator) -> nn.Module:
    bn = cls(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(channels, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.3)
    return bn


def _norm(spec: LayerSpec, bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A BatchNorm on the channel axis: through transposes or a flatten for tokens."""
    if not (spec.kind == "linear" and spec.tokens):
        return bn(y)
    if spec.norm_style == "transpose":
        return bn(y.transpose(1, 2)).transpose(1, 2)
    return bn(y.flatten(0, 1)).reshape_as(y)


class LayerBranchModule(nn.Module):
    def __init__(self, spec: LayerSpec, br: LayerBranch, g: torch.Generator):
        super().__init__()
        self.spec, self.br = spec, br
        bn_cls = nn.BatchNorm2d if spec.kind == "deconv" else nn.BatchNorm1d
        cin, cout, s = spec.cin, spec.cout, spec.stride
        self.pre = _bn(bn_cls, cin, g) if br.pre_bn else None
        if br.kind != "layer":
            self.layer = None
        elif spec.kind == "linear":
            self.layer = nn.Linear(cin, cout, bias=br.bias)
        elif spec.kind == "conv1d":
            lo, hi = br.padding
            self.layer = nn.Conv1d(cin, cout, br.kernel, s, lo if lo == hi else 0, br.dilation,
                                   br.groups, bias=br.bias,
                                   padding_mode=br.padding_mode if lo == hi else "zeros")
        else:
            p, op = br.padding
            self.layer = nn.ConvTranspose2d(cin, cout, br.kernel, s, p, op, br.groups,
                                            bias=br.bias, dilation=br.dilation)
        if self.layer is not None:
            with torch.no_grad():
                for t in self.layer.parameters():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.4)
        self.bn = _bn(bn_cls, cout, g) if br.bn else None
        shape = {"linear": (cout,), "conv1d": (cout, 1), "deconv": (cout, 1, 1)}[spec.kind]
        self.gamma = nn.Parameter(torch.rand(shape, generator=g) + 0.5) \
            if br.scale == "channel" else None
        self.alpha = float(torch.rand((), generator=g) + 0.5) if br.scale == "scalar" else None

    def forward(self, x):
        y = _norm(self.spec, self.pre, x) if self.pre is not None else x
        if self.layer is not None:
            lo, hi = self.br.padding
            if self.spec.kind == "conv1d" and lo != hi:
                y = F.pad(y, (lo, hi))
            y = self.layer(y)
        if self.bn is not None:
            y = _norm(self.spec, self.bn, y)
        if self.gamma is not None:
            y = y * self.gamma
        if self.alpha is not None:
            y = y * self.alpha
        return -y if self.br.negate else y


class LayerBlock(nn.Module):
    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        self.head_norm = _bn(nn.BatchNorm2d, spec.cin, g) if spec.pooled else None
        self.branches = nn.ModuleList([LayerBranchModule(spec, b, g) for b in spec.branches])
        bn_cls = nn.BatchNorm2d if spec.kind == "deconv" else nn.BatchNorm1d
        self.post = _bn(bn_cls, spec.out_channels, g) if spec.post_bn else None
        self.eval()

    def forward(self, x):
        if self.head_norm is not None:   # BN2d -> global pool -> flatten -> the Linear block
            x = self.head_norm(x)
            x = x.mean((2, 3)) if self.spec.pooled == "mean" else \
                F.adaptive_avg_pool2d(x, 1).flatten(1)
        outs = [b(x) for b in self.branches]
        if self.spec.combine == "concat":
            channels_last = self.spec.kind == "linear"
            y = torch.cat(outs, dim=-1 if channels_last else 1)
        else:
            y = outs[0]
            for o in outs[1:]:
                y = y + o
            if self.spec.combine == "average":
                y = y / len(outs)
        if self.post is not None:
            y = _norm(self.spec, self.post, y)
        return F.relu(y) if self.spec.act == "relu" else y


# ---------------------------------------------------------------------------- ONNX
class _Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, array):
        from onnx import numpy_helper

        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def ints(self, values):
        from onnx import numpy_helper

        self.n += 1
        name = f"i{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def node(self, op, inputs, **attrs):
        from onnx import helper

        self.n += 1
        out = f"{op.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _onnx_norm(g: _Graph, spec: LayerSpec, bn, y: str) -> str:
    def batch_norm(v):
        return g.node("BatchNormalization", [
            v, g.const(bn.weight.detach().numpy()), g.const(bn.bias.detach().numpy()),
            g.const(bn.running_mean.numpy()), g.const(bn.running_var.numpy())], epsilon=bn.eps)
    if not (spec.kind == "linear" and spec.tokens):
        return batch_norm(y)
    if spec.norm_style == "transpose":
        t = g.node("Transpose", [y], perm=[0, 2, 1])
        return g.node("Transpose", [batch_norm(t)], perm=[0, 2, 1])
    flat = g.node("Reshape", [y, g.ints([-1, bn.num_features])])
    return g.node("Reshape", [batch_norm(flat), g.ints([-1, spec.size, bn.num_features])])


def _onnx_layer(g: _Graph, spec: LayerSpec, m: LayerBranchModule, y: str) -> str:
    layer, br = m.layer, m.br
    w = layer.weight.detach().numpy()
    b = [g.const(layer.bias.detach().numpy())] if layer.bias is not None else []
    if spec.kind == "linear":
        if not spec.tokens:
            return g.node("Gemm", [y, g.const(w)] + b, transB=1)
        out = g.node("MatMul", [y, g.const(w.T)])
        return g.node("Add", [out] + b) if b else out
    if spec.kind == "conv1d":
        lo, hi = br.padding
        return g.node("Conv", [y, g.const(w)] + b, kernel_shape=[br.kernel],
                      strides=[spec.stride], pads=[lo, hi], dilations=[br.dilation],
                      group=br.groups)
    p, op = br.padding
    return g.node("ConvTranspose", [y, g.const(w)] + b, kernel_shape=[br.kernel] * 2,
                  strides=[spec.stride] * 2, pads=[p] * 4, output_padding=[op] * 2,
                  dilations=[br.dilation] * 2, group=br.groups)


def _to_onnx(spec: LayerSpec, block: LayerBlock, opset: int):
    """The same block written directly as an ONNX graph (same weights)."""
    import onnx
    from onnx import TensorProto, helper

    if any(b.padding_mode != "zeros" for b in spec.branches):
        return None   # reflect padding is a Pad(mode=reflect) in ONNX: not generated
    if spec.kind == "deconv" and any(b.padding[1] >= spec.stride for b in spec.branches
                                     if b.kind == "layer"):
        return None   # ONNX Runtime needs output_padding < stride (torch: < dilation too)
    g = _Graph()
    outs = []
    x = "x"
    if block.head_norm is not None:
        x = _onnx_norm(g, spec, block.head_norm, x)
        if spec.pooled == "mean":
            x = g.node("ReduceMean", [x], axes=[2, 3], keepdims=0) if opset < 18 else \
                g.node("ReduceMean", [x, g.ints([2, 3])], keepdims=0)
        else:
            x = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    for m in block.branches:
        y = _onnx_norm(g, spec, m.pre, x) if m.pre is not None else x
        if m.layer is not None:
            y = _onnx_layer(g, spec, m, y)
        elif y == x:
            y = g.node("Identity", [y])
        if m.bn is not None:
            y = _onnx_norm(g, spec, m.bn, y)
        if m.gamma is not None:
            y = g.node("Mul", [y, g.const(m.gamma.detach().numpy())])
        if m.alpha is not None:
            y = g.node("Mul", [y, g.const(np.float32(m.alpha))])
        outs.append(g.node("Neg", [y]) if m.br.negate else y)
    if spec.combine == "concat":
        y = g.node("Concat", outs, axis=-1 if spec.kind == "linear" else 1)
    else:
        y = outs[0]
        for o in outs[1:]:
            y = g.node("Add", [y, o])
        if spec.combine == "average":
            y = g.node("Div", [y, g.const(np.float32(len(outs)))])
    if block.post is not None:
        y = _onnx_norm(g, spec, block.post, y)
    if spec.act == "relu":
        y = g.node("Relu", [y])
    g.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    shape = ["N", *spec.input_shape()[1:]]
    graph = helper.make_graph(
        g.nodes, "fuzz_layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       [f"d{i}" for i in range(len(shape))])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
