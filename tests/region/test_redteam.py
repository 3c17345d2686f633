"""Hostile values in a region: tensors without values and weights that make the fused
kernel NaN or infinite are refused by ``reduce`` (never fused into a silent NaN conv)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import repfuse
from repfuse.core.spec import ConvSpec
from repfuse.errors import InputError, NotFusable
from repfuse.region import Add, BatchNorm, Conv, Input, Scale, reduce
from repfuse.region.reference import evaluate

D = torch.float64


def _branches(running_var, eps=1e-5, weight=None, factor=1.0):
    """conv3x3 + BN('bad') on the input, plus a scaled identity."""
    g = torch.Generator().manual_seed(0)
    c = running_var.numel()
    w = torch.randn(c, c, 3, 3, generator=g, dtype=D) if weight is None else weight
    conv = Conv(Input(c), w, None, ConvSpec(c, c, 3, padding=1), "conv")
    bn = BatchNorm(conv, torch.randn(c, generator=g, dtype=D), running_var, None, None, eps,
                   "bad")
    return Add((bn, Scale(Input(c), factor, "s")))


def test_finite_region_still_reduces_exactly():
    expr = _branches(torch.rand(4, dtype=D) + 0.5)
    x = torch.randn(2, 4, 7, 6, dtype=D)
    assert (reduce(expr).forward(x) - evaluate(expr, x)).abs().max() < 1e-10


@pytest.mark.parametrize("var, eps", [(-0.5, 1e-5), (0.0, 0.0)])
def test_invalid_running_var_is_refused_naming_the_bn(var, eps):
    running_var = torch.rand(4, dtype=D) + 0.5
    running_var[1] = var
    # the training form is NaN/Inf there too: nothing exact to fuse
    assert not torch.isfinite(evaluate(_branches(running_var, eps), torch.ones(1, 4, 5, 5,
                                                                              dtype=D))).all()
    with pytest.raises(NotFusable, match="BatchNorm 'bad'.*NaN or infinite"):
        reduce(_branches(running_var, eps))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_conv_weight_is_refused(bad):
    w = torch.randn(4, 4, 3, 3, dtype=D)
    w[2, 1, 0, 0] = bad
    with pytest.raises(NotFusable, match="Conv 'conv'.*NaN or infinite"):
        reduce(_branches(torch.ones(4, dtype=D), weight=w))


def test_division_by_zero_scale_is_refused():
    with pytest.raises(NotFusable, match="Scale 's'.*NaN or infinite"):
        reduce(_branches(torch.ones(4, dtype=D), factor=float("inf")))


def test_meta_tensors_are_an_input_error():
    spec = ConvSpec(4, 4, 3, padding=1)
    expr = Add((Conv(Input(4), torch.empty(4, 4, 3, 3, device="meta"), None, spec, "m"),
                Input(4)))
    with pytest.raises(InputError, match="Conv 'm'.*'meta' device.*to_empty"):
        reduce(expr)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


def test_fuse_of_a_meta_model_is_a_clear_input_error():
    with torch.device("meta"):
        model = _Block().eval()
    with pytest.raises(InputError, match="'meta' device"):
        repfuse.fuse(model, torch.randn(1, 4, 8, 8, device="meta"), verify=False)


def test_fuse_leaves_a_negative_variance_branch_alone():
    torch.manual_seed(0)
    model = _Block().double().eval()
    with torch.no_grad():
        model.a[1].running_var[0] = -1.0
    x = torch.randn(1, 4, 8, 8, dtype=D)
    result = repfuse.fuse(model, x, verify=False)
    reasons = " ".join(r.reason for r in result.report.skipped)
    assert "BatchNorm 'a.1'" in reasons and "NaN or infinite" in reasons
    for m in result.model.modules():  # no fused conv carries NaN
        if isinstance(m, nn.Conv2d) and m is not model.a[0]:
            assert torch.isfinite(m.weight).all()
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    assert torch.equal(torch.isnan(ref), torch.isnan(out))
    finite = torch.isfinite(ref)
    assert (ref[finite] - out[finite]).abs().max() < 1e-10
