"""Running a float or QDQ model with onnxruntime and comparing outputs: SQNR and top-1
agreement. The QDQ model runs with every graph optimization, i.e. with onnxruntime's
integer kernels, as it would be deployed."""

from __future__ import annotations

import math

import numpy as np
import onnx

from repfuse.onnx.runtime import ort_reason, ort_session


def session(proto: onnx.ModelProto, threads: int | None = None):
    """An optimized onnxruntime CPU session; a model it refuses is a ``RuntimeError``."""
    try:
        return ort_session(proto, optimize=True, threads=threads)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise RuntimeError(f"onnxruntime cannot load the model ({ort_reason(exc)})") from None


def run(proto_or_session, name: str, data: np.ndarray, *, batch: int = 16,
        threads: int | None = None) -> list[np.ndarray]:
    """Every output of the model on ``data``, run ``batch`` samples at a time."""
    sess = proto_or_session if not isinstance(proto_or_session, onnx.ModelProto) \
        else session(proto_or_session, threads)
    parts = [sess.run(None, {name: data[i:i + batch]}) for i in range(0, len(data), batch)]
    return [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(parts[0]))]


def sqnr(reference, test) -> float:
    """Signal-to-quantization-noise ratio in dB, over every output together:
    ``10 log10(sum ref^2 / sum (ref - test)^2)``; ``inf`` when they are equal."""
    ref = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in reference])
    got = np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in test])
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def top1_agreement(reference, test) -> float | None:
    """Fraction of samples whose arg-max class agrees, for a classifier (first output of
    shape (N, K), K > 1); None for other models."""
    ref, got = np.asarray(reference[0]), np.asarray(test[0])
    if ref.ndim != 2 or ref.shape[1] < 2 or ref.shape != got.shape:
        return None
    return float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))


def all_finite(outputs) -> bool:
    return all(bool(np.isfinite(np.asarray(o)).all()) for o in outputs)


class Scorer:
    """Output SQNR (dB) of candidate models against the float model on fixed data."""

    def __init__(self, float_proto: onnx.ModelProto, name: str, data: np.ndarray, *,
                 batch: int = 16, threads: int | None = None):
        self.name, self.data, self.batch, self.threads = name, data, batch, threads
        self.reference = run(float_proto, name, data, batch=batch, threads=threads)

    def outputs(self, proto: onnx.ModelProto) -> list[np.ndarray]:
        return run(proto, self.name, self.data, batch=self.batch, threads=self.threads)

    def sqnr(self, proto: onnx.ModelProto) -> float:
        return sqnr(self.reference, self.outputs(proto))
