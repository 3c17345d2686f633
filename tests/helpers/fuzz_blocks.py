"""Random multi-branch blocks for fuzzing the fusion passes.

One ``BlockSpec`` describes a block: parallel branches from every supported branch
kind (kxk / rectangular / dilated / grouped / strided conv with or without BN and
bias, a 1x1 -> kxk sequence, identity, BN identity, average pool, scaled and
negated branches), combined by a sum or a channel concat, optionally followed by a
BN and an activation. Some combinations cannot be fused exactly (misaligned grids,
reflect padding mixed with zeros, bias pushed through zero padding, a shared conv
used twice, a nonlinearity inside a branch); the passes must leave those alone.

``BlockSpec.module()`` builds it as an ordinary ``nn.Module`` and
``BlockSpec.onnx(opset)`` as an ONNX graph of the same function (same weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

# ---------------------------------------------------------------------------- spec


@dataclass
class Branch:
    kind: str                      # "conv" | "seq" | "identity" | "bn" | "avgpool"
    kernel: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, bottom, left, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    bn: bool = False
    scale: str = "none"            # "none" | "scalar" | "channel"
    negate: bool = False
    padding_mode: str = "zeros"
    relu_inside: bool = False      # a nonlinearity inside the branch
    count_include_pad: bool = True
    mid_bias: bool = False         # "seq": bias of the leading 1x1 conv


@dataclass
class BlockSpec:
    cin: int
    cout: int
    stride: int
    size: int
    branches: list[Branch] = field(default_factory=list)
    combine: str = "add"           # "add" | "concat"
    post_bn: bool = False
    act: str = "relu"              # "relu" | "none"
    share_first: bool = False      # the first conv module is used by two branches
    seed: int = 0

    @property
    def out_channels(self) -> int:
        if self.combine == "concat":
            return self.cout * len(self.branches)
        return self.cout

    def example_input(self, dtype=torch.float64) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(2, self.cin, self.size, self.size, generator=g, dtype=dtype)

    def module(self) -> nn.Module:
        return FuzzBlock(self)

    def onnx(self, opset: int = 18):
        return _to_onnx(self, self.module(), opset)


def _centred_padding(k: int, d: int) -> tuple[int, int]:
    total = d * (k - 1)
    return total // 2, total - total // 2


@st.composite
def block_specs(draw) -> BlockSpec:
    c = draw(st.sampled_from([2, 4, 6]))
    stride = draw(st.sampled_from([1, 1, 1, 2]))
    size = draw(st.integers(5, 9))
    combine = draw(st.sampled_from(["add", "add", "add", "concat"]))
    n = draw(st.integers(1, 4))
    same_channels = combine == "concat" or draw(st.booleans())
    cout = c if same_channels else draw(st.sampled_from([2, 4, 8]))
    misalign = draw(st.integers(0, 9)) == 0
    branches = []
    for _ in range(n):
        kinds = ["conv", "conv", "conv", "seq"]
        if cout == c and stride == 1:
            kinds += ["identity", "bn", "avgpool"]
        kind = draw(st.sampled_from(kinds))
        if kind in ("identity", "bn"):
            branches.append(Branch(kind, scale=draw(st.sampled_from(["none", "scalar",
                                                                      "channel"])),
                                   negate=draw(st.booleans())))
            continue
        if kind == "avgpool":
            k = draw(st.sampled_from([1, 3]))
            branches.append(Branch("avgpool", (k, k), (k // 2,) * 4,
                                   count_include_pad=draw(st.booleans()),
                                   bn=draw(st.booleans())))
            continue
        kh = draw(st.integers(1, 5))
        kw = draw(st.sampled_from([kh, kh, draw(st.integers(1, 5))]))
        dil = draw(st.sampled_from([(1, 1), (1, 1), (1, 1), (2, 2), (1, 2)]))
        t, b = _centred_padding(kh, dil[0])
        l, r = _centred_padding(kw, dil[1])
        if misalign:  # shift the window: same output size, other centre
            if b >= 1:
                t, b = t + 1, b - 1
            elif t >= 1:
                t, b = t - 1, b + 1
        divisors = [g for g in (1, 2, c) if c % g == 0 and cout % g == 0]
        groups = draw(st.sampled_from(divisors)) if kind == "conv" else 1
        branches.append(Branch(
            kind, (kh, kw), (t, b, l, r), dil, groups,
            bias=draw(st.booleans()), bn=draw(st.booleans()),
            scale=draw(st.sampled_from(["none", "none", "scalar", "channel"])),
            negate=draw(st.integers(0, 5)) == 0,
            padding_mode="reflect" if draw(st.integers(0, 15)) == 0 else "zeros",
            relu_inside=draw(st.integers(0, 15)) == 0,
            mid_bias=draw(st.booleans())))
    share_first = draw(st.integers(0, 12)) == 0
    if share_first and len(branches) >= 2 and branches[0].kind == "conv":
        first = branches[0]
        branches[1] = Branch(**{**first.__dict__, "bn": not first.bn, "negate": False})
    return BlockSpec(c, cout, stride, size, branches, combine,
                     post_bn=combine == "add" and draw(st.booleans()),
                     act=draw(st.sampled_from(["relu", "none"])),
                     share_first=share_first,
                     seed=draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------------------- torch


def _bn(channels: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(channels, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.3)
    return bn


def _randomize(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


class _PadConv(nn.Module):
    """A conv with per-side padding (explicit zero pad, then a padding-free conv)."""

    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]):
        super().__init__()
        self.padding = padding
        self.conv = conv

    def forward(self, x):
        t, b, l, r = self.padding
        return self.conv(F.pad(x, (l, r, t, b)))


class FuzzBranch(nn.Module):
    def __init__(self, spec: BlockSpec, br: Branch, g: torch.Generator, shared=None):
        super().__init__()
        self.br = br
        c, cout, s = spec.cin, spec.cout, spec.stride
        self.pre = None
        if br.kind in ("conv", "seq"):
            t, b, l, r = br.padding
            symmetric = t == b and l == r
            cin = c
            if br.kind == "seq":
                self.pre = nn.Conv2d(c, cout, 1, bias=br.mid_bias)
                _randomize(self.pre, g)
                cin = cout
            conv = shared if shared is not None else nn.Conv2d(
                cin, cout, br.kernel, s, (t, l) if symmetric else 0, br.dilation, br.groups,
                bias=br.bias, padding_mode=br.padding_mode if symmetric else "zeros")
            if shared is None:
                _randomize(conv, g)
            self.op = conv if symmetric else _PadConv(conv, br.padding)
        elif br.kind == "avgpool":
            self.op = nn.AvgPool2d(br.kernel, s, br.padding[0],
                                   count_include_pad=br.count_include_pad)
        else:
            self.op = nn.Identity()
        out = cout
        self.bn = _bn(out, g) if (br.bn or br.kind == "bn") else None
        self.gamma = None
        if br.scale == "channel":
            self.gamma = nn.Parameter(torch.rand(out, 1, 1, generator=g) + 0.5)
        self.alpha = float(torch.rand((), generator=g) + 0.5) if br.scale == "scalar" else None

    @property
    def conv(self):
        return getattr(self.op, "conv", self.op)

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        y = self.op(x)
        if self.br.relu_inside:
            y = F.relu(y)
        if self.bn is not None:
            y = self.bn(y)
        if self.gamma is not None:
            y = y * self.gamma
        if self.alpha is not None:
            y = y * self.alpha
        return -y if self.br.negate else y


class FuzzBlock(nn.Module):
    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        branches = []
        for i, br in enumerate(spec.branches):
            shared = None
            if spec.share_first and i == 1 and br.kind == "conv" \
                    and spec.branches[0].kind == "conv":
                shared = branches[0].conv
            branches.append(FuzzBranch(spec, br, g, shared))
        self.branches = nn.ModuleList(branches)
        self.post_bn = _bn(spec.out_channels, g) if spec.post_bn else None
        self.eval()

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.spec.combine == "concat":
            y = torch.cat(outs, dim=1)
        else:
            y = outs[0]
            for o in outs[1:]:
                y = y + o
        if self.post_bn is not None:
            y = self.post_bn(y)
        return F.relu(y) if self.spec.act == "relu" else y


# ---------------------------------------------------------------------------- ONNX


def _to_onnx(spec: BlockSpec, block: FuzzBlock, opset: int):
    """The same block written directly as an ONNX graph (same weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(array, prefix="c"):
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), n))
        return n

    def node(op, inputs, **attrs):
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(x, m: nn.Conv2d, pads):
        t, b, l, r = pads
        ins = [x, const(m.weight.detach().numpy(), "w")]
        if m.bias is not None:
            ins.append(const(m.bias.detach().numpy(), "b"))
        return node("Conv", ins, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                    pads=[t, l, b, r], dilations=list(m.dilation), group=m.groups)

    def bn(x, m: nn.BatchNorm2d):
        return node("BatchNormalization",
                    [x, const(m.weight.detach().numpy()), const(m.bias.detach().numpy()),
                     const(m.running_mean.numpy()), const(m.running_var.numpy())],
                    epsilon=m.eps)

    outs = []
    for fb in block.branches:
        br = fb.br
        if br.padding_mode != "zeros" and br.kind in ("conv", "seq"):
            return None  # reflect padding is expressed with Pad(mode=reflect): not generated
        y = "x"
        if fb.pre is not None:
            y = conv(y, fb.pre, (0, 0, 0, 0))
        if br.kind in ("conv", "seq"):
            y = conv(y, fb.conv, br.padding)
        elif br.kind == "avgpool":
            p = br.padding[0]
            y = node("AveragePool", [y], kernel_shape=list(br.kernel),
                     strides=[spec.stride] * 2, pads=[p] * 4,
                     count_include_pad=int(br.count_include_pad))
        elif br.kind in ("identity", "bn"):
            y = node("Identity", [y])
        if br.relu_inside:
            y = node("Relu", [y])
        if fb.bn is not None:
            y = bn(y, fb.bn)
        if fb.gamma is not None:
            y = node("Mul", [y, const(fb.gamma.detach().numpy()[None])])
        if fb.alpha is not None:
            y = node("Mul", [y, const(np.float32(fb.alpha))])
        if br.negate:
            y = node("Neg", [y])
        outs.append(y)
    if spec.combine == "concat":
        y = node("Concat", outs, axis=1)
    else:
        y = outs[0]
        for o in outs[1:]:
            y = node("Add", [y, o])
    if block.post_bn is not None:
        y = bn(y, block.post_bn)
    if spec.act == "relu":
        y = node("Relu", [y])
    nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "fuzz_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.cin, spec.size,
                                                                spec.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
