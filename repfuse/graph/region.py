"""The front-end-neutral expression of a linear region.

A region has one input value and one output value. Front ends (``fx.py``,
``onnx.py``) build an expression tree out of the node types below; ``reduce``
turns it into one ``AffineConv`` using only the algebra. Tensors held by nodes
are the model's own tensors (live ``nn.Parameter`` objects in the fx front end),
so the map from branch parameters to the fused kernel can be differentiated.

Node kinds (all activations are NCHW, all weights in torch's layout):

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
========== ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from repfuse.core.spec import ConvSpec, Pad4, Pair


@dataclass(eq=False)
class Node:
    """Base class; nodes compare and hash by identity (a DAG may share nodes)."""


@dataclass(eq=False)
class Input(Node):
    channels: int


@dataclass(eq=False)
class Conv(Node):
    input: Node
    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec
    name: str = ""


@dataclass(eq=False)
class BatchNorm(Node):
    input: Node
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    name: str = ""


@dataclass(eq=False)
class AvgPool(Node):
    input: Node
    kernel_size: Pair
    stride: Pair
    padding: Pad4 | Pair | int = 0
    count_include_pad: bool = True
    ceil_mode: bool = False
    divisor_override: int | None = None
    name: str = ""


@dataclass(eq=False)
class Scale(Node):
    input: Node
    factor: float | Tensor
    name: str = ""


@dataclass(eq=False)
class Shift(Node):
    input: Node
    value: float | Tensor
    name: str = ""


@dataclass(eq=False)
class Add(Node):
    inputs: tuple[Node, ...] = field(default_factory=tuple)


@dataclass(eq=False)
class Sub(Node):
    left: Node
    right: Node


@dataclass(eq=False)
class Neg(Node):
    input: Node


@dataclass(eq=False)
class Concat(Node):
    inputs: tuple[Node, ...] = field(default_factory=tuple)


@dataclass(eq=False)
class Pad(Node):
    input: Node
    padding: Pad4
    value: float | Tensor = 0.0
    name: str = ""
