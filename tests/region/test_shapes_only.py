"""The shape-only run decides nothing that the values would decide otherwise.

``region.Attempts`` asks ``region.worth.shapes_or_refusal`` (the reducers on ``meta``
tensors, as ``region.shape_refusal``) before it reduces a region part with values. That
run must refuse exactly the parts that the reduction with values would refuse for a
reason of shapes, with the same reason, and nothing else: fusing random blocks with it and
without it gives the same regions, the same outcomes and the same reasons, and every
refusal it makes is one ``reduce`` and ``check_growth`` make too.
"""

from __future__ import annotations

import pytest
import torch
from helpers.fuzz_blocks import block_specs
from helpers.fuzz_layers import layer_block_specs
from hypothesis import HealthCheck, given, settings
from torch import nn

import repfuse
from repfuse import region as rg
from repfuse.algebra import sequential, transposed
from repfuse.errors import NotFusable
from repfuse.region import worth


def _outcomes(report, reasons: bool = True):
    return [(r.path, str(r.status), r.reason if reasons else "", r.result, tuple(r.branches))
            for r in report.regions]


def _fuse(spec):
    block = spec.module().double()
    return repfuse.fuse(block, spec.example_input(torch.float64), verify=False).report


def _same_with_and_without_shapes(spec, monkeypatch):
    refused: list = []
    real = worth.shapes_or_refusal

    def checked(expr):
        shapes, err = real(expr)
        if err is not None:
            refused.append((expr, err))
        return shapes, err
    with monkeypatch.context() as m:
        m.setattr(worth, "shapes_or_refusal", checked)
        with_shapes = _fuse(spec)
    with monkeypatch.context() as m:
        m.setattr(worth, "shapes_or_refusal", lambda expr: (None, None))
        without = _fuse(spec)
    # the same regions and outcomes; a reason differs only where a part has two (the
    # shapes decide growth before the values would find, say, a pad value that is not
    # the bias): then both runs refuse it, each naming a true reason
    assert _outcomes(with_shapes, reasons=False) == _outcomes(without, reasons=False)
    refused_by_shapes = {str(err) for _, err in refused}
    for a, b in zip(_outcomes(with_shapes), _outcomes(without)):
        assert a == b or a[2] in refused_by_shapes, (a, b)
    for expr, err in refused:            # a refusal by shapes is one by values too
        with pytest.raises((NotFusable, ValueError)) as raised:
            rg.check_growth(expr, rg.reduce(expr))
        if str(err).startswith("fusing would multiply") or str(raised.value) == str(err):
            continue
        # the values refused first for a reason of values (a pad value that is not the
        # bias, say), which the shapes cannot see: with every condition on values taken to
        # hold, as the shape-only run takes them, the values give the shapes' reason
        with monkeypatch.context() as m:
            for module in (sequential, transposed):
                m.setattr(module, "holds", lambda flag: True)
            with pytest.raises((NotFusable, ValueError)) as again:
                rg.check_growth(expr, rg.reduce(expr))
        assert str(again.value) == str(err), (str(raised.value), str(err))


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=block_specs())
def test_blocks_fuse_the_same_with_shape_only_refusals(spec, monkeypatch):
    _same_with_and_without_shapes(spec, monkeypatch)


@SETTINGS
@given(spec=layer_block_specs())
def test_layer_blocks_fuse_the_same_with_shape_only_refusals(spec, monkeypatch):
    _same_with_and_without_shapes(spec, monkeypatch)


def test_attempts_ask_the_shapes_first(monkeypatch):
    """The function the tests above replace is the one ``Attempts`` asks: a depthwise 3x3
    followed by a dense 1x1 would grow 5.8x as one conv, which its shapes refuse before
    any kernel is computed; parts of it are then reduced with values (each a conv and its
    norm: ``worth.direct``, reduced without a shape-only run)."""
    asked = []
    real = worth.shapes_or_refusal

    def recording(expr):
        out = real(expr)
        asked.append(out[1])
        return out

    monkeypatch.setattr(worth, "shapes_or_refusal", recording)
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)).eval()
    report = repfuse.fuse(block, torch.randn(1, 16, 8, 8), verify=False).report
    assert any(err is not None and "multiply" in str(err) for err in asked)
    assert report.search["attempts"] == len(asked) + 2 and report.search["reductions"] == 2
    assert report.fused     # a part of it fuses (the norms folded into the 1x1)
