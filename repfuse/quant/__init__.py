"""INT8 after fusion: a quantization doctor and a checked QDQ export, built on
``onnxruntime.quantization`` (the public entry point is ``repfuse.quantize``).

The package is ``repfuse.quant``, not ``repfuse.quantize``: a submodule and the public
function would be the same attribute of ``repfuse``.

calibration, images   calibration data in, validated
prepare               fuse and prove (torch or ONNX), export: the float model to quantize
qdq                   onnxruntime's quantize_static, calibrated once
weights, mapping      weighted layers, their INT8 weights, the torch module each came from
bnscale               training-form BatchNorm scale outliers, named by branch and channel
doctor, keepfloat     per-layer figures and sensitivity; what stays in float
evaluate, latency     output SQNR / top-1 agreement; onnxruntime latency float vs INT8
report                QuantizeResult, QuantizeReport, LayerReport, BranchOutlier, Latency
pipeline              quantize_model, the whole sequence
"""

from repfuse.quant.report import (
    BranchOutlier,
    Latency,
    LayerReport,
    QuantizeReport,
    QuantizeResult,
)

__all__ = ["BranchOutlier", "LayerReport", "Latency", "QuantizeReport", "QuantizeResult"]
