"""Layout, dtype and argument normalisation shared by the convolution kernels.

Every public kernel turns its torch-style arguments into one ``ConvSpec``
(``make_spec``), moves activations and weights into torch's NCHW view
(``to_nchw`` / ``weight_to_torch``; permutes, not copies, wherever possible) and
computes in ``compute_dtype``. Geometry comes from ``ConvSpec`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from repfuse.core.spec import LAYOUTS, ConvSpec
from repfuse.errors import DtypeError, GeometryError

ALGORITHMS = ("auto", "reference", "native", "grouped")
_HALF = (torch.float16, torch.bfloat16)
_FULL = (torch.float32, torch.float64)


# ------------------------------------------------------------------ activations
def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise GeometryError(f"layout={layout!r} must be 'NCHW' or 'NHWC'")
    return layout


def to_nchw(x: torch.Tensor, layout: str) -> torch.Tensor:
    """An activation in ``layout`` as an (N, C, H, W) tensor (a permuted view for NHWC:
    a contiguous NHWC tensor becomes a channels_last NCHW view, no copy)."""
    return x.permute(0, 3, 1, 2) if check_layout(layout) == "NHWC" else x


def from_nchw(y: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of ``to_nchw`` (a channels_last NCHW tensor becomes a contiguous NHWC view)."""
    return y.permute(0, 2, 3, 1) if check_layout(layout) == "NHWC" else y


def memory_order_flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in the order they lie in memory, when they are dense
    in some order of its dimensions (contiguous, channels-last, a permuted view); a copy
    otherwise. For whole-tensor reductions, whose result does not depend on the order: on
    a channels-last float64 kernel (2560x2560x3x3) ``torch.aminmax`` takes 47 ms, on its
    memory-order view 13 ms."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else t.reshape(-1)


def nchw_shape(shape, layout: str) -> tuple[int, int, int, int]:
    """An activation shape given in ``layout`` as (N, C, H, W)."""
    s = tuple(int(v) for v in shape)
    return (s[0], s[3], s[1], s[2]) if check_layout(layout) == "NHWC" else s


