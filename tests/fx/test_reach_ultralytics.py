"""ultralytics models built from the package's bundled YAML configs (no weights, nothing
downloaded) through ``repfuse.fuse``: no BatchNorm2d left, at most the convolutions and
parameters of ultralytics' own ``fuse()``, the same outputs within the verification
tolerance, every conv and norm layer accounted for, and the fused model still predicts
through its own ``_predict_once``.

ultralytics' ``fuse()`` also deletes the end-to-end heads' branch that inference never
runs (``Detect.fuse``); repfuse does not delete modules it did not fuse, so the counts are
compared after the same deletion on the fused model.

Every model is fused without the per-region proofs (their cost, seconds per model, is
the subject of the benchmarks); two of them are fused with the proofs and must come
back ``ok``. RT-DETR's decoder selects its queries with TopK, so its outputs are compared
where the selection starts: at the decoder's inputs.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile

import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repfuse-ultralytics-"))
from ultralytics.nn import tasks  # noqa: E402  (a test dependency: never skipped)
from ultralytics.nn.modules.head import Detect, RTDETRDecoder  # noqa: E402

import repfuse  # noqa: E402
from repfuse.proofs import compare  # noqa: E402
from repfuse.report import LayerStatus  # noqa: E402

logging.getLogger("ultralytics").setLevel(logging.ERROR)

#: name -> model class (all at 64x64)
MODELS = {
    "yolov8n": tasks.DetectionModel, "yolo11n": tasks.DetectionModel,
    "yolov9t": tasks.DetectionModel, "yolov10n": tasks.DetectionModel,
    "yolov6n": tasks.DetectionModel, "rtdetr-l": tasks.RTDETRDetectionModel,
    "yolov8n-cls": tasks.ClassificationModel, "yolov8n-seg": tasks.SegmentationModel,
}
SIZE = 64


def build(name: str, seed: int = 0) -> nn.Module:
    """The model from its YAML with random weights and realistic BN statistics."""
    torch.manual_seed(seed)
    model = MODELS[name](f"{name}.yaml", verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def counts(model: nn.Module) -> tuple[int, int, int]:
    """(BatchNorm2d, Conv2d, parameters)."""
    return (sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
            sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            sum(p.numel() for p in model.parameters()))


def drop_unused_heads(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, Detect):
            Detect.fuse(m)
    return model


class HeadInputs:
    """What the model hands its RT-DETR decoder (a forward pre-hook, removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.head = next(m for m in model.modules() if isinstance(m, RTDETRDecoder))
        self.seen: list = []

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(
            lambda m, args: self.seen.append([t.clone() for t in args[0]]))
        return self.seen

    def __exit__(self, *exc):
        self.handle.remove()


def outputs(model: nn.Module, name: str, x: torch.Tensor):
    """The model's outputs, or for RT-DETR its decoder's inputs (before the selection)."""
    with torch.no_grad():
        if name != "rtdetr-l":
            return model(x)
        with HeadInputs(model) as seen:
            model(x)
        return seen[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ultralytics_model_fuses_like_its_own_fuse(name):
    model = build(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    theirs = counts(copy.deepcopy(model).fuse(verbose=False))
    result = repfuse.fuse(model, x, verify=False)
    report, fused = result.report, result.model
    ref, out = outputs(model, name, x), outputs(fused, name, x)
    for a, r in zip(_tensors(out), _tensors(ref), strict=True):
        check = compare("output", r, a)   # the float32 verification tolerance
        assert check.ok, check
    if name != "rtdetr-l":
        with torch.no_grad():
            own = fused._predict_once(x)   # the model's own layer loop
        for a, b in zip(_tensors(own), _tensors(out), strict=True):
            assert torch.equal(a, b)
    bn, convs, params = counts(drop_unused_heads(fused))
    assert bn == 0
    assert convs <= theirs[1] and params <= theirs[2], (counts(fused), theirs)
    # every BN layer is reported fused; nothing is reported fused that is still there
    norms = [la for la in report.layers if la.type == "BatchNorm2d"]
    assert norms and all(la.status is LayerStatus.FUSED for la in norms)
    assert report.counts()["norms"][1] == report.norms[1] == sum(
        la.status is not LayerStatus.FUSED for la in report.layers if la.kind == "norm")


@pytest.mark.parametrize("name", ["yolov8n", "yolov8n-cls"])
def test_ultralytics_fused_model_is_proven(name):
    model = build(name)
    result = repfuse.fuse(model, torch.randn(1, 3, SIZE, SIZE))
    assert result.report.ok, result.report.to_dict()
    assert result.report.verified and len(result.report.fused) >= 26


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def test_convert_factory_ultralytics_model(tmp_path):
    """``repfuse convert --factory`` on a model built from ultralytics' YAML: written,
    verified, and the summary and JSON give the whole-model counts."""
    from click.testing import CliRunner

    from repfuse.cli.main import cli

    factory = tmp_path / "yolo_cls.py"
    factory.write_text("from ultralytics.nn.tasks import ClassificationModel\n\n\n"
                       "def build():\n"
                       "    return ClassificationModel('yolov8n-cls.yaml', verbose=False)\n")
    out, report = tmp_path / "yolov8n-cls.pt", tmp_path / "report.json"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [
        "convert", "--factory", f"{factory}:build", "--input-shape", f"1,3,{SIZE},{SIZE}",
        "-o", str(out), "--json", str(report)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "26 region(s) fused, 0 left alone; convs 26 -> 26, norms 26 -> 0" in result.output
    data = __import__("json").loads(report.read_text())
    assert data["report"]["ok"] and data["report"]["norms"] == [26, 0]
    state = torch.load(out, weights_only=True)
    fused = repfuse.fuse(build("yolov8n-cls"), torch.randn(1, 3, SIZE, SIZE), verify=False)
    fused.model.load_state_dict(state)   # the fused structure, keys as written
