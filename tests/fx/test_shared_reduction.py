"""With verification, a region is reduced once: the fuser's reduction runs on the proof's
float64 leaves with grad (``proofs.region.reduce_for_proof``), and the proof's adjoint
differentiates it instead of reducing the region again."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers.reach_idioms import IDIOMS
from helpers.zoo import ZOO, make, randomize_bn
from torch import nn

import repfuse
import repfuse.fx.pipeline as pipeline
import repfuse.proofs.region as proof_region
from repfuse import region as rg
from repfuse.models import create


def _model(name):
    torch.manual_seed(0)
    if name in IDIOMS:
        model, x, _ = IDIOMS[name]()
        return model, x
    if name in ZOO:
        return make(name).float(), torch.randn(2, 3, 12, 12)
    return create(name, seed=0), torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(ZOO) + sorted(IDIOMS) + [
    "acnet_resnet18", "dbb_resnet18", "mobileone_s0", "repvgg_a0"])
def test_verified_and_unverified_fusions_give_the_same_model(name):
    """The kernels reduced on float64 leaves are those ``region.reduce`` gives on the model's
    tensors, bit for bit, in the model's dtype (float32 here; kernels computed in forward
    are evaluated in float64 and cast back, as ``reduce`` does)."""
    model, x = _model(name)
    proven = repfuse.fuse(model, x, verify=True)
    plain = repfuse.fuse(model, x, verify=False)
    assert proven.report.ok, proven.report.to_dict()
    a, b = proven.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "dbb"])
def test_each_proven_region_is_reduced_once(name, monkeypatch):
    model, x = _model(name)
    calls = []
    real = rg.reduce

    def counted(expr):
        calls.append(expr)
        return real(expr)

    monkeypatch.setattr(rg, "reduce", counted)
    result = repfuse.fuse(model, x, verify=True)
    assert result.report.ok and result.report.fused
    assert len(calls) == result.report.search["reductions"]   # the proofs reduced none


def test_a_carried_reduction_lives_until_its_proof_only(monkeypatch):
    """The float64 leaves of a reduction are freed by its proof; those of the parts a cut
    search reduced (then dropped: ``fx.fuser._release``) are dead before the next proof,
    whose region is then reduced again by the proof itself."""
    def separable(c):
        return [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c),
                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)]

    torch.manual_seed(0)    # a conv+BN, then a chain refused whole (it would grow) and cut
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                       nn.ReLU(), *separable(8), *separable(8),
                                       *separable(8))).eval()
    x = torch.randn(1, 8, 12, 12)
    leaves: list[weakref.ref] = []
    real_reduce, real_prove = proof_region.reduce_for_proof, pipeline.prove_region
    fallbacks = []

    def recording(expr, shapes):
        fused = real_reduce(expr, shapes)
        if fused.carried is not None:
            leaves.extend(weakref.ref(t) for t in fused.carried.leaves.values())
        return fused

    def proving(expr, fused, activation=None, **kwargs):
        gc.collect()
        own = {id(t) for t in (fused.carried.leaves.values() if fused.carried else ())}
        alive = [r() for r in leaves if r() is not None]
        assert all(id(t) in own for t in alive), "a dropped reduction is still alive"
        del alive
        fallbacks.append(fused.carried is None)
        return real_prove(expr, fused, activation, **kwargs)

    monkeypatch.setattr(pipeline, "reduce_for_proof", recording)
    monkeypatch.setattr(pipeline, "prove_region", proving)
    result = repfuse.fuse(model, x, verify=True)
    assert result.report.ok and result.report.fused
    assert any(fallbacks) and not all(fallbacks)    # the design has a cut search
    gc.collect()
    assert leaves and all(r() is None for r in leaves)


def _reduced_at_once(model, x, dtype, n: int, monkeypatch):
    """``fuse(verify=True)`` of ``model``, checked: ``n`` regions fused and proven, no
    shape-only run, each reduced once (the proofs found their leaves in the format they
    run in), and the model bit-equal, in ``dtype``, to the unverified fusion's."""
    shape_runs, reductions = [], []
    real_shapes, real_reduce = rg.worth.shapes_or_refusal, rg.reduce
    monkeypatch.setattr(rg.worth, "shapes_or_refusal",
                        lambda expr: (shape_runs.append(expr), real_shapes(expr))[1])
    monkeypatch.setattr(rg, "reduce", lambda expr: (reductions.append(expr),
                                                    real_reduce(expr))[1])
    proven = repfuse.fuse(model, x, verify=True)
    assert proven.report.ok and len(proven.report.fused) == n, proven.report.to_dict()
    assert not shape_runs
    assert len(reductions) == proven.report.search["reductions"] == n
    plain = repfuse.fuse(model, x, verify=False).model.state_dict()
    for key, value in proven.model.state_dict().items():
        assert value.dtype == plain[key].dtype == dtype and torch.equal(value, plain[key]), key
    return proven


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_parts_are_reduced_once_without_a_shape_only_run(dtype, monkeypatch):
    """Parts with one conv (dense, depthwise, transposed, a Linear after a global pool) and
    their norms are reduced with values at once (``region.worth.direct``): no shape-only
    run is made for them, the proof finds its leaves in the format it runs in (it reduces
    none again), and the model is the one the unverified fusion gives, in its dtype."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))).eval()
    model, x = model.to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype)
    _reduced_at_once(model, x, dtype, 4, monkeypatch)


class _Branches(nn.Module):
    """Branches on one input, summed (a RepVGG / MobileOne block without its activation)
    or concatenated."""

    def __init__(self, *branches, cat=False):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.cat = cat

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        return torch.cat(outs, 1) if self.cat else sum(outs[1:], outs[0])


def _bn_conv(cin, cout, k, groups=1):
    k = k if isinstance(k, tuple) else (k, k)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=(k[0] // 2, k[1] // 2),
                                   groups=groups, bias=False), nn.BatchNorm2d(cout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_branches_are_reduced_once_without_a_shape_only_run(dtype, monkeypatch):
    """RepVGG's and MobileOne's blocks (branches of one conv each with their norms, and a
    norm, on one input, summed, the convs of one group count) are ``direct``: reduced with
    values at once, no shape-only run, the proof finds its leaves in the format it runs in
    (dense: channels-last, depthwise: contiguous; it reduces none again), and the model
    is the one the unverified fusion gives."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        _bn_conv(3, 8, 3), nn.ReLU(),
        _Branches(_bn_conv(8, 8, 3), _bn_conv(8, 8, 1), nn.BatchNorm2d(8)), nn.ReLU(),
        _Branches(_bn_conv(8, 8, 3, 8), _bn_conv(8, 8, 3, 8), _bn_conv(8, 8, 1, 8),
                  nn.BatchNorm2d(8)), nn.ReLU())).eval()
    model, x = model.to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype)
    proven = _reduced_at_once(model, x, dtype, 3, monkeypatch)
    assert sorted(len(r.branches) for r in proven.report.fused) == [1, 3, 4]


