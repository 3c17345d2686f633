"""The quantizer: onnxruntime's static QDQ quantization (``quantize_static``), calibrated
once and applied as often as the doctor needs (all layers, one layer, all but some).

Activations are uint8 (asymmetric), weights int8 (symmetric), MinMax calibration: the
combination onnxruntime recommends for CPU. Weights are per output channel or per tensor.
When this onnxruntime can cache its calibration (``calibration_cache_path``), the
calibration pass runs once; older versions calibrate on every call (same result, slower).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from repfuse.errors import InputError, first_line

#: Ops whose presence means a model is already quantized.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QGemm"})


def quantization():
    """``onnxruntime.quantization``, or ``InputError`` saying how to install it."""
    try:
        import onnxruntime.quantization as q
    except ImportError:
        raise InputError("INT8 quantization needs onnxruntime (its quantization tools); "
                         "pip install 'repfuse[onnxruntime]'") from None
    return q


def quantized_ops(proto: onnx.ModelProto) -> list[str]:
    """The quantization ops in ``proto``'s main graph (empty for a float model)."""
    return sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS})


@contextlib.contextmanager
def _contained_logging():
    """onnxruntime's quantizer logs through the root logger (``logging.warning``), which
    installs a stderr handler when the process has none: give it a silent one meanwhile."""
    root = logging.getLogger()
    handler = logging.NullHandler() if not root.handlers else None
    if handler is not None:
        root.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)


@contextlib.contextmanager
def _quantizer_errors():
    """onnxruntime's quantizer raises many kinds on graphs it cannot handle: one
    ``InputError`` naming the reason."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"onnxruntime's quantizer cannot quantize this model "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def input_name(proto: onnx.ModelProto) -> str:
    """The model's single input (quantization calibrates one input)."""
    inits = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    if len(names) != 1:
        raise InputError(f"the model has {len(names)} inputs ({', '.join(names[:4])}); INT8 "
                         "calibration supports models with one input")
    return names[0]


def _reader_class(q):
    class Reader(q.CalibrationDataReader):
        """Feeds ``data`` in batches of ``batch`` samples to input ``name``."""

        def __init__(self, name: str, data: np.ndarray, batch: int):
            self.feeds = [{name: data[i:i + batch]} for i in range(0, len(data), batch)]
            self.position = 0

        def get_next(self):
            if self.position >= len(self.feeds):
                return None
            self.position += 1
            return self.feeds[self.position - 1]

        def __len__(self):
            return len(self.feeds)

    return Reader


class QdqQuantizer:
    """Quantizes one float model calibrated on ``data`` (float32, the model's input shape).

    Use as a context manager (it owns a temporary folder for onnxruntime's files)."""

    def __init__(self, proto: onnx.ModelProto, data: np.ndarray, *, batch: int = 16,
                 reduce_range: bool = False):
        self.q = quantization()
        self.reduce_range = reduce_range
        self.proto = proto
        self.data = data
        self.batch = batch
        self.name = input_name(proto)
        self._tmp = tempfile.TemporaryDirectory(prefix="repfuse-int8-")
        self.folder = Path(self._tmp.name)
        self.model_path = self.folder / "float.onnx"
        onnx.save_model(proto, os.fspath(self.model_path))
        caching = "calibration_cache_path" in inspect.signature(self.q.quantize_static).parameters
        self.cache = self.folder / "calibration.json" if caching else None
        self.calls = 0

    def __enter__(self) -> QdqQuantizer:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def quantize(self, *, per_channel: bool, exclude: Iterable[str] = (),
                 only: Iterable[str] | None = None) -> onnx.ModelProto:
        """The QDQ model with weights ``per_channel`` (or per tensor); the nodes named in
        ``exclude`` stay float; with ``only`` just those nodes are quantized."""
        q = self.q
        out = self.folder / f"int8_{self.calls}.onnx"
        self.calls += 1
        kwargs = {"calibration_cache_path": os.fspath(self.cache)} if self.cache else {}
        reader = _reader_class(q)(self.name, self.data, self.batch)
        with _contained_logging(), _quantizer_errors():
            q.quantize_static(
                os.fspath(self.model_path), os.fspath(out), reader,
                quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                reduce_range=self.reduce_range,
                activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                nodes_to_exclude=list(exclude), nodes_to_quantize=list(only or []),
                calibrate_method=q.CalibrationMethod.MinMax, **kwargs)
        model = onnx.load(os.fspath(out))
        out.unlink()
        return model
