"""The node types of a region expression, each declaring its own facts once.

A region has one input value and one output value. Front ends (``repfuse.fx``,
``repfuse.onnx``) build an expression tree out of these nodes; ``region.reduce`` turns it
into one ``AffineConv`` using only the algebra, and ``region.reference.evaluate`` runs the
training form with torch ops, independently, for the proofs. Tensors held by nodes are the
model's own tensors (live ``nn.Parameter`` objects in the fx front end), so the map from
branch parameters to the fused kernel can be differentiated.

Facts each node type declares once, with ``@node_type(...)`` (class attributes, read by
``region.tree`` and the shared rules):

* ``links``: the fields holding child nodes (a tuple-valued field holds several);
* ``tensors``: the tensor fields the fused kernel is differentiable in (its parameters);
* ``bias_carrier``: the field whose tensor acts as a bias (it would pass through the zero
  padding of a later conv), or None;
* ``dtype_fields`` / ``dtype_rank``: where the region's dtype and device are read from
  (lower rank first: convs, then norms, then constants);
* ``kind``: its operation kind (``region.op.OpKind``), for the shared worth-fusing rule;
* ``layouts``: the value layouts (``region.layout``) its inputs may have; ``out_layout``
  (a method a node type may override) checks the inputs' layouts and gives the output's.

Every node type also registers a reducer (``region.reduce``), a reference evaluator
(``region.reference``) and a description (``region.describe``);
``region.registry.missing_rules`` names any that is missing.

Node types (weights in torch's layout; activations in the layouts of ``region.layout``):

============= ============================================================================
Input         the region's input value and its layout (the identity branch is ``Input``)
Conv          forward conv with a parameter weight (O, I/g, KH, KW) on NCHW, or a Conv1d's
              (O, I/g, K) on NCL (its spec has kernel (1, K): one row); optional bias
ConvTranspose transposed conv, weight (I, O/g, KH, KW), on NCHW; optional bias
Linear        ``F.linear`` with a weight (O, I) on the last axis (NC, NLC, NHWC)
BatchNorm     eval-mode batch norm with running statistics (axis 1: NCHW, NCL, NC)
AvgPool       average pooling (a depthwise conv with constant taps)
Scale         multiply by a scalar or a per-channel (C,) tensor along axis ``dim`` (div: 1/c)
Shift         add a scalar or a per-channel (C,) constant along axis ``dim``
Add           elementwise sum of two or more branches
Sub, Neg      difference, negation
Concat        concatenation of branches along the channel axis ``dim``
Pad           constant padding (scalar or per-channel value) of the spatial dims
Crop          cropping of the spatial dims (slicing ``x[..., t:H-b, l:W-r]``)
GlobalPool    mean over H and W (``keepdim``: (N, C, 1, 1), else (N, C))
Transpose     a permutation that moves the channel axis (NCL <-> NLC, NCHW <-> NHWC)
Flatten       merge the leading axes of a channels-last value: (N, L, C) -> (N * L, C);
              ``start=1``: a pooled (N, C, 1, 1) value to (N, C)
Unflatten     the inverse: reshape to the shape of ``like`` (``reshape_as``)
============= ============================================================================

A tensor field may hold a ``region.computed.Computed`` value instead (a kernel, scale or
pad value computed in forward from parameters and buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from repfuse.core.spec import ConvSpec, Pad4, Pair
from repfuse.errors import NotFusable
from repfuse.region import layout as L
from repfuse.region.kinds import OpKind


@dataclass(eq=False)
class Node:
    """Base class; nodes compare and hash by identity (a DAG may share nodes)."""

    links: ClassVar[tuple[str, ...]] = ("input",)
    tensors: ClassVar[tuple[str, ...]] = ()
    bias_carrier: ClassVar[str | None] = None
    dtype_fields: ClassVar[tuple[str, ...]] = ()
    dtype_rank: ClassVar[int] = 3
    kind: ClassVar[OpKind] = OpKind.AFFINE
    layouts: ClassVar[frozenset[str]] = L.ALL

    def out_layout(self, inputs: list[str]) -> str:
        """The layout of this node's value, given its inputs' layouts (in ``links``
        order); raises ``NotFusable`` when they are not ones this node type accepts."""
        first = inputs[0]
        if any(lay != first for lay in inputs[1:]):
            raise NotFusable(f"combines values laid out as {', '.join(inputs)}")
        if first not in self.layouts:
            raise NotFusable(f"{type(self).__name__} does not apply to a {first} value "
                             f"(only {', '.join(sorted(self.layouts))})")
        return first


def node_type(kind: OpKind, *, links: tuple[str, ...] = ("input",),
              tensors: tuple[str, ...] = (), bias_carrier: str | None = None,
              dtype_fields: tuple[str, ...] = (), dtype_rank: int = 3,
              layouts: frozenset[str] = L.ALL):
    """Declare a node type: its facts (see the module docstring) and its dataclass fields."""
    def declare(cls):
        cls.kind, cls.links, cls.tensors, cls.bias_carrier = kind, links, tensors, bias_carrier
        cls.dtype_fields, cls.dtype_rank, cls.layouts = dtype_fields, dtype_rank, layouts
        return dataclass(eq=False)(cls)
    return declare


def _check_channel_axis(node: Node, layout: str, dim: int, what: str) -> None:
    if L.normalized_axis(dim, layout) != L.channel_axis(layout):
        raise NotFusable(f"{what} along axis {dim} of a {layout} value, which is not its "
                         "channel axis")


@node_type(OpKind.PASS, links=())
class Input(Node):
    channels: int
    layout: str = "NCHW"

    def out_layout(self, inputs: list[str]) -> str:
        return self.layout


@node_type(OpKind.CONV, tensors=("weight", "bias"), bias_carrier="bias",
           dtype_fields=("weight",), dtype_rank=0, layouts=frozenset({"NCHW", "NCL"}))
class Conv(Node):
    input: Node
    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec
    name: str = ""

    def out_layout(self, inputs: list[str]) -> str:
        want = "NCL" if self.weight.dim() == 3 else "NCHW"
        if inputs[0] != want:
            raise NotFusable(f"a conv with a {self.weight.dim()}-D weight does not apply to a "
                             f"{inputs[0]} value")
        return want


@node_type(OpKind.CONV, tensors=("weight", "bias"), bias_carrier="bias",
           dtype_fields=("weight",), dtype_rank=0, layouts=frozenset({"NCHW"}))
class ConvTranspose(Node):
    input: Node
    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec
    name: str = ""


@node_type(OpKind.CONV, tensors=("weight", "bias"), bias_carrier="bias",
           dtype_fields=("weight",), dtype_rank=0, layouts=L.CHANNEL_LAST)
class Linear(Node):
    input: Node
    weight: Tensor
    bias: Tensor | None
    name: str = ""


@node_type(OpKind.NORM, tensors=("weight", "bias"), bias_carrier="bias",
           dtype_fields=("weight", "running_mean"), dtype_rank=1, layouts=L.CHANNEL_FIRST)
class BatchNorm(Node):
    input: Node
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    name: str = ""


@node_type(OpKind.POOL, layouts=frozenset({"NCHW"}))
class AvgPool(Node):
    input: Node
    kernel_size: Pair
    stride: Pair
    padding: Pad4 | Pair | int = 0
    count_include_pad: bool = True
    ceil_mode: bool = False
    divisor_override: int | None = None
    name: str = ""


@node_type(OpKind.AFFINE, tensors=("factor",), dtype_fields=("factor",), dtype_rank=2)
class Scale(Node):
    input: Node
    factor: float | Tensor
    name: str = ""
    dim: int = 1    # the axis a per-channel factor runs along

    def out_layout(self, inputs: list[str]) -> str:
        if isinstance(self.factor, Tensor) and self.factor.numel() > 1:
            _check_channel_axis(self, inputs[0], self.dim, "scales")
        return inputs[0]


@node_type(OpKind.AFFINE, tensors=("value",), bias_carrier="value", dtype_fields=("value",),
           dtype_rank=2)
class Shift(Node):
    input: Node
    value: float | Tensor
    name: str = ""
    dim: int = 1    # the axis a per-channel value runs along

    def out_layout(self, inputs: list[str]) -> str:
        if isinstance(self.value, Tensor) and self.value.numel() > 1:
            _check_channel_axis(self, inputs[0], self.dim, "shifts")
        return inputs[0]


@node_type(OpKind.COMBINE, links=("inputs",))
class Add(Node):
    inputs: tuple[Node, ...] = field(default_factory=tuple)


@node_type(OpKind.COMBINE, links=("left", "right"))
class Sub(Node):
    left: Node
    right: Node


@node_type(OpKind.AFFINE)
class Neg(Node):
    input: Node


@node_type(OpKind.COMBINE, links=("inputs",))
class Concat(Node):
    inputs: tuple[Node, ...] = field(default_factory=tuple)
    dim: int = 1

    def out_layout(self, inputs: list[str]) -> str:
        out = super().out_layout(inputs)
        _check_channel_axis(self, out, self.dim, "concatenates")
        return out


@node_type(OpKind.PAD, tensors=("value",), dtype_fields=("value",), dtype_rank=2,
           layouts=frozenset({"NCHW"}))
class Pad(Node):
    input: Node
    padding: Pad4
    value: float | Tensor = 0.0
    name: str = ""
    # True: pad with the value the input branch gives for a zero input (DBB's BN-and-pad);
    # ``value`` is then ignored.
    zero_response: bool = False


@node_type(OpKind.CROP, layouts=frozenset({"NCHW"}))
class Crop(Node):
    input: Node
    crop: Pad4                  # rows and columns removed: (top, bottom, left, right)
    name: str = ""


#: (kind PASS: the pool stays, in front of the fused layer; it is not fused away)
@node_type(OpKind.PASS, layouts=frozenset({"NCHW"}))
class GlobalPool(Node):
    input: Node
    keepdim: bool = False
    name: str = ""

    def out_layout(self, inputs: list[str]) -> str:
        return super().out_layout(inputs) if self.keepdim else "NC"


@node_type(OpKind.PASS)
class Transpose(Node):
    input: Node
    perm: tuple[int, ...]

    def out_layout(self, inputs: list[str]) -> str:
        out = L.PERMUTATIONS.get((inputs[0], tuple(self.perm)))
        if out is None:
            raise NotFusable(f"permutes a {inputs[0]} value by {list(self.perm)}, which does "
                             "not just move its channel axis")
        return out


@node_type(OpKind.PASS, layouts=frozenset({"NLC", "NHWC"}))
class Flatten(Node):
    input: Node
    start: int = 0      # 0: merge the leading axes; 1: the (1, 1) spatial axes of NCHW

    def out_layout(self, inputs: list[str]) -> str:
        if self.start == 1 and inputs[0] != "NCHW":
            raise NotFusable(f"flattens the trailing axes of a {inputs[0]} value")
        if self.start != 1:
            super().out_layout(inputs)
        return "NC"


@node_type(OpKind.PASS, links=("input", "like"))
class Unflatten(Node):
    input: Node
    like: Node

    def out_layout(self, inputs: list[str]) -> str:
        if inputs[0] != "NC" or inputs[1] not in ("NLC", "NHWC"):
            raise NotFusable(f"reshapes a {inputs[0]} value like a {inputs[1]} one (only "
                             "(N * L, C) back to the tokens it was flattened from)")
        return inputs[1]


__all__ = ["Add", "AvgPool", "BatchNorm", "Concat", "Conv", "ConvTranspose", "Crop", "Flatten",
           "GlobalPool", "Input", "Linear", "Neg", "Node", "Pad", "Scale", "Shift", "Sub",
           "Transpose", "Unflatten", "node_type", "node_types"]


def node_types() -> list[type[Node]]:
    """Every concrete node type (subclasses of ``Node``, recursively)."""
    out, stack = [], list(Node.__subclasses__())
    while stack:
        cls = stack.pop(0)
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out
