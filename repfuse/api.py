"""The public API: ``fuse``, ``fuse_onnx``, ``verify``, ``export_onnx``."""

from __future__ import annotations


def fuse(model, example_inputs, *, verify=True, inplace=False, tol=None):
    """Fuse every linear multi-branch region of ``model`` into one conv."""
    raise NotImplementedError("repfuse.fuse is not implemented yet")


def fuse_onnx(model, *, verify=True):
    """Fuse the linear regions of a training-form ONNX model."""
    raise NotImplementedError("repfuse.fuse_onnx is not implemented yet")


def verify(reference, candidate, example_inputs, *, grads=True, tol=None):
    """Check that ``candidate`` computes what ``reference`` computes."""
    raise NotImplementedError("repfuse.verify is not implemented yet")


def export_onnx(model, example_inputs, path, *, opset=18, dynamic_batch=True, check=True):
    """Export ``model`` to ONNX, atomically, checked with onnxruntime."""
    raise NotImplementedError("repfuse.export_onnx is not implemented yet")
