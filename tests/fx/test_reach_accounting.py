"""Every conv and norm layer of the input model is in the report: fused, unchanged, left
alone with a reason, or not reached with the reason; the whole-model counts are in the
JSON and the command-line summary says "0 left alone" only when it is true."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers.reach_idioms import ConvBNAct, RepBlock, randomize
from torch import nn

import repfuse
from repfuse.cli.render import region_counts
from repfuse.report import LayerStatus


class Untraceable(nn.Module):
    """Calls a conv and a BN directly from Python that a tracer cannot follow."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.tail = RepBlock(8)
        self.spare = ConvBNAct(8, 8)           # never called

    def forward(self, x):
        if x.abs().max() > 0:                  # data-dependent: not traceable
            x = F.relu(self.bn(self.conv(x)))
        return self.tail(x)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvBNAct(3, 8, 3)
        self.lone = nn.BatchNorm2d(8)          # between two nonlinear ops
        self.stats = RepBlock(8, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.lone(F.relu(self.a(x))))
        return self.head(self.stats(x))


def outcome(report) -> dict[str, tuple[LayerStatus, str]]:
    return {la.path: (la.status, la.reason) for la in report.layers}


def test_layers_called_from_untraceable_code_are_not_reached_with_the_reason():
    model = randomize(Untraceable())
    report = repfuse.fuse(model, torch.randn(1, 3, 16, 16)).report
    got = outcome(report)
    assert set(got) == {p for p, m in model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    for path in ("conv", "bn"):
        status, reason = got[path]
        assert status is LayerStatus.NOT_REACHED
        assert reason.startswith("inside the model (Untraceable): not traceable: ")
    for path in ("spare.conv", "spare.bn"):
        assert got[path] == (LayerStatus.NOT_REACHED,
                             "not called when the model runs on the example inputs")
    assert all(got[p][0] is LayerStatus.FUSED for p in got if p.startswith("tail."))
    assert report.ok and report.left_alone == 0
    assert report.convs == (4, 3) and report.norms == (5, 2)
    assert region_counts(report) == ("1 region(s) fused, 0 left alone, 4 layer(s) not "
                                     "reached; convs 4 -> 3, norms 5 -> 2")


def test_norms_no_region_holds_are_left_alone_and_counted():
    model = randomize(Mixed())
    result = repfuse.fuse(model, torch.randn(1, 3, 16, 16))
    report = result.report
    got = outcome(report)
    assert got["a.conv"][0] is got["a.bn"][0] is LayerStatus.FUSED
    assert got["lone"] == (LayerStatus.LEFT_ALONE, "a lone batch norm between nonlinear ops: "
                                                   "no conv next to it to fold into")
    assert got["head"] == (LayerStatus.UNCHANGED, "nothing linear next to it to fold into it")
    stats = [got[p] for p in got if p.startswith("stats.")]
    assert len(stats) == 5 and all(s is LayerStatus.LEFT_ALONE for s, _ in stats)
    assert all("no running statistics" in r for _, r in stats)
    assert report.left_alone == 2        # the refused region and the lone BN
    line = region_counts(report)
    assert "0 left alone" not in line and line.endswith("convs 4 -> 4, norms 5 -> 4")
    data = report.to_dict()
    assert data["convs"] == [4, 4] and data["norms"] == [5, 4]
    assert {d["path"]: d["status"] for d in data["layers"]}["lone"] == "left alone"
