"""The torch layer computing an ``AffineConv`` on the values of its region's layout.

``AffineConv.value_layout`` (see ``repfuse.region.layout``) says how the model lays out
the values the convolution maps: NCHW gives an ``nn.Conv2d`` (or ``nn.ConvTranspose2d``
for a transposed one), NCL an ``nn.Conv1d`` (the conv has one row), and the
channels-last layouts NC, NLC and NHWC an ``nn.Linear`` (the conv is pointwise).
Asymmetric padding becomes an explicit pad module in front (``nn.Sequential``).

A region whose input and output differ only by where the channel axis is (its
``input_layout`` NHWC and ``value_layout`` NCHW, say: a transpose inside it) becomes the
layer and a ``Permute`` (``relayout``): a pointwise conv is a Linear on the channels-last
side, any other a conv on the channel-first side; the permute is a view, as the training
form's transpose was, so the output has the same strides.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable

_PAD_2D = {"zeros": nn.ZeroPad2d, "reflect": nn.ReflectionPad2d,
           "replicate": nn.ReplicationPad2d, "circular": getattr(nn, "CircularPad2d", None)}
_PAD_1D = {"zeros": nn.ZeroPad1d, "reflect": nn.ReflectionPad1d,
           "replicate": nn.ReplicationPad1d, "circular": getattr(nn, "CircularPad1d", None)}
LINEAR_LAYOUTS = frozenset({"NC", "NLC", "NHWC"})

#: (layout read, layout given) -> the permutation of the axes from one to the other
LAYOUT_PERMUTES: dict[tuple[str, str], tuple[int, ...]] = {
    ("NCHW", "NHWC"): (0, 2, 3, 1), ("NHWC", "NCHW"): (0, 3, 1, 2),
    ("NCL", "NLC"): (0, 2, 1), ("NLC", "NCL"): (0, 2, 1),
}
#: a channels-last layout -> its channel-first twin
_CHANNEL_FIRST = {"NHWC": "NCHW", "NLC": "NCL"}


class Permute(nn.Module):
    """``x.permute(*dims)``: the change of layout a fused region keeps (a view)."""

    def __init__(self, dims) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def permuted(conv) -> bool:
    """Whether ``conv`` reads values of one layout and gives them in another of the same
    rank (a transpose inside its region)."""
    return (conv.input_layout, conv.value_layout) in LAYOUT_PERMUTES


def _is_pointwise(spec: ConvSpec) -> bool:
    return spec.kernel_size == (1, 1) and spec.stride == (1, 1) and max(spec.padding) == 0 \
        and not spec.transposed


def relayout(conv) -> tuple[tuple[int, ...] | None, object, tuple[int, ...] | None]:
    """``(permutation before, conv in one layout, permutation after)`` for a ``permuted``
    conv (see the module docstring); ``(None, conv, None)`` for any other."""
    if not permuted(conv):
        return None, conv, None
    reads, gives = conv.input_layout, conv.value_layout
    perm = LAYOUT_PERMUTES[(reads, gives)]
    last = reads if reads in _CHANNEL_FIRST else gives
    core = last if _is_pointwise(conv.spec) else _CHANNEL_FIRST[last]
    inner = conv.replace(value_layout=core, input_layout="")
    return (None, inner, perm) if core == reads else (perm, inner, None)


def _pad_module(table: dict, mode: str, pads: tuple):
    cls = table[mode]
    if cls is None:
        raise NotFusable(f"asymmetric {mode} padding {pads} needs a circular pad module "
                         "(torch >= 2.1)")
    return cls(pads)


#: per torch layer class: a subclass whose ``reset_parameters`` does nothing
_UNINITIALIZED: dict[type, type] = {}


def _blank(cls, *args, **kwargs) -> nn.Module:
    """A ``cls`` layer without storage (on "meta") and without its random initialisation:
    ``_own`` replaces both of its parameters. Built as a subclass whose
    ``reset_parameters`` does nothing, then given ``cls`` as its class: the object is a
    plain ``cls`` layer (an ``nn.Conv2d`` built on meta spent 150 of its 255 us drawing
    initial values there; ``skip_init``'s ``to_empty`` is slower still)."""
    sub = _UNINITIALIZED.get(cls)
    if sub is None:
        sub = _UNINITIALIZED[cls] = type(cls.__name__, (cls,), {
            "reset_parameters": lambda self: None, "__module__": __name__})
    layer = sub(*args, **kwargs, device="meta")
    layer.__class__ = cls
    return layer


def _own(module: nn.Module, conv, weight_view) -> nn.Module:
    """Give ``module`` the cast weight (through ``weight_view``) and bias of ``conv``."""
    weight, bias = conv.cast()  # contiguous; its cast error measured before the module owns it
    del conv.__dict__["_cast"]  # each module gets its own tensors
    module.weight = nn.Parameter(weight_view(weight).contiguous())
    module.bias = nn.Parameter(bias)
    return module


def conv2d_module(conv) -> nn.Module:
    spec = conv.spec
    symmetric = spec.is_symmetric_padding
    layer = _blank(
        nn.Conv2d, spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride,
        spec.torch_padding if symmetric else 0, spec.dilation, spec.groups, bias=True,
        padding_mode=spec.padding_mode if symmetric else "zeros", dtype=conv.dtype)
    _own(layer, conv, lambda w: w)
    if symmetric:
        return layer
    t, b, l, r = spec.padding
    return nn.Sequential(_pad_module(_PAD_2D, spec.padding_mode, (l, r, t, b)), layer)


def conv1d_module(conv) -> nn.Module:
    spec = conv.spec
    t, b, l, r = spec.padding
    if spec.kernel_size[0] != 1 or spec.stride[0] != 1 or t or b:
        raise NotFusable(f"{spec.describe()} has more than one row; it is not a Conv1d")
    symmetric = l == r
    layer = _blank(
        nn.Conv1d, spec.in_channels, spec.out_channels, spec.kernel_size[1], spec.stride[1],
        l if symmetric else 0, spec.dilation[1], spec.groups, bias=True,
        padding_mode=spec.padding_mode if symmetric else "zeros", dtype=conv.dtype)
    _own(layer, conv, lambda w: w[:, :, 0])
    if symmetric:
        return layer
    return nn.Sequential(_pad_module(_PAD_1D, spec.padding_mode, (l, r)), layer)


def dense_matrix(weight, groups: int):
    """A pointwise (O, I/g, 1, 1) weight as the dense (O, I) matrix (block diagonal in the
    groups)."""
    w = weight[:, :, 0, 0]
    if groups == 1:
        return w
    opg = w.shape[0] // groups
    return torch.block_diag(*(w[g * opg:(g + 1) * opg] for g in range(groups)))


def linear_module(conv) -> nn.Module:
    spec = conv.spec
    if spec.kernel_size != (1, 1) or spec.stride != (1, 1) or max(spec.padding) > 0:
        raise NotFusable(f"{spec.describe()} (padding {spec.padding}) on a "
                         f"{conv.value_layout} value is not pointwise; it is not a Linear")
    layer = _blank(nn.Linear, spec.in_channels, spec.out_channels, bias=True,
                          dtype=conv.dtype)
    return _own(layer, conv, lambda w: dense_matrix(w, spec.groups))


def conv_transpose2d_module(conv) -> nn.Module:
    spec = conv.spec
    padding, output_padding = torch_transposed_padding(spec)
    layer = _blank(
        nn.ConvTranspose2d, spec.in_channels, spec.out_channels, spec.kernel_size,
        spec.stride, padding, output_padding, spec.groups, bias=True,
        dilation=spec.dilation, dtype=conv.dtype)
    return _own(layer, conv, lambda w: w)


def torch_transposed_padding(spec: ConvSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """(padding, output_padding) of torch's ConvTranspose2d for a transposed spec with
    per-side padding: padding is the top / left one, the rest goes to output_padding
    (which must stay below max(stride, dilation))."""
    padding, output_padding = [], []
    for axis in range(2):
        lo, hi = spec.padding_pairs[axis]
        extra = spec.output_padding[axis] + lo - hi
        if extra < 0 or extra >= max(spec.stride[axis], spec.dilation[axis]):
            raise NotFusable(f"{spec.describe()} with padding {spec.padding} and output "
                             f"padding {spec.output_padding} has no torch ConvTranspose2d "
                             "(it crops more at the end than at the start)")
        padding.append(lo)
        output_padding.append(extra)
    return (padding[0], padding[1]), (output_padding[0], output_padding[1])


def to_module(conv) -> nn.Module:
    """The torch layer for ``conv`` in its ``value_layout`` (see the module docstring),
    after a global average pool when ``conv.pooled``."""
    if conv.pooled:
        pool = [nn.AdaptiveAvgPool2d(1)] + ([nn.Flatten(1)] if conv.value_layout == "NC" else [])
        return nn.Sequential(*pool, _layer(conv))
    return _layer(conv)


def _layer(conv) -> nn.Module:
    before, inner, after = relayout(conv)
    if inner is not conv:
        layer = _layer(inner)
        parts = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        return nn.Sequential(*([Permute(before)] if before else []), *parts,
                             *([Permute(after)] if after else []))
    layout = conv.value_layout
    if conv.spec.transposed:
        if layout != "NCHW":
            raise NotFusable(f"a transposed convolution on a {layout} value has no torch layer")
        return conv_transpose2d_module(conv)
    if layout == "NCHW":
        return conv2d_module(conv)
    if layout == "NCL":
        return conv1d_module(conv)
    if layout in LINEAR_LAYOUTS:
        layer = linear_module(conv)
        if conv.input_layout in ("", layout):
            return layer
        if layout != "NC" or conv.input_layout not in LINEAR_LAYOUTS:
            raise NotFusable(f"no torch layer from {conv.input_layout} to {layout} values")
        return nn.Sequential(nn.Flatten(0, -2), layer)    # positions merged into the batch
    raise NotFusable(f"no torch layer for a convolution on a {layout} value")


def describe(conv) -> str:
    """``conv3x3/s2``, ``deconv4x4/s2 g2``, ``conv1d3/s2``, ``linear``, ``globalpool+linear``."""
    spec, layout = conv.spec, conv.value_layout
    if conv.pooled:
        return "globalpool+" + describe(conv.replace(pooled=False))
    before, inner, after = relayout(conv)
    if inner is not conv:
        return "+".join(["permute"] * bool(before) + [describe(inner)]
                        + ["permute"] * bool(after))
    if layout in LINEAR_LAYOUTS:
        return "linear"
    if layout == "NCL":
        k, s, d = spec.kernel_size[1], spec.stride[1], spec.dilation[1]
        parts = [f"conv1d{k}" + (f"/s{s}" if s != 1 else "")]
        parts += [f"d{d}"] if d != 1 else []
        if spec.groups > 1:
            parts.append("dw" if spec.groups == spec.in_channels == spec.out_channels
                         else f"g{spec.groups}")
        return " ".join(parts)
    return spec.describe()
