"""onnxruntime latency of the float and INT8 models, measured alternately in one run
(the ratio is the figure; absolute times depend on the machine and its load)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from repfuse.quant.evaluate import session


def measure_latency(models: dict[str, onnx.ModelProto], name: str, sample: np.ndarray, *,
                    repeat: int = 20, warmup: int = 3,
                    threads: int | None = None) -> dict[str, float]:
    """Median milliseconds per call of each model on ``sample`` (batch 1), every model
    called once per round so that they share the machine's state."""
    sessions = {key: session(proto, threads) for key, proto in models.items()}
    feed = {name: np.ascontiguousarray(sample[:1])}
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for round_ in range(warmup + repeat):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            if round_ >= warmup:
                times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}
