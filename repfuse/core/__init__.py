"""The shared convolution core: geometry (``ConvSpec``) and forward/gradient kernels."""

from repfuse.core.kernels import (
    conv2d,
    conv2d_input,
    conv2d_weight,
    conv_transpose2d,
    conv_transpose2d_input,
    conv_transpose2d_weight,
)
from repfuse.core.spec import ConvSpec

__all__ = [
    "ConvSpec",
    "conv2d",
    "conv2d_input",
    "conv2d_weight",
    "conv_transpose2d",
    "conv_transpose2d_input",
    "conv_transpose2d_weight",
]
