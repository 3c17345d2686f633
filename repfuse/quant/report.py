"""What ``repfuse.quantize`` returns: the QDQ model and the doctor's report.

Library code never prints: the CLI renders these. Every report has ``.to_dict()``
(JSON-safe: infinite SQNRs, e.g. of a layer whose weights quantize exactly, become
strings).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import onnx

from repfuse.report import FuseReport, _clean


@dataclass
class BranchOutlier:
    """A training-form branch whose BatchNorm scale ``|gamma| / sqrt(var + eps)`` is an
    outlier of its fused layer: ``scale`` is ``ratio`` times the median of every BN scale
    the layer was folded from (a dead channel's identity BN typically)."""

    layer: str          # the fused layer (torch module path, or ONNX node name)
    branch: str         # the BatchNorm module path (or ONNX node name) it came from
    channel: int
    scale: float
    median: float

    @property
    def ratio(self) -> float:
        return self.scale / self.median if self.median > 0 else math.inf

    def to_dict(self) -> dict:
        return _clean({**asdict(self), "ratio": self.ratio})


@dataclass
class LayerReport:
    """One weighted node of the fused model (Conv, Gemm, MatMul with a constant weight).

    Weight SQNRs (dB) are of the weights as onnxruntime's quantizer writes them (read back
    from the QDQ model), per output channel; ``*_median`` is the typical channel, ``*_min``
    the worst one (a channel crushed by a per-tensor scale shows here). ``sensitivity``:
    the model's output SQNR (dB) on the calibration data when only this layer is quantized
    (lower = more sensitive). ``weight_zeroed_*``: the worst output channel's fraction of
    non-zero weights that quantize to zero (one huge weight sets its channel's scale and
    erases the rest, which the energy-weighted SQNR hardly shows)."""

    node: str                       # ONNX node name in the fused model
    module: str                     # torch module path it came from ("" when unknown)
    op: str
    weight_shape: list[int]
    weight_min: float
    weight_max: float
    weight_absmax_channel: int      # the output channel holding the largest |weight|
    weight_sqnr_tensor_median: float
    weight_sqnr_tensor_min: float
    weight_sqnr_channel_median: float
    weight_sqnr_channel_min: float
    weight_zeroed_tensor: float
    weight_zeroed_channel: float
    act_min: float                  # the layer's output range over the calibration data
    act_max: float
    sensitivity: float | None = None
    kept_float: bool = False
    outliers: list[BranchOutlier] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.module or self.node

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "outliers"}
        d["outliers"] = [o.to_dict() for o in self.outliers]
        return _clean(d)


@dataclass
class Latency:
    """onnxruntime latency (ms, median, batch 1, all graph optimizations), measured
    alternately in one run: ``float_ms`` the fused float model, ``int8_ms`` the written
    one, ``all_int8_ms`` with every layer quantized (when some were kept in float)."""

    float_ms: float
    int8_ms: float
    all_int8_ms: float | None = None
    threads: int | None = None
    repeat: int = 0

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else math.inf

    def to_dict(self) -> dict:
        return _clean({**asdict(self), "speedup": self.speedup})


@dataclass
class QuantizeReport:
    """The doctor's report. ``ok``: the INT8 model runs in onnxruntime with finite
    outputs and its output SQNR against the float model reaches ``target_sqnr``."""

    source: str
    per_channel: bool
    target_sqnr: float
    reduce_range: bool = False      # 7-bit weights (onnxruntime's reduce_range)
    calibration: dict = field(default_factory=dict)    # samples, shape, source, notes
    steps: list[str] = field(default_factory=list)      # what was done, in order
    notes: list[str] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    outliers: list[BranchOutlier] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    output_sqnr: float = math.nan
    output_sqnr_all_int8: float = math.nan
    top1_agreement: float | None = None
    finite: bool = True
    latency: Latency | None = None
    fuse_report: FuseReport | None = None

    @property
    def ok(self) -> bool:
        return self.finite and self.output_sqnr >= self.target_sqnr

    def to_dict(self) -> dict:
        return _clean({
            "ok": self.ok, "source": self.source, "per_channel": self.per_channel,
            "reduce_range": self.reduce_range, "target_sqnr": self.target_sqnr,
            "calibration": self.calibration,
            "steps": self.steps, "notes": self.notes,
            "output_sqnr": self.output_sqnr, "output_sqnr_all_int8": self.output_sqnr_all_int8,
            "top1_agreement": self.top1_agreement, "finite": self.finite,
            "kept_float": self.kept_float,
            "latency": self.latency.to_dict() if self.latency else None,
            "layers": [r.to_dict() for r in self.layers],
            "outliers": [o.to_dict() for o in self.outliers],
            "fuse_report": self.fuse_report.to_dict() if self.fuse_report else None,
        })


@dataclass
class QuantizeResult:
    """``model``: the INT8 ``onnx.ModelProto`` in QDQ form; ``float_model``: the fused
    float model it was quantized from; ``report``: a ``QuantizeReport``."""

    model: onnx.ModelProto
    float_model: onnx.ModelProto
    report: QuantizeReport
