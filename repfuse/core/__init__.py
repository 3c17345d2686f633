"""The shared convolution core: geometry (``ConvSpec``) and forward/gradient kernels."""

from repfuse.core.spec import ConvSpec

__all__ = ["ConvSpec"]
