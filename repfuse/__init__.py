"""repfuse: structural re-parameterization of convolutional networks.

Public API: ``fuse``, ``fuse_onnx``, ``verify``, ``export_onnx``, ``quantize`` (see
``repfuse.api``), the results and reports they return, and the errors they raise. The
result classes are imported on first use, so ``import repfuse`` (and ``repfuse --help``)
stays cheap.
"""

from repfuse.api import export_onnx, fuse, fuse_onnx, quantize, verify
from repfuse.errors import InputError, NotFusable, ReparamError, VerificationError

__version__ = "0.1.0"

_LAZY = {
    "FuseResult": "repfuse.fx.fuse",
    "OnnxFuseResult": "repfuse.onnx.pipeline",
    "FuseReport": "repfuse.report",
    "RegionReport": "repfuse.report",
    "VerifyReport": "repfuse.report",
    "Check": "repfuse.report",
    "QuantizeResult": "repfuse.quant.report",
    "QuantizeReport": "repfuse.quant.report",
    "LayerReport": "repfuse.quant.report",
    "BranchOutlier": "repfuse.quant.report",
}

__all__ = ["fuse", "fuse_onnx", "verify", "export_onnx", "quantize", *_LAZY, "ReparamError",
           "NotFusable", "InputError", "VerificationError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repfuse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
