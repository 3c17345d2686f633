"""How often ``repfuse.fuse(verify=True)`` returns a proven model on random instances.

Each instance is an ultralytics model built from its bundled YAML with weights and
BatchNorm statistics drawn from a different seed (nothing downloaded), fused with
verification in float32 on a random input; the script prints, per model, how many
instances verified and the figures of any that did not.

    .venv/bin/python benchmarks/verdicts.py [--models yolov9t,rtdetr-l] [--instances 7]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repfuse-ultralytics-"))
from yolo import build  # noqa: E402

import repfuse  # noqa: E402
from repfuse.errors import VerificationError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov9t")
    parser.add_argument("--instances", type=int, default=7)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    for name in args.models.split(","):
        ok, notes = 0, []
        for seed in range(args.instances):
            model = build(name, seed)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(1, 3, args.size, args.size, generator=gen)
            try:
                report = repfuse.fuse(model, x).report
                ok += report.ok
                notes += [f"seed {seed}: {n[:110]}" for n in report.model_checks.notes]
            except VerificationError as err:
                notes.append(f"seed {seed}: FAILED {str(err)[:200]}")
        print(f"{name}: {ok}/{args.instances} verified at 1,3,{args.size},{args.size}", flush=True)
        for line in notes:
            print("  " + line)


if __name__ == "__main__":
    main()
