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
* ``kind``: its operation kind (``region.op.OpKind``), for the shared worth-fusing rule.

Every node type also registers a reducer (``region.reduce``), a reference evaluator
(``region.reference``) and a description (``region.describe``);
``region.registry.missing_rules`` names any that is missing.

Node types (all activations are NCHW, all weights in torch's layout):

========== ===============================================================
Input      the region's input value (the identity branch is just ``Input``)
Conv       forward conv with a parameter weight (O, I/g, KH, KW), optional bias
BatchNorm  eval-mode batch norm with running statistics
AvgPool    average pooling (a depthwise conv with constant taps)
Scale      multiply by a scalar or a per-channel (C,) tensor (div: 1/c)
Shift      add a scalar or a per-channel (C,) constant
Add        elementwise sum of two or more branches
Sub, Neg   difference, negation
Concat     concatenation of branches along channels
Pad        constant padding (scalar or per-channel value) of the spatial dims
Crop       cropping of the spatial dims (slicing ``x[..., t:H-b, l:W-r]``)
========== ===============================================================

A tensor field may hold a ``region.computed.Computed`` value instead (a kernel, scale or
pad value computed in forward from parameters and buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from repfuse.core.spec import ConvSpec, Pad4, Pair
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


def node_type(kind: OpKind, *, links: tuple[str, ...] = ("input",),
              tensors: tuple[str, ...] = (), bias_carrier: str | None = None,
              dtype_fields: tuple[str, ...] = (), dtype_rank: int = 3):
    """Declare a node type: its facts (see the module docstring) and its dataclass fields."""
    def declare(cls):
        cls.kind, cls.links, cls.tensors, cls.bias_carrier = kind, links, tensors, bias_carrier
        cls.dtype_fields, cls.dtype_rank = dtype_fields, dtype_rank
        return dataclass(eq=False)(cls)
    return declare


@node_type(OpKind.PASS, links=())
class Input(Node):
    channels: int


@node_type(OpKind.CONV, tensors=("weight", "bias"), bias_carrier="bias",
           dtype_fields=("weight",), dtype_rank=0)
class Conv(Node):
    input: Node
    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec
    name: str = ""


@node_type(OpKind.NORM, tensors=("weight", "bias"), bias_carrier="bias",
           dtype_fields=("weight", "running_mean"), dtype_rank=1)
class BatchNorm(Node):
    input: Node
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    name: str = ""


@node_type(OpKind.POOL)
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


@node_type(OpKind.AFFINE, tensors=("value",), bias_carrier="value", dtype_fields=("value",),
           dtype_rank=2)
class Shift(Node):
    input: Node
    value: float | Tensor
    name: str = ""


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


@node_type(OpKind.PAD, tensors=("value",), dtype_fields=("value",), dtype_rank=2)
class Pad(Node):
    input: Node
    padding: Pad4
    value: float | Tensor = 0.0
    name: str = ""
    # True: pad with the value the input branch gives for a zero input (DBB's BN-and-pad);
    # ``value`` is then ignored.
    zero_response: bool = False


@node_type(OpKind.CROP)
class Crop(Node):
    input: Node
    crop: Pad4                  # rows and columns removed: (top, bottom, left, right)
    name: str = ""


__all__ = ["Add", "AvgPool", "BatchNorm", "Concat", "Conv", "Crop", "Input", "Neg", "Node",
           "Pad", "Scale", "Shift", "Sub", "node_type", "node_types"]


def node_types() -> list[type[Node]]:
    """Every concrete node type (subclasses of ``Node``, recursively)."""
    out, stack = [], list(Node.__subclasses__())
    while stack:
        cls = stack.pop(0)
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out
