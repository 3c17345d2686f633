"""The public convolution kernels (``torch.nn.functional`` / ``torch.nn.grad`` names and
argument order, plus keyword-only ``layout``, region masks, channel subsets and
``algorithm``).

Each kernel turns its arguments into one ``ConvSpec`` (validated against the tensors,
errors name the argument), computes in float32 for float16/bfloat16 inputs (results come
back in the input dtype) and routes:

* ``region_in`` / ``region_out`` -> ``repfuse.core.masked`` (region-restricted kernels),
* ``in_channels`` (``conv2d_weight``) -> ``repfuse.core.sparse`` (sparse weight update),
* ``algorithm="grouped"`` (weight gradients) -> ``repfuse.core.grouped``,
* ``"reference"`` -> ``repfuse.core.reference`` (im2col / im2row),
* ``"native"`` -> ``repfuse.core.native`` (aten operators),
* ``"auto"`` -> native, except float64 convolutions with one input channel per group
  (depthwise, with or without a channel multiplier) on small grids, which go to the
  reference kernels: aten has no float64 grouped kernel on the CPU and runs one
  convolution per group, while the reference computes all groups in a few tensor ops
  (measured, one thread, float64, 1024 channels, 3x3, a 6x7 grid: native 8.3-9.3 ms per
  kernel, reference 1.3-1.5 ms; at 64 channels and 56x56 outputs native is faster). The
  proofs run their fused side through these kernels on small probes.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from repfuse.core import native, reference
from repfuse.core.layout import (
    check_algorithm,
    check_dtypes,
    fit_transposed_input,
    from_nchw,
    make_spec,
    nchw_shape,
    spatial_size,
    to_nchw,
    transposed_as_conv,
    upcast,
    weight_from_torch,
    weight_to_torch,
)
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError

_DENSE = ("auto", "reference", "native")
_WEIGHT = ("auto", "reference", "native", "grouped")


#: Output positions (N x OH x OW) up to which ``"auto"`` computes float64 depthwise
#: convolutions with the reference kernels (see the module docstring).
REFERENCE_DEPTHWISE_POSITIONS = 1024


def _auto(algorithm: str, spec: ConvSpec, t: torch.Tensor, positions: int) -> str:
    """The kernels ``algorithm="auto"`` stands for, given one of the tensors (dtype,
    device) and the number of output positions."""
    if algorithm == "auto" and spec.groups > 1 and spec.in_per_group == 1 and \
            t.dtype == torch.float64 and t.device.type == "cpu" and \
            positions <= REFERENCE_DEPTHWISE_POSITIONS:
        return "reference"
    return algorithm


def _positions(spec: ConvSpec, input_shape) -> int:
    n, _, h, w = spec.split_activation_shape(tuple(input_shape))
    oh, ow = spec.output_size((h, w))
    return n * oh * ow


@lru_cache(maxsize=512)
def _nchw(spec: ConvSpec) -> ConvSpec:
    return spec if spec.layout == "NCHW" else spec.replace(layout="NCHW")


def _check_bias(bias, spec: ConvSpec) -> None:
    if bias is not None and tuple(bias.shape) != (spec.out_channels,):
        raise GeometryError(f"bias has shape {list(bias.shape)}, expected "
                            f"[{spec.out_channels}] (one value per output channel)")


def _back(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def _regions(region_in, region_out) -> bool:
    return region_in is not None or region_out is not None


def _masked(kernel: str, *args, spec: ConvSpec, regions: tuple, algorithm: str):
    """``repfuse.core.masked.<kernel>`` (region-restricted) on NCHW arguments."""
    from repfuse.core import masked

    return getattr(masked, kernel)(*args, spec=_nchw(spec), region_in=regions[0],
                                   region_out=regions[1], algorithm=algorithm)


# ------------------------------------------------------------------ convolution
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           layout="NCHW", region_in=None, region_out=None, algorithm="auto"):
    """2-D convolution, as ``torch.nn.functional.conv2d`` (padding may also be
    (top, bottom, left, right)). NHWC: input (N, H, W, C), weight (O, KH, KW, I/groups)."""
    spec = make_spec(weight.shape, stride, padding, dilation, groups, layout=layout,
                     input_shape=input.shape)
    dtype = check_dtypes(input=input, weight=weight, bias=bias)
    _check_bias(bias, spec)
    if _regions(region_in, region_out):
        y = _masked("conv2d", upcast(to_nchw(input, layout)),
                    upcast(weight_to_torch(weight, spec)), upcast(bias), spec=spec,
                    regions=(region_in, region_out), algorithm=algorithm)
        return _back(from_nchw(y, layout), dtype)
    check_algorithm(algorithm, _DENSE, "conv2d")
    algorithm = _auto(algorithm, spec, input, _positions(spec, input.shape))
    if algorithm == "reference":
        return _back(reference.conv2d(upcast(input), upcast(weight), upcast(bias), spec), dtype)
    y = native.conv2d(upcast(to_nchw(input, layout)), upcast(weight_to_torch(weight, spec)),
                      upcast(bias), _nchw(spec))
    return _back(from_nchw(y, layout), dtype)


def conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1,
                 *, layout="NCHW", region_in=None, region_out=None, algorithm="auto"):
    """Gradient of ``conv2d`` with respect to its input of shape ``input_size``, as
    ``torch.nn.grad.conv2d_input``."""
    spec = make_spec(weight.shape, stride, padding, dilation, groups, layout=layout,
                     input_shape=input_size, grad_output_shape=grad_output.shape,
                     input_name="input_size")
    dtype = check_dtypes(grad_output=grad_output, weight=weight)
    size = nchw_shape(input_size, layout)
    if _regions(region_in, region_out):
        gi = _masked("conv2d_input", size, upcast(weight_to_torch(weight, spec)),
                     upcast(to_nchw(grad_output, layout)), spec=spec,
                     regions=(region_in, region_out), algorithm=algorithm)
        return _back(from_nchw(gi, layout), dtype)
    check_algorithm(algorithm, _DENSE, "conv2d_input")
    algorithm = _auto(algorithm, spec, grad_output, grad_output.numel() // spec.out_channels)
    if algorithm == "reference":
        gi = reference.conv2d_input(tuple(input_size), upcast(weight), upcast(grad_output), spec)
        return _back(gi, dtype)
    gi = native.conv2d_input(size, upcast(weight_to_torch(weight, spec)),
                             upcast(to_nchw(grad_output, layout)), _nchw(spec))
    return _back(from_nchw(gi, layout), dtype)


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1,
                  *, layout="NCHW", region_in=None, region_out=None, in_channels=None,
                  algorithm="auto"):
    """Gradient of ``conv2d`` with respect to its weight of shape ``weight_size`` (in
    ``layout``), as ``torch.nn.grad.conv2d_weight``. ``in_channels`` (index tensor or
    slice) returns only the gradient of the selected input channels' weights."""
    spec = make_spec(weight_size, stride, padding, dilation, groups, layout=layout,
                     input_shape=input.shape, grad_output_shape=grad_output.shape,
                     weight_name="weight_size")
    dtype = check_dtypes(input=input, grad_output=grad_output)
    if in_channels is not None:
        if _regions(region_in, region_out):
            raise ValueError("in_channels cannot be combined with region_in/region_out; "
                             "compute the region-restricted gradient and index it")
        from repfuse.core import sparse

        # The input is passed as given (layout, dtype): only the selected channels may be
        # read, so the selection happens before any conversion.
        return sparse.conv2d_weight_sparse(input, tuple(weight_size), grad_output, spec,
                                           in_channels, algorithm=algorithm)
    if _regions(region_in, region_out):
        gw = _masked("conv2d_weight", upcast(to_nchw(input, layout)), _nchw(spec).weight_shape,
                     upcast(to_nchw(grad_output, layout)), spec=spec,
                     regions=(region_in, region_out), algorithm=algorithm)
        return _back(weight_from_torch(gw, spec), dtype)
    check_algorithm(algorithm, _WEIGHT, "conv2d_weight")
    algorithm = _auto(algorithm, spec, input, grad_output.numel() // spec.out_channels)
    if algorithm == "reference":
        gw = reference.conv2d_weight(upcast(input), spec.weight_shape, upcast(grad_output), spec)
        return _back(gw, dtype)
    x, go, sn = upcast(to_nchw(input, layout)), upcast(to_nchw(grad_output, layout)), _nchw(spec)
    if algorithm == "grouped":
        from repfuse.core.grouped import conv2d_weight_grouped

        gw = conv2d_weight_grouped(x, sn.weight_shape, go, sn)
    else:
        gw = native.conv2d_weight(x, sn.weight_shape, go, sn)
    return _back(weight_from_torch(gw, spec), dtype)


# ------------------------------------------------------------------ transposed
def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, layout="NCHW", algorithm="auto"):
    """2-D transposed convolution, as ``torch.nn.functional.conv_transpose2d``. NHWC: input
    (N, H, W, I), weight (O, KH, KW, I/groups) with O the output channels."""
    spec = make_spec(weight.shape, stride, padding, dilation, groups, transposed=True,
                     output_padding=output_padding, layout=layout, input_shape=input.shape)
    dtype = check_dtypes(input=input, weight=weight, bias=bias)
    _check_bias(bias, spec)
    check_algorithm(algorithm, _DENSE, "conv_transpose2d")
    if algorithm == "reference":
        y = reference.conv_transpose2d(upcast(input), upcast(weight), upcast(bias), spec)
        return _back(y, dtype)
    y = native.conv_transpose2d(upcast(to_nchw(input, layout)),
                                upcast(weight_to_torch(weight, spec)), upcast(bias), _nchw(spec))
    return _back(from_nchw(y, layout), dtype)


