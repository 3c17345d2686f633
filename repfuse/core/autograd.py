"""A differentiable convolution whose backward runs on the core's gradient kernels.

``conv2d`` behaves like ``torch.nn.functional.conv2d`` (plus per-side padding, NHWC
layout and the algorithm choice), so a model can train through the core: the input
gradient comes from ``repfuse.core.conv2d_input``, the weight gradient from
``repfuse.core.conv2d_weight``, the bias gradient is the output gradient summed over
batch and space.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from repfuse.core import kernels


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, layout,
                algorithm):
        fwd_algorithm = "auto" if algorithm == "grouped" else algorithm
        out = kernels.conv2d(input, weight, bias, stride, padding, dilation, groups,
                             layout=layout, algorithm=fwd_algorithm)
        ctx.save_for_backward(input, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.layout, ctx.algorithm = layout, algorithm
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        geometry, layout = ctx.geometry, ctx.layout
        grad_output = grad_output.to(input.dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            algorithm = "auto" if ctx.algorithm == "grouped" else ctx.algorithm
            grad_input = kernels.conv2d_input(input.shape, weight, grad_output, *geometry,
                                              layout=layout, algorithm=algorithm)
        if ctx.needs_input_grad[1]:
            grad_weight = kernels.conv2d_weight(input, weight.shape, grad_output, *geometry,
                                                layout=layout, algorithm=ctx.algorithm)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dims = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
            grad_bias = grad_output.sum(dims, dtype=torch.float32 if input.dtype in (
                torch.float16, torch.bfloat16) else input.dtype).to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           layout="NCHW", algorithm="auto"):
    """Differentiable 2-D convolution computed by the core (see ``repfuse.core.conv2d``).

    ``algorithm`` selects the kernels of the forward and both gradients ("auto",
    "reference", "native"; "grouped" uses the grouped weight gradient and "auto" for the
    rest). Backward is first order only."""
    return _Conv2d.apply(input, weight, bias, stride, padding, dilation, groups, layout,
                         algorithm)
