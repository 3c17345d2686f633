"""Exact kernel algebra on affine convolutions (y = W * x + b with a ConvSpec)."""

from repfuse.algebra.affine import AffineConv, holds, shapes_only
from repfuse.algebra.bn import (
    bn_conv,
    bn_module_conv,
    bn_scale_shift,
    fold_bn,
    fold_bn_module,
    fold_preceding_bn,
)
from repfuse.algebra.combine import add, concat, subtract
from repfuse.algebra.embed import align, common_geometry, embed_kernel, reads_padding, regroup
from repfuse.algebra.identity import identity_conv
from repfuse.algebra.pool import avg_pool_conv
from repfuse.algebra.scaling import affine_channels, negate, scale, scale_rows, shift
from repfuse.algebra.sequential import compose, crop_output, pad_output
from repfuse.algebra.transposed import shift_passes as shift_passes_transposed

__all__ = [
    "AffineConv", "add", "affine_channels", "align", "avg_pool_conv", "bn_conv",
    "bn_module_conv", "bn_scale_shift", "common_geometry", "compose", "concat", "crop_output",
    "embed_kernel", "fold_bn", "fold_bn_module", "fold_preceding_bn", "holds",
    "identity_conv", "negate", "pad_output", "reads_padding", "regroup", "scale", "scale_rows",
    "shapes_only",
    "shift", "shift_passes_transposed", "subtract",
]
