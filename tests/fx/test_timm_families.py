"""timm families whose blocks hold joins, MixConv splits, pre-norms, attention-bias caches
and ghost paths, fused at a small input: repfuse leaves no more batch norms than timm's own
``reparameterize_model`` on the same weights, except where a family says why, every norm
is accounted for, every region is reported once, the outputs match and the input model
comes back as it was (and copies, as the fused one does)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import timm
import torch
from timm.models.res2net import Bottle2neck
from timm.models.resnet import ResNet
from timm.utils.model import reparameterize_model
from torch import nn

import repfuse


def _res2net() -> nn.Module:
    """Res2Net-50 14w-8s blocks (timm's ``Bottle2neck``), one block per stage."""
    return ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=14,
                  block_args={"scale": 8})


#: arch -> (input size, timm's create_model keywords or a constructor, batch norms repfuse
#: may leave beyond timm's deploy form, and why). The input is a batch of 2: with one
#: sample, torch's CPU eval-mode batch norm backward (2.14) returns wrong input gradients
#: when the incoming gradient has a channels-last layout with an unusual batch stride, as
#: LeViT's ``flatten(2).transpose(1, 2)`` after its conv stem makes it: the training
#: form's gradient is then wrong, the fused model's (no batch norm left) right.
FAMILIES = {
    # hierarchical sums: Add -> conv -> BN after every split but the first
    "res2net_14w_8s": (32, _res2net, 0, ""),
    # MixConv: split -> convs -> cat -> BN, in the expansion and the projection
    "mixnet_s": (32, {}, 0, ""),
    # pre-norm blocks; LeViT's attention-bias cache is filled in eval mode
    "levit_128s": (64, {"img_size": 64}, 0, ""),
    # ghost modules: primary conv, cheap depthwise conv on its output, concat
    "ghostnet_050": (32, {}, 0, ""),
    # pre-norms before a ConvMlp fold into its first conv; the norms read by several
    # Linear layers (attention q, k, v after a reshape) stay, with their reason
    "nextvit_small": (64, {}, 0, ""),
}


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _plain(model: nn.Module) -> list:
    return [(n, sorted(k for k in vars(m) if k not in ("_parameters", "_buffers", "_modules")),
             {k: v for k, v in vars(m).items() if isinstance(v, (dict, list, bool, int, str))})
            for n, m in model.named_modules()]


def _randomized(model: nn.Module) -> nn.Module:
    """Batch norm statistics and affine parameters away from the identity."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def _check_family(arch: str, size: int, make, extra: int, why: str) -> None:
    torch.manual_seed(0)
    model = _randomized(make() if callable(make) else
                        timm.create_model(arch, pretrained=False, **make))
    deploy = reparameterize_model(copy.deepcopy(model))
    x = torch.randn(2, 3, size, size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _plain(model)
    result = repfuse.fuse(model, x)
    report = result.report
    assert report.ok and report.verified   # judged against the float64 run
    with torch.no_grad():
        out, ref = result.model(x), model(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-3
    left = report.norms[1]
    assert left <= _norms(deploy) + extra, (arch, left, _norms(deploy), why)
    norms = [layer for layer in report.layers if layer.kind == "norm"]
    assert len(norms) == _norms(model)
    assert sum(str(layer.status) != "fused" for layer in norms) == left
    assert all(layer.reason for layer in norms if str(layer.status) != "fused")
    paths = Counter(r.path for r in report.regions)
    assert max(paths.values()) == 1, [p for p, c in paths.items() if c > 1]
    assert _plain(model) == plain
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for m in (model, result.model):
        copy.deepcopy(m)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow)
                                  if a == "nextvit_small" else a for a in sorted(FAMILIES)])
def test_family_leaves_no_more_norms_than_timm(arch):
    _check_family(arch, *FAMILIES[arch])
