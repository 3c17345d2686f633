"""``AffineConv``: an affine convolution y = W * x + b with its ``ConvSpec``.

The convolution may be transposed (``spec.transposed``; weight (I, O/g, KH, KW)); its
``value_layout`` says how the model lays out the values it maps (``repfuse.region.layout``:
a Linear is a 1x1 conv on (N, C, 1, 1), a Conv1d a conv with one row), which decides the
torch layer ``to_module`` builds. Weights and biases are held in float64; ``dtype`` is the
dtype the result is cast back to by ``to_module``. Every operation in ``repfuse.algebra`` is
built from differentiable torch ops, so the map from branch parameters to (weight, bias)
can be differentiated with autograd (its adjoint is the re-parameterization's weight-grad
map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repfuse.core.layout import memory_order_flat
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable

WORK_DTYPE = torch.float64

def promote_dtypes(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a combination of branches is cast back to (torch's promotion)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _torch_pad(padding) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) as F.pad's (left, right, top, bottom)."""
    t, b, l, r = padding
    return (l, r, t, b)


def shapes_only(t: Tensor) -> bool:
    """Whether ``t`` has no values (the ``meta`` device): a shape-only run
    (``region.reduce_shapes``), in which operations give results of the right shape
    without computing them (a broadcast product on ``meta`` costs about a millisecond)."""
    return t.device.type == "meta"


def holds(flag: Tensor) -> bool:
    """``bool(flag.all())`` for a condition on tensor values; True for a tensor without
    values (the ``meta`` device): a shape-only run (``region.reduce_shapes``) takes every
    condition on values to hold, and the reduction with values decides it."""
    return shapes_only(flag) or bool(flag.all())


_BLOCK = 1 << 18  # elements per block of ``_cast_measured`` (2 MB of float64: in cache)
_OWN_ORDER = 1 << 14  # from this size a kernel not contiguous is cast in its memory order