def conv_transpose2d_input(input_size, weight, grad_output, stride=1, padding=0,
                           output_padding=0, groups=1, dilation=1, *, layout="NCHW",
                           algorithm="auto"):
    """Gradient of ``conv_transpose2d`` with respect to its input of shape ``input_size``."""
    spec = make_spec(weight.shape, stride, padding, dilation, groups, transposed=True,
                     output_padding=output_padding, layout=layout, input_shape=input_size,
                     grad_output_shape=grad_output.shape, input_name="input_size")
    dtype = check_dtypes(grad_output=grad_output, weight=weight)
    check_algorithm(algorithm, _DENSE, "conv_transpose2d_input")
    if algorithm == "reference":
        gi = reference.conv_transpose2d_input(tuple(input_size), upcast(weight),
                                              upcast(grad_output), spec)
        return _back(gi, dtype)
    gi = native.conv_transpose2d_input(nchw_shape(input_size, layout),
                                       upcast(weight_to_torch(weight, spec)),
                                       upcast(to_nchw(grad_output, layout)), _nchw(spec))
    return _back(from_nchw(gi, layout), dtype)


def conv_transpose2d_weight(input, weight_size, grad_output, stride=1, padding=0,
                            output_padding=0, groups=1, dilation=1, *, layout="NCHW",
                            algorithm="auto"):
    """Gradient of ``conv_transpose2d`` with respect to its weight of shape ``weight_size``
    (in ``layout``): the deconvolution grad filter."""
    spec = make_spec(weight_size, stride, padding, dilation, groups, transposed=True,
                     output_padding=output_padding, layout=layout, input_shape=input.shape,
                     grad_output_shape=grad_output.shape, weight_name="weight_size")
    dtype = check_dtypes(input=input, grad_output=grad_output)
    check_algorithm(algorithm, _WEIGHT, "conv_transpose2d_weight")
    if algorithm == "reference":
        gw = reference.conv_transpose2d_weight(upcast(input), spec.weight_shape,
                                               upcast(grad_output), spec)
        return _back(gw, dtype)
    x, go, sn = upcast(to_nchw(input, layout)), upcast(to_nchw(grad_output, layout)), _nchw(spec)
    if algorithm == "grouped":
        from repfuse.core.grouped import conv2d_weight_grouped

        # The transposed convolution is the input gradient of ``conv``; its weight
        # gradient is ``conv``'s, with the input and the output gradient swapped.
        conv = transposed_as_conv(sn)
        xf = fit_transposed_input(x, conv, spatial_size(go, "NCHW"), "NCHW")
        gw = conv2d_weight_grouped(go, conv.weight_shape, xf, conv)
    else:
        gw = native.conv_transpose2d_weight(x, sn.weight_shape, go, sn)
    return _back(weight_from_torch(gw, spec), dtype)
