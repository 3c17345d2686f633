"""INT8 after fusion on real data: held-out accuracy, output SQNR and onnxruntime latency
of a RepVGG-style digits classifier (the one the tests train), float vs INT8 per tensor,
per channel and keep-float auto; then with QARepVGG's dead-channel outlier planted.

Latency ratios are float / INT8 measured alternately in the same run (batch 1, all graph
optimizations); output SQNR is against the fused float model on the calibration data.

    .venv/bin/python benchmarks/quantize_digits.py [--threads 1] [--repeat 200] [--save DIR]

``--save DIR`` also writes what ``repfuse quantize`` needs to reproduce the planted case
from the command line: ``digits_planted.pt`` (state dict of ``DigitsNet``) and
``digits_calib.npy`` (the calibration images).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

# benchmarks/onnx.py would shadow the onnx package: run with tests/ first, not benchmarks/
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))
import helpers.digits as dn  # noqa: E402

from repfuse.quant.evaluate import run  # noqa: E402
from repfuse.quant.pipeline import quantize_model  # noqa: E402

MODES = [("INT8 per tensor", False, "none"), ("INT8 per channel", True, "none"),
         ("INT8 auto (per channel)", True, "auto"), ("INT8 auto (per tensor)", False, "auto")]


def rows(model, data, calib, threads, repeat):
    with torch.no_grad():
        float_acc = dn.accuracy(model(torch.from_numpy(data.test_x)).numpy(), data.test_y)
    out = [("float (training form, torch)", float_acc, None, None, "")]
    fused_done = False
    for label, per_channel, keep in MODES:
        result = quantize_model(model, calib, per_channel=per_channel, keep_float=keep,
                                latency_repeat=repeat, threads=threads)
        report = result.report
        if not fused_done:
            acc = dn.accuracy(run(result.float_model, "x", data.test_x)[0], data.test_y)
            out.append(("fused (ONNX float)", acc, None, None, ""))
            fused_done = True
        acc = dn.accuracy(run(result.model, "x", data.test_x)[0], data.test_y)
        kept = ", ".join(report.kept_float) or "-"
        out.append((label, acc, report.output_sqnr, report.latency.speedup, kept))
    return out


def show(title, table):
    print(f"\n{title}")
    print(f"{'model':30} {'accuracy':>9} {'SQNR dB':>8} {'float/INT8':>10}  kept in float")
    for label, acc, db, speed, kept in table:
        db_text = f"{db:8.1f}" if db is not None else f"{'-':>8}"
        speed_text = f"{speed:9.2f}x" if speed is not None else f"{'-':>10}"
        print(f"{label:30} {acc * 100:8.2f}% {db_text} {speed_text}  {kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--save", metavar="DIR", help="write the planted model's state dict "
                        "and the calibration batch there")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = dn.load()
    model = dn.trained()
    calib = data.train_x[:args.calibration]
    print(f"digits: {len(data.train_x)} training / {len(data.test_x)} held-out images, "
          f"calibration on {len(calib)} training images; onnxruntime {args.threads} thread(s)")
    show("trained model", rows(model, data, calib, args.threads, args.repeat))
    planted, branch, channel = dn.plant_dead_channel(model, data)
    if args.save:
        torch.save(planted.state_dict(), os.path.join(args.save, "digits_planted.pt"))
        np.save(os.path.join(args.save, "digits_calib.npy"), calib)
    show(f"planted: {branch} channel {channel} scale 400 (its input channel dead)",
         rows(planted, data, calib, args.threads, args.repeat))


if __name__ == "__main__":
    main()
