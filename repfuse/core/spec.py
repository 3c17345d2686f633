"""``ConvSpec``: the single source of truth for 2-D convolution geometry.

Kernel size, stride, per-side padding, dilation, groups, padding mode, transposed
convolution with output padding, and the memory layout of activations and weights.
Output-shape arithmetic, validation (errors name the argument) and the
"where does tap (i, j) read" mapping live here and nowhere else.

Weight layouts (see ``ConvSpec.weight_shape``):

* conv, NCHW:            (O, I/g, KH, KW)   -- torch's
* conv, NHWC:            (O, KH, KW, I/g)
* transposed, NCHW:      (I, O/g, KH, KW)   -- torch's ConvTranspose2d
* transposed, NHWC:      (O, KH, KW, I/g)   -- im2row + GEMM libraries' layout,
  where O is the deconvolution's output channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from repfuse.errors import GeometryError

Pair = tuple[int, int]
Pad4 = tuple[int, int, int, int]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
LAYOUTS = ("NCHW", "NHWC")


def _pair(value, name: str) -> Pair:
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int \
            and type(value[1]) is int:
        return value   # already a pair (every spec made from another spec)
    if isinstance(value, bool):
        raise GeometryError(f"{name}={value!r} must be an int or a pair of ints")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 1 and isinstance(value[0], int):
        return (int(value[0]), int(value[0]))
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise GeometryError(f"{name}={value!r} must be an int or a pair of ints")


def normalize_padding(padding, kernel_size: Pair = (1, 1), dilation: Pair = (1, 1),
                      stride: Pair = (1, 1)) -> Pad4:
    """Padding as (top, bottom, left, right) from an int, a pair (ph, pw), a 4-tuple,
    or the strings ``"valid"`` / ``"same"`` (as torch.nn.functional.conv2d)."""
    if type(padding) is tuple and len(padding) == 4 and all(type(p) is int for p in padding):
        return padding   # already (top, bottom, left, right)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise GeometryError(f"padding='same' needs stride=1, got stride={stride}")
            out = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)  # type: ignore[return-value]
        raise GeometryError(f"padding={padding!r} must be 'valid', 'same', an int, "
                            "a pair or (top, bottom, left, right)")
    if isinstance(padding, Sequence) and len(padding) == 4 and not isinstance(padding, str):
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in padding):
            raise GeometryError(f"padding={padding!r} must hold ints")
        return tuple(int(p) for p in padding)  # type: ignore[return-value]
    ph, pw = _pair(padding, "padding")
    return (ph, ph, pw, pw)


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of one 2-D convolution (or transposed convolution).

    All fields are normalised on construction: ``kernel_size``, ``stride``,
    ``dilation`` and ``output_padding`` become pairs, ``padding`` becomes
    (top, bottom, left, right). Invalid geometry raises ``GeometryError``
    (a ``ValueError``) that names the argument.
    """

    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Pad4 = (0, 0, 0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: Pair = (0, 0)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "kernel_size", _pair(self.kernel_size, "kernel_size"))
        setattr_(self, "stride", _pair(self.stride, "stride"))
        setattr_(self, "dilation", _pair(self.dilation, "dilation"))
        setattr_(self, "output_padding", _pair(self.output_padding, "output_padding"))
        setattr_(self, "padding", normalize_padding(self.padding, self.kernel_size,
                                                    self.dilation, self.stride))
        self._validate()

    def _validate(self) -> None:
        for name in ("in_channels", "out_channels", "groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GeometryError(f"{name}={v!r} must be a positive int")
        for name in ("kernel_size", "stride", "dilation"):
            if min(getattr(self, name)) < 1:
                raise GeometryError(f"{name}={getattr(self, name)} must be >= 1")
        if min(self.padding) < 0:
            raise GeometryError(f"padding={self.padding} must be >= 0 on every side")
        if min(self.output_padding) < 0:
            raise GeometryError(f"output_padding={self.output_padding} must be >= 0")
        if self.in_channels % self.groups:
            raise GeometryError(
                f"groups={self.groups} does not divide in_channels={self.in_channels}")
        if self.out_channels % self.groups:
            raise GeometryError(
                f"groups={self.groups} does not divide out_channels={self.out_channels}")
        if self.padding_mode not in PADDING_MODES:
            raise GeometryError(
                f"padding_mode={self.padding_mode!r} must be one of {', '.join(PADDING_MODES)}")
        if self.layout not in LAYOUTS:
            raise GeometryError(f"layout={self.layout!r} must be 'NCHW' or 'NHWC'")
        if self.transposed:
            if self.padding_mode != "zeros":
                raise GeometryError(
                    f"padding_mode={self.padding_mode!r}: transposed convolution supports "
                    "only 'zeros'")
            for a in range(2):
                if self.output_padding[a] >= max(self.stride[a], self.dilation[a]):
                    raise GeometryError(
                        f"output_padding={self.output_padding} must be smaller than either "
                        f"stride={self.stride} or dilation={self.dilation}")
        elif self.output_padding != (0, 0):
            raise GeometryError(
                f"output_padding={self.output_padding} is only meaningful when transposed=True")

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_weight(cls, weight_shape, *, stride=1, padding=0, dilation=1, groups=1,
                    transposed: bool = False, output_padding=0, layout: str = "NCHW",
                    padding_mode: str = "zeros") -> ConvSpec:
        """The spec of a convolution with a weight of ``weight_shape`` in ``layout``."""
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) != 4:
            raise GeometryError(f"weight must be 4-D, got shape {list(shape)}")
        if layout not in LAYOUTS:
            raise GeometryError(f"layout={layout!r} must be 'NCHW' or 'NHWC'")
        if not isinstance(groups, int) or groups < 1:
            raise GeometryError(f"groups={groups!r} must be a positive int")
        if layout == "NHWC":
            o, kh, kw, ipg = shape
            cin, cout = ipg * groups, o
        elif transposed:
            i, opg, kh, kw = shape
            cin, cout = i, opg * groups
        else:
            o, ipg, kh, kw = shape
            cin, cout = ipg * groups, o
        return cls(cin, cout, (kh, kw), stride, padding, dilation, groups, padding_mode,
                   transposed, output_padding, layout)

    @classmethod
    def one_row(cls, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding=0, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                **kwargs) -> ConvSpec:
        """The spec of a 1-D convolution (``nn.Conv1d``) as a 2-D one with one row: kernel
        (1, K), stride (1, s), dilation (1, d), padding (0, 0, left, right) (``padding``
        an int, a (left, right) pair, ``"same"`` or ``"valid"``)."""
        if isinstance(padding, str):
            pad = padding
        elif isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 2:
            pad = (0, 0, padding[0], padding[1])
        else:
            p = padding[0] if isinstance(padding, Sequence) else padding
            pad = (0, 0, p, p)
        return cls(in_channels, out_channels, (1, kernel_size), (1, stride), pad,
                   (1, dilation), groups, padding_mode, **kwargs)

    @classmethod
    def from_module(cls, module, layout: str = "NCHW") -> ConvSpec:
        """The spec of an ``nn.Conv2d`` or ``nn.ConvTranspose2d``."""
        import torch.nn as nn

        if isinstance(module, nn.ConvTranspose2d):
            return cls(module.in_channels, module.out_channels, module.kernel_size,
                       module.stride, module.padding, module.dilation, module.groups,
                       module.padding_mode, True, module.output_padding, layout)
        if isinstance(module, nn.Conv2d):
            return cls(module.in_channels, module.out_channels, module.kernel_size,
                       module.stride, module.padding, module.dilation, module.groups,
                       module.padding_mode, False, (0, 0), layout)
        raise GeometryError(f"{type(module).__name__} is not an nn.Conv2d or nn.ConvTranspose2d")

    def replace(self, **changes) -> ConvSpec:
        """``dataclasses.replace``: a copy with ``changes``, normalised and validated as a
        new spec is (without re-running the generated ``__init__``: reductions make
        thousands of these)."""
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            raise TypeError(f"ConvSpec has no field {sorted(unknown)[0]!r}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        new.__post_init__()
        return new

    # ------------------------------------------------------------------ derived
    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

    @property
    def effective_kernel(self) -> Pair:
        """Extent of the dilated kernel: d * (k - 1) + 1 on each axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def padding_pairs(self) -> tuple[Pair, Pair]:
        t, b, l, r = self.padding
        return ((t, b), (l, r))

    @property
    def is_symmetric_padding(self) -> bool:
        t, b, l, r = self.padding
        return t == b and l == r

    @property
    def torch_padding(self) -> Pair:
        """(ph, pw) for torch modules; raises if the padding is asymmetric."""
        if not self.is_symmetric_padding:
            raise GeometryError(
                f"padding={self.padding} (top, bottom, left, right) is asymmetric; torch's "
                "Conv2d needs equal padding on opposite sides (pad the input explicitly)")
        return (self.padding[0], self.padding[2])

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """Weight shape in this spec's layout (see the module docstring)."""
        kh, kw = self.kernel_size
        if self.layout == "NHWC":
            return (self.out_channels, kh, kw, self.in_per_group)
        if self.transposed:
            return (self.in_channels, self.out_per_group, kh, kw)
        return (self.out_channels, self.in_per_group, kh, kw)

    @property
    def torch_weight_shape(self) -> tuple[int, int, int, int]:
        """Weight shape torch uses for this convolution (NCHW-layout weight)."""
        return self.replace(layout="NCHW").weight_shape

    def activation_shape(self, n: int, c: int, h: int, w: int) -> tuple[int, int, int, int]:
        """(N, C, H, W) arranged in this spec's layout."""
        return (n, h, w, c) if self.layout == "NHWC" else (n, c, h, w)

    def split_activation_shape(self, shape, name: str = "input") -> tuple[int, int, int, int]:
        """(N, C, H, W) from an activation shape in this spec's layout."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise GeometryError(f"{name} must be 4-D ({self.layout}), got shape {list(shape)}")
        if self.layout == "NHWC":
            n, h, w, c = shape
        else:
            n, c, h, w = shape
        return n, c, h, w

    # ------------------------------------------------------------------ shapes
    def output_size(self, input_hw) -> Pair:
        """Spatial output size for an input of spatial size ``input_hw``.

        For a transposed spec this is the transposed convolution's output size.
        Raises ``GeometryError`` naming the input when the output would be empty."""
        h, w = (int(v) for v in input_hw)
        out = []
        for axis, size in enumerate((h, w)):
            lo, hi = self.padding_pairs[axis]
            s, d, k = self.stride[axis], self.dilation[axis], self.kernel_size[axis]
            if size < 1:
                raise GeometryError(f"input size {h}x{w} must be at least 1x1")
            if self.transposed:
                o = (size - 1) * s - lo - hi + d * (k - 1) + self.output_padding[axis] + 1
            else:
                o = (size + lo + hi - d * (k - 1) - 1) // s + 1
                if size + lo + hi < d * (k - 1) + 1:
                    o = 0
            out.append(o)
        if min(out) < 1:
            ek = self.effective_kernel
            if self.transposed:
                raise GeometryError(
                    f"transposed convolution of a {h}x{w} input with padding={self.padding} "
                    f"gives an empty output {out[0]}x{out[1]} (kernel_size="
                    f"{self.kernel_size}, stride={self.stride}, dilation={self.dilation}); "
                    "use less padding or a larger input")
            raise GeometryError(
                f"input {h}x{w} with padding={self.padding} gives an empty output "
                f"{out[0]}x{out[1]} for the effective kernel {ek[0]}x{ek[1]} "
                f"(kernel_size={self.kernel_size}, dilation={self.dilation}); "
                "use a larger input or more padding")
        return (out[0], out[1])

    def output_shape(self, input_shape) -> tuple[int, int, int, int]:
        """Full output shape (in this layout) for an activation of ``input_shape``."""
        n, c, h, w = self.check_input(input_shape)
        oh, ow = self.output_size((h, w))
        return self.activation_shape(n, self.out_channels, oh, ow)

    def check_input(self, shape, name: str = "input") -> tuple[int, int, int, int]:
        """Validate an activation shape; returns (N, C, H, W)."""
        n, c, h, w = self.split_activation_shape(shape, name)
        if c != self.in_channels:
            raise GeometryError(
                f"{name} has {c} channels but the weight expects in_channels="
                f"{self.in_channels} (layout {self.layout})")
        return n, c, h, w

    def check_weight(self, shape, name: str = "weight") -> None:
        if tuple(int(s) for s in shape) != self.weight_shape:
            raise GeometryError(
                f"{name} has shape {list(shape)}, expected {list(self.weight_shape)} "
                f"for this convolution (layout {self.layout}, transposed={self.transposed})")

    def check_grad_output(self, input_shape, grad_output_shape,
                          name: str = "grad_output") -> tuple[int, int, int, int]:
        """Validate that ``grad_output`` matches the output of an input of
        ``input_shape``; returns the output's (N, C, H, W)."""
        n, _, h, w = self.check_input(input_shape, "input_size")
        oh, ow = self.output_size((h, w))
        expected = self.activation_shape(n, self.out_channels, oh, ow)
        got = tuple(int(s) for s in grad_output_shape)
        if got != expected:
            raise GeometryError(
                f"{name} has shape {list(got)}, expected {list(expected)} for input "
                f"{list(input_shape)} (layout {self.layout})")
        return n, self.out_channels, oh, ow

    # ------------------------------------------------------------------ taps
    def tap_offsets(self, axis: int) -> tuple[int, ...]:
        """Input offset read by each tap along ``axis`` (0: H, 1: W) relative to
        ``o * stride`` for output position ``o`` (forward convolution)."""
        lo = self.padding_pairs[axis][0]
        d = self.dilation[axis]
        return tuple(-lo + i * d for i in range(self.kernel_size[axis]))

    def reads(self, oh: int, ow: int, i: int, j: int) -> Pair:
        """Input position (ih, iw) that tap (i, j) reads for output (oh, ow) of the
        forward convolution; may lie in the padding (outside [0, H) x [0, W))."""
        return (oh * self.stride[0] - self.padding[0] + i * self.dilation[0],
                ow * self.stride[1] - self.padding[2] + j * self.dilation[1])

    def grid_key(self) -> tuple:
        """Two forward convolutions with equal ``grid_key`` produce output grids of
        the same size whose position ``o`` sits at input ``o * stride`` for every
        input size: the precondition for summing branches elementwise. Two transposed
        ones: output grids of the same size where input ``h`` writes around
        ``h * stride`` (output padding lengthens the output)."""
        key: list = [self.stride]
        for axis in range(2):
            lo, hi = self.padding_pairs[axis]
            key.append(lo + hi - self.output_padding[axis] - self.effective_kernel[axis])
        return (*key, self.transposed)

    def aligned_with(self, other: ConvSpec) -> bool:
        """Whether ``self`` and ``other`` produce the same output grid (see grid_key)."""
        return self.grid_key() == other.grid_key()

    def describe(self) -> str:
        """Short human description, e.g. ``conv3x3/s2 g4``."""
        kh, kw = self.kernel_size
        parts = [f"{'deconv' if self.transposed else 'conv'}{kh}x{kw}"]
        if self.stride != (1, 1):
            parts[0] += f"/s{self.stride[0]}" if self.stride[0] == self.stride[1] \
                else f"/s{self.stride[0]}x{self.stride[1]}"
        if self.dilation != (1, 1):
            parts.append(f"d{self.dilation[0]}" if self.dilation[0] == self.dilation[1]
                         else f"d{self.dilation[0]}x{self.dilation[1]}")
        if self.groups > 1:
            parts.append("dw" if self.groups == self.in_channels == self.out_channels
                         else f"g{self.groups}")
        return " ".join(parts)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ConvSpec))


def window_after(window: tuple[Pair, Pair], kernel: Pair, stride: Pair) -> tuple[Pair, Pair]:
    """The input window ``(extent, step)`` per axis that one output of a kernel of
    effective extent ``kernel`` and ``stride`` reads, applied to values each reading
    ``window`` of the input: the kernel's extra taps add the inner step each, and the
    steps multiply."""
    (eh, ew), (jh, jw) = window
    return ((eh + (kernel[0] - 1) * jh, ew + (kernel[1] - 1) * jw),
            (jh * stride[0], jw * stride[1]))
