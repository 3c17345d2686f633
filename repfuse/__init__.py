"""repfuse: structural re-parameterization of convolutional networks.

Public API: ``fuse``, ``fuse_onnx``, ``verify``, ``export_onnx`` (see ``repfuse.api``).
"""

from repfuse.api import export_onnx, fuse, fuse_onnx, verify

__version__ = "0.1.0"
__all__ = ["fuse", "fuse_onnx", "verify", "export_onnx", "__version__"]
