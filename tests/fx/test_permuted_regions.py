"""Regions that move the channel axis (UniRepLKNet's channels-last FFN: Linear, permute to
NCHW, BatchNorm2d, layer scale; and the mirror, BatchNorm2d, permute to NHWC, Linear)
through ``repfuse.fuse``: the fused layer is the Linear with the norms and scales folded,
the permute kept after (before) it, in every grad mode; float64 outputs equal the training
form's, with the same strides."""

from __future__ import annotations

import pytest
import torch
from helpers.grad_modes import MODES
from helpers.layer_blocks import randomize
from helpers.unireplk import FFNTail, MirrorHead, MirrorNet, UniRepLKNetSmall
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import repfuse

NORMS = nn.modules.batchnorm._BatchNorm


def _linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def _strides(t: torch.Tensor) -> tuple:
    """The strides of the axes longer than one (the others' strides carry no meaning)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _fuse(model, x, mode: str = "enable_grad"):
    with MODES[mode]():
        result = repfuse.fuse(model, x)
    report = result.report
    assert report.ok and report.verified, report.to_dict()
    assert not report.skipped, [r.to_dict() for r in report.skipped]
    for region in report.fused:
        assert region.proofs is not None and region.proofs.ok, region.to_dict()
    return result


@pytest.mark.parametrize("mode", sorted(MODES))
def test_unireplknet_ffn_fuses_into_its_linear(mode):
    torch.manual_seed(0)
    model = randomize(UniRepLKNetSmall()).double()
    x = torch.randn(2, 3, 16, 14, dtype=torch.float64)
    result = _fuse(model, x, mode)
    fused = result.model
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    # one Linear per region: the three pwconv2 regions (Linear, permute, BN, layer
    # scale) each became the Linear, under the user's name, as in the authors' deploy form
    assert _linears(fused) == _linears(model)
    blocks = [b for stage in fused.stages for b in stage]
    assert len(blocks) == 3 and all(type(b.pwconv2) is nn.Linear for b in blocks)
    ffn = [r for r in result.report.fused if r.path.endswith("pwconv2")]
    assert len(ffn) == 3 and all(r.result == "linear+permute" for r in ffn)
    assert all("linear+bn+scale" in r.branches for r in ffn)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_fused_region_keeps_the_layout_and_strides_of_the_training_form():
    model = randomize(FFNTail(12, 5, bias=True, layer_scale=True)).double()
    x = torch.randn(2, 4, 3, 12, dtype=torch.float64)
    result = _fuse(model, x)
    with torch.no_grad():
        want, got = model(x), result.model(x)
    assert got.shape == want.shape == (2, 5, 4, 3)
    assert got.stride() == want.stride()
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert type(result.model.pwconv2) is nn.Linear    # the Linear, then the permute


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mirror_bn_before_permute_and_linear_folds_into_the_linear(mode):
    torch.manual_seed(0)
    model = randomize(MirrorNet()).double()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    result = _fuse(model, x, mode)
    fused = result.model
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    assert _linears(fused) == _linears(model)
    mirror = [r for r in result.report.fused if r.result == "permute+linear"]
    assert len(mirror) == 2 and all(r.branches == ["bn+linear"] for r in mirror)
    assert all(type(b.pwconv1) is nn.Linear for b in fused.blocks)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


@given(dim=st.integers(1, 6), ffn=st.integers(1, 9), h=st.integers(1, 5),
       w=st.integers(1, 5), bias=st.booleans(), layer_scale=st.booleans(),
       mirror=st.booleans(), seed=st.integers(0, 2**16))
def test_random_permuted_regions_match_the_unfused_module(dim, ffn, h, w, bias, layer_scale,
                                                          mirror, seed):
    torch.manual_seed(seed)
    if mirror:
        model, shape = MirrorHead(dim, ffn, bias), (2, dim, h, w)
    else:
        model, shape = FFNTail(ffn, dim, bias, layer_scale), (2, h, w, ffn)
    model = randomize(model, seed).double()
    x = torch.randn(shape, dtype=torch.float64)
    result = _fuse(model, x)
    assert len(result.report.fused) == 1
    assert not any(isinstance(m, NORMS) for m in result.model.modules())
    assert _linears(result.model) == 1
    with torch.no_grad():
        want = model(x)
        got = result.model(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert _strides(got) == _strides(want)
        other = torch.randn(3, *shape[1:], dtype=torch.float64)   # another batch
        torch.testing.assert_close(result.model(other), model(other), rtol=1e-12,
                                   atol=1e-12)