# ------------------------------------------------------------------ weights
def weight_to_torch(w: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """A weight in ``spec.layout`` as torch's weight: (O, I/g, KH, KW) for a convolution,
    (I, O/g, KH, KW) for a transposed convolution.

    NHWC conv weights become a channels_last view (no copy); NHWC transposed weights
    (O, KH, KW, I/g) are regrouped (a copy when groups > 1)."""
    if spec.layout == "NCHW":
        return w
    return _nhwc_weight(w, spec, to_torch=True)


def weight_from_torch(w_t: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Inverse of ``weight_to_torch``: torch's weight as a weight in ``spec.layout``."""
    if spec.layout == "NCHW":
        return w_t
    return _nhwc_weight(w_t, spec, to_torch=False)


def _nhwc_weight(w: torch.Tensor, spec: ConvSpec, *, to_torch: bool) -> torch.Tensor:
    """NHWC weight <-> torch's weight. Convolutions: (O, KH, KW, I/g) <-> (O, I/g, KH, KW)
    (a permutation). Transposed convolutions: (O, KH, KW, I/g) <-> (I, O/g, KH, KW), the
    groups regrouped."""
    if not spec.transposed:
        return w.permute(0, 3, 1, 2) if to_torch else w.permute(0, 2, 3, 1)
    g, kh, kw = spec.groups, *spec.kernel_size
    opg, ipg = spec.out_per_group, spec.in_per_group
    if to_torch:
        return (w.reshape(g, opg, kh, kw, ipg).permute(0, 4, 1, 2, 3)
                .reshape(spec.in_channels, opg, kh, kw))
    return (w.reshape(g, ipg, opg, kh, kw).permute(0, 2, 3, 4, 1)
            .reshape(spec.out_channels, kh, kw, ipg))


def transposed_as_conv(spec: ConvSpec) -> ConvSpec:
    """The NCHW convolution whose input gradient is the transposed convolution ``spec``.

    It maps the transposed convolution's output (``spec.out_channels``) to its input
    (``spec.in_channels``), and torch's transposed weight (I, O/g, KH, KW) is exactly its
    weight. Forward, input and weight gradients of the transposed convolution are the
    input, forward and weight gradients of this convolution."""
    return ConvSpec(spec.out_channels, spec.in_channels, spec.kernel_size, spec.stride,
                    spec.padding, spec.dilation, spec.groups)


# ------------------------------------------------------------------ dtypes
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float32 for float16/bfloat16, else the dtype."""
    if dtype in _HALF:
        return torch.float32
    if dtype in _FULL:
        return dtype
    raise DtypeError(f"dtype {dtype} is not supported by the convolution kernels; "
                     "use float16, bfloat16, float32 or float64")


def check_dtypes(**tensors) -> torch.dtype:
    """All given tensors (None skipped) share one supported dtype and device; returns it."""
    items = [(k, t) for k, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    compute_dtype(t0.dtype)
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise DtypeError(f"{name} has dtype {t.dtype} but {name0} has {t0.dtype}; "
                             "cast them to one dtype")
        if t.device != t0.device:
            raise DtypeError(f"{name} is on {t.device} but {name0} is on {t0.device}; "
                             "move them to one device")
    return t0.dtype


def upcast(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` in its compute dtype (a no-op for float32/float64)."""
    if x is None:
        return None
    cd = compute_dtype(x.dtype)
    return x if cd == x.dtype else x.to(cd)


# ------------------------------------------------------------------ arguments
def _shape(value, name: str) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        raise GeometryError(f"{name} must be a shape (a torch.Size or ints), got a tensor")
    if not isinstance(value, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise GeometryError(f"{name}={value!r} must be a sequence of ints")
    if len(value) != 4 or min(value) < 1:
        raise GeometryError(f"{name}={list(value)} must be 4 positive ints")
    return tuple(int(v) for v in value)


def _hashable(value):
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, torch.Size):
        return tuple(value)
    return value


def make_spec(weight_shape, stride=1, padding=0, dilation=1, groups=1, *,
              transposed: bool = False, output_padding=0, layout: str = "NCHW",
              input_shape=None, grad_output_shape=None, weight_name: str = "weight",
              input_name: str = "input", grad_output_name: str = "grad_output") -> ConvSpec:
    """The ``ConvSpec`` of a kernel call, validated against the call's tensors.

    ``weight_shape`` is in ``layout`` (see ``ConvSpec.weight_shape``); ``input_shape`` is
    the activation the convolution (or transposed convolution) reads, ``grad_output_shape``
    the gradient of its output. Errors name the argument (``weight_name`` etc.)."""
    key = (_hashable(weight_shape), _hashable(stride), _hashable(padding),
           _hashable(dilation), groups, bool(transposed), _hashable(output_padding), layout,
           None if input_shape is None else tuple(input_shape),
           None if grad_output_shape is None else tuple(grad_output_shape),
           weight_name, input_name, grad_output_name)
    try:
        hash(key)
    except TypeError:
        return _make_spec(*key)
    return _make_spec_cached(*key)


def _make_spec(weight_shape, stride, padding, dilation, groups, transposed, output_padding,
               layout, input_shape, grad_output_shape, weight_name, input_name,
               grad_output_name) -> ConvSpec:
    check_layout(layout)
    wshape = _shape(weight_shape, weight_name)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise GeometryError(f"groups={groups!r} must be a positive int")
    if input_shape is not None:
        ishape = _shape(input_shape, input_name)
        c = nchw_shape(ishape, layout)[1]
        if c % groups:
            raise GeometryError(f"groups={groups} does not divide the {c} channels of "
                                f"{input_name} {list(ishape)} (layout {layout})")
    spec = ConvSpec.from_weight(wshape, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, transposed=transposed,
                                output_padding=output_padding, layout=layout)
    if input_shape is None:
        return spec
    c = nchw_shape(ishape, layout)[1]
    if c != spec.in_channels:
        raise GeometryError(
            f"{input_name} {list(ishape)} has {c} channels but {weight_name} "
            f"{list(wshape)} (layout {layout}, groups={groups}, transposed={transposed}) "
            f"expects {spec.in_channels}; check {weight_name} and groups")
    spec.check_input(ishape, input_name)
    oshape = spec.output_shape(ishape)
    if grad_output_shape is not None:
        got = tuple(int(v) for v in grad_output_shape)
        if got != oshape:
            raise GeometryError(
                f"{grad_output_name} has shape {list(got)}, expected {list(oshape)} for "
                f"{input_name} {list(ishape)} and {weight_name} {list(wshape)} "
                f"(layout {layout}, stride={spec.stride}, padding={spec.padding}, "
                f"dilation={spec.dilation})")
    return spec


_make_spec_cached = lru_cache(maxsize=512)(_make_spec)


def check_algorithm(algorithm, allowed: tuple[str, ...], kernel: str) -> str:
    """``algorithm`` if ``kernel`` supports it, else a ``ValueError`` listing the choices."""
    if algorithm not in allowed:
        if algorithm in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r} does not apply to {kernel}; "
                             f"use one of {', '.join(map(repr, allowed))}")
        raise ValueError(f"algorithm={algorithm!r} is unknown; {kernel} accepts "
                         f"{', '.join(map(repr, allowed))}")
    return algorithm


# ------------------------------------------------------------------ padding
def pad_input(x_nchw: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """``x_nchw`` zero-padded by ``spec.padding`` (top, bottom, left, right)."""
    t, b, l, r = spec.padding
    if t == b == l == r == 0:
        return x_nchw
    return F.pad(x_nchw, (l, r, t, b))


def pad_spatial(x: torch.Tensor, pads, layout: str) -> torch.Tensor:
    """``x`` (in ``layout``) zero-padded on its spatial axes by (top, bottom, left, right)."""
    t, b, l, r = pads
    if t == b == l == r == 0:
        return x
    return F.pad(x, (l, r, t, b) if layout == "NCHW" else (0, 0, l, r, t, b))


def spatial_size(x: torch.Tensor, layout: str) -> tuple[int, int]:
    """(H, W) of an activation in ``layout``."""
    return (x.shape[2], x.shape[3]) if layout == "NCHW" else (x.shape[1], x.shape[2])


def fit_transposed_input(x: torch.Tensor, conv: ConvSpec, out_hw, layout: str) -> torch.Tensor:
    """Zero-extend a transposed convolution's input ``x`` (bottom/right) to the output size
    of ``conv = transposed_as_conv(spec)`` on the transposed output of size ``out_hw``
    (larger than ``x`` when output_padding >= stride, which dilation allows)."""
    h, w = spatial_size(x, layout)
    fh, fw = conv.output_size(out_hw)
    return pad_spatial(x, (0, fh - h, 0, fw - w), layout)


def split_padding(spec: ConvSpec) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Padding as a symmetric part torch's ops take, (ph, pw), plus the per-side rest
    (top, bottom, left, right) that must be applied explicitly."""
    t, b, l, r = spec.padding
    ph, pw = min(t, b), min(l, r)
    return (ph, pw), (t - ph, b - ph, l - pw, r - pw)