def _cast_measured(exact: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``exact`` (float64, any memory format) cast to ``dtype`` as a new contiguous tensor,
    and the largest absolute rounding error of the cast (a float64 scalar tensor; NaN where
    a value is NaN, infinite where one overflows), in one pass over blocks of the first
    axis: each block is read from memory once, cast into the result, cast back into a
    reused buffer and subtracted while it is in cache. The error is exact: the rounding
    error of a cast from float64 is representable in float64. (A cast followed by a second
    pass subtracting the float32 result from the float64 kernel read both from memory
    again, and torch runs a subtraction that promotes float32 about 3x slower than one in a
    single dtype: 5.7 against 3.8 ms for a 768x768x3x3 kernel, 9.8 against 3.8 with glibc's
    default allocator, which maps a fresh temporary anew.) A block of a kernel that is not
    contiguous (a channels-last kernel of a proof's reduction) from ``_OWN_ORDER`` elements
    is cast and measured in its own memory order and only its cast copied into the
    contiguous result: element-wise work across two memory orders runs slower (a
    channels-last 256x256x3x3 kernel: 3.5 against 4.3 ms, 128x128x3x3: 0.66 against 0.93;
    casting the whole kernel in its order first took 3.0 ms, but held a second cast of it;
    below ``_OWN_ORDER`` the views cost more than they save)."""
    out = torch.empty(exact.shape, dtype=dtype, device=exact.device)
    if exact.numel() == 0 or dtype == WORK_DTYPE:
        out.copy_(exact)
        return out, torch.zeros((), dtype=WORK_DTYPE, device=exact.device)
    own = exact.numel() >= _OWN_ORDER and not exact.is_contiguous()
    if exact.numel() <= _BLOCK and not own:   # one block: a third of the operations below
        out.copy_(exact)
        lo, hi = torch.aminmax(out.to(WORK_DTYPE).sub_(exact))
        return out, torch.maximum(-lo, hi)
    worst = torch.zeros((), dtype=WORK_DTYPE, device=exact.device)
    rows = exact.shape[0]
    step = max(1, _BLOCK // max(1, exact[0].numel()))
    buf = torch.empty(min(step, rows) * exact[0].numel(), dtype=WORK_DTYPE,
                      device=exact.device)
    for start in range(0, rows, step):
        src, dst = exact[start:start + step], out[start:start + step]
        part = buf[:src.numel()]
        if own:
            cast = src.to(dtype)        # in src's memory order, where it is dense in one
            flat = memory_order_flat if cast.stride() == src.stride() else torch.ravel
            part.copy_(flat(cast))
            part.sub_(flat(src))
            dst.copy_(cast)
        else:
            part = part.view(src.shape)
            dst.copy_(src)
            part.copy_(dst)
            part.sub_(src)
        lo, hi = torch.aminmax(part)
        worst = torch.maximum(worst, torch.maximum(-lo, hi))
    return out, worst


@dataclass(eq=False)
class AffineConv:
    """y = conv(x, weight, spec) + bias, with weight (O, I/g, KH, KW) (transposed: (I, O/g,
    KH, KW)) and bias (O,) in float64."""

    weight: Tensor
    bias: Tensor
    spec: ConvSpec
    dtype: torch.dtype = torch.float32
    device: torch.device | None = None
    value_layout: str = "NCHW"
    #: the layout of the values read, when it is not ``value_layout``: tokens (NLC) or a
    #: channels-last map (NHWC) whose positions are merged into the batch first
    #: (``value_layout`` NC), or the same values with the channel axis moved (NHWC read,
    #: NCHW given: the layer keeps a permute, ``algebra.modules.relayout``)
    input_layout: str = ""
    #: the layer reads the mean of its input over positions (a global average pool first)
    pooled: bool = False
    #: not a field: what the reducer that made this kernel attached for a later consumer
    #: (the proofs' differentiable reduction, ``repfuse.proofs.region.reduce_for_proof``),
    #: None once consumed or dropped; ``replace`` does not carry it over
    carried = None

    def __post_init__(self) -> None:
        if self.spec.layout != "NCHW":
            self.spec = self.spec.replace(layout="NCHW")
        self.spec.check_weight(tuple(self.weight.shape))
        if tuple(self.bias.shape) != (self.spec.out_channels,):
            raise NotFusable(f"bias has shape {list(self.bias.shape)}, expected "
                             f"[{self.spec.out_channels}] for {self.spec.describe()}")
        if self.weight.dtype != WORK_DTYPE:
            self.weight = self.weight.to(WORK_DTYPE)
        if self.bias.dtype != WORK_DTYPE:
            self.bias = self.bias.to(WORK_DTYPE)
        if self.device is None:
            self.device = self.weight.device

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_tensors(cls, weight: Tensor, bias: Tensor | None, spec: ConvSpec,
                     dtype: torch.dtype | None = None) -> AffineConv:
        """An affine conv from a weight in torch's layout and an optional bias."""
        if bias is None:
            bias = torch.zeros(spec.out_channels, dtype=WORK_DTYPE, device=weight.device)
        if dtype is None:
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return cls(weight.to(WORK_DTYPE), bias.to(WORK_DTYPE), spec, dtype, weight.device)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> AffineConv:
        """The affine conv computed by ``conv`` (its live parameters, cast to float64)."""
        if not isinstance(conv, nn.Conv2d):
            raise NotFusable(f"{type(conv).__name__} is not an nn.Conv2d")
        if isinstance(conv.padding, str):
            spec = ConvSpec(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        else:
            spec = ConvSpec.from_module(conv)
        return cls.from_tensors(conv.weight, conv.bias, spec)

    # ------------------------------------------------------------------ views
    @property
    def padding_mode(self) -> str:
        return self.spec.padding_mode

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def replace(self, **changes) -> AffineConv:
        """A copy with some of weight, bias, spec, dtype, device replaced."""
        fields = dict(weight=self.weight, bias=self.bias, spec=self.spec, dtype=self.dtype,
                      device=self.device, value_layout=self.value_layout,
                      input_layout=self.input_layout, pooled=self.pooled)
        fields.update(changes)
        return AffineConv(**fields)

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: Tensor) -> Tensor:
        """Evaluate in float64 on the canonical (N, C, H, W) view (reference for tests)."""
        x = x.to(WORK_DTYPE)
        spec = self.spec
        if spec.transposed:
            from repfuse.core.reference import conv_transpose2d

            return conv_transpose2d(x, self.weight, self.bias, spec)
        if spec.padding_mode == "zeros" and spec.is_symmetric_padding:
            padding = spec.torch_padding
        else:
            mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
            x = F.pad(x, _torch_pad(spec.padding), mode=mode)
            padding = (0, 0)
        return F.conv2d(x, self.weight, self.bias, spec.stride, padding, spec.dilation,
                        spec.groups)

    __call__ = forward

    def cast(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) cast to ``dtype``: new detached contiguous tensors (cached until
        ``to_module`` takes them), made in the pass that measures ``cast_error``."""
        cached = self.__dict__.get("_cast")
        if cached is None:
            with torch.no_grad():
                (weight, e_w), (bias, e_b) = (_cast_measured(t.detach(), self.dtype)
                                              for t in (self.weight, self.bias))
            cached = self.__dict__["_cast"] = (weight, bias)
            self.__dict__.setdefault("_cast_error", float(torch.maximum(e_w, e_b)))
        return cached

    def cast_error(self) -> float:
        """Max abs rounding error of casting the float64 weight and bias to ``dtype`` (NaN
        where a value is NaN, infinite where one overflows ``dtype``)."""
        if "_cast_error" not in self.__dict__:
            self.cast()
        return self.__dict__["_cast_error"]

    def to_module(self) -> nn.Module:
        """The torch layer for ``value_layout`` (``repfuse.algebra.modules``): an
        ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Conv1d`` / ``nn.Linear`` (dtype, device
        and padding_mode preserved, bias materialised), preceded by a pad module when the
        padding is asymmetric."""
        from repfuse.algebra.modules import to_module

        return to_module(self)

    def describe(self) -> str:
        from repfuse.algebra.modules import describe

        return describe(self)