def test_parts_of_two_convs_or_large_ones_ask_their_shapes_first():
    """``direct`` holds for one conv with norms and scales up to ``DIRECT_LIMIT`` parameter
    elements, and for such branches summed whose convs have one group count; not for a
    conv reading another (their composition may grow), convs of different group counts
    summed (a depthwise kernel becomes dense), convs none of whose windows holds the
    others' (1x3 and 3x1 make a 3x3), branches concatenated, a pool, or a larger conv."""
    def fuse_block(*layers):
        torch.manual_seed(0)
        block = randomize_bn(nn.Sequential(*layers)).eval()
        repfuse.fuse(block, torch.randn(1, 4, 8, 8), verify=False)

    from repfuse.fx.fuser import Fuser
    seen = []
    real = Fuser._decide

    def recording(self, mg, an):
        chosen = real(self, mg, an)
        seen.extend(rg.direct(e) for _, e, _ in chosen)
        return chosen

    cases = [((nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), True),
             ((nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)), False),
             ((nn.AvgPool2d(2), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), False),
             ((nn.Conv2d(4, 1 << 16, 4), nn.BatchNorm2d(1 << 16)), False),
             ((_Branches(_bn_conv(4, 4, 3), _bn_conv(4, 4, 1), nn.BatchNorm2d(4)),), True),
             ((_Branches(_bn_conv(4, 4, 3, 4), _bn_conv(4, 4, 1)),), False),
             ((_Branches(nn.Sequential(_bn_conv(4, 4, 3), _bn_conv(4, 4, 1)),
                         _bn_conv(4, 4, 3)),), False),
             ((_Branches(_bn_conv(4, 4, 3), _bn_conv(4, 4, 1), cat=True),), False),
             ((_Branches(_bn_conv(4, 4, 3), _bn_conv(4, 4, (1, 3)), _bn_conv(4, 4, (3, 1))),),
              True),            # ACNet: the 3x3 window holds the others
             ((_Branches(_bn_conv(4, 4, (1, 3)), _bn_conv(4, 4, (3, 1))),), False)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Fuser, "_decide", recording)
        for layers, want in cases:
            seen.clear()
            fuse_block(*layers)
            assert seen == [want], (layers, seen)
