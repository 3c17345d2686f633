"""A batch norm read by several layers, copied into each reader (``fx.readers``,
``onnx.readers``): the NextViT idioms on minimal modules (a pre-norm read by q, k and v
Linears of tokens; a pre-norm read by q and by a pool -> BatchNorm1d -> k, v path; a norm
read by 1x1 convs), through ``repfuse.fuse`` in every grad mode and through
``export_onnx -> fuse_onnx``; and the norms that must stay (a reader that cannot absorb a
copy, a pool that counts its zero padding), with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers.grad_modes import MODES, assert_same_state, grad_mode, model_state
from helpers.onnx_graphs import ort_run, rel_err
from helpers.zoo import seeded_bn
from torch import nn

import repfuse

_bn = seeded_bn


class Attention(nn.Module):
    """NextViT's EfficientAttention: q from the tokens; k and v from the tokens, or from
    the tokens averaged by ``pool`` and normalized by a BatchNorm1d."""

    def __init__(self, c: int, pool: nn.Module | None = None):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.sr = pool
        self.norm = _bn(c, 1, nn.BatchNorm1d) if pool is not None else None

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, 2, c // 2).permute(0, 2, 1, 3)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2))
            x = self.norm(x).transpose(1, 2)
        k = self.k(x).reshape(b, -1, 2, c // 2).transpose(1, 2)
        v = self.v(x).reshape(b, -1, 2, c // 2).transpose(1, 2)
        a = (q @ k.transpose(-1, -2)).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(b, n, c)


class PreNormBlock(nn.Module):
    """NextViT's NextTransformerBlock: BN2d on the map, tokens, attention, residual."""

    def __init__(self, c: int = 8, pool: nn.Module | None = None):
        super().__init__()
        self.norm1 = _bn(c, 0)
        self.e_mhsa = Attention(c, pool)

    def forward(self, x):
        b, c, h, w = x.shape
        out = self.norm1(x).reshape(b, c, -1).transpose(-1, -2)
        out = self.e_mhsa(out)
        return x + out.transpose(-1, -2).reshape(b, c, h, w)


class ConvReaders(nn.Module):
    """A norm read by two 1x1 convs (and a third layer: a 3x3 conv, padded or not)."""

    def __init__(self, padding: int):
        super().__init__()
        self.norm = _bn(8, 2)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=padding)

    def forward(self, x):
        y = self.norm(torch.relu(x))
        a, b, c = self.a(y), self.b(y), self.c(y)
        return a.sigmoid() * b + c.mean((2, 3), keepdim=True)


class HalfAbsorbed(nn.Module):
    """A norm read by a Linear and by a GELU: the GELU cannot absorb a copy."""

    def __init__(self):
        super().__init__()
        self.norm = _bn(8, 3, nn.BatchNorm1d)
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        y = self.norm(x.relu()).transpose(1, 2)
        return self.q(y) + nn.functional.gelu(y)


def _pool(padding: int = 0, count_include_pad: bool = True) -> nn.Module:
    return nn.AvgPool1d(2, 2, padding=padding, count_include_pad=count_include_pad)


CASES = {
    # name: (model factory, input shape, norms before, norms left)
    "qkv": (lambda: PreNormBlock(), (2, 8, 4, 4), 1, 0),
    "q_and_pooled_kv": (lambda: PreNormBlock(pool=_pool()), (2, 8, 4, 4), 2, 0),
    "pool_without_counted_padding": (
        lambda: PreNormBlock(pool=_pool(1, count_include_pad=False)), (2, 8, 4, 4), 2, 0),
    "conv_readers": (lambda: ConvReaders(0), (2, 8, 6, 6), 1, 0),
}
KEPT = {
    # name: (model factory, input shape, the norm left, words of its reason)
    "padded_reader": (lambda: ConvReaders(1), (2, 8, 6, 6), "norm", "read by 3 ops"),
    "gelu_reader": (HalfAbsorbed, (2, 8, 5), "norm", "read by 2 ops"),
    "pool_counts_padding": (lambda: PreNormBlock(pool=_pool(1)), (2, 8, 4, 4), "norm1",
                            "read by 2 ops"),
}


def _layers(report) -> dict:
    return {layer.path: layer for layer in report.layers if layer.kind == "norm"}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_reader_folds_its_copy(name, mode):
    make, shape, before, left = CASES[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    state = model_state(model)
    with grad_mode(mode):
        result = repfuse.fuse(model, x)
    assert_same_state(model, state)
    report = result.report
    assert report.verified and report.ok and report.norms == (before, left)
    assert all(str(layer.status) == "fused" for layer in _layers(report).values())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in result.model.modules())
    assert report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    # every copy is proven where it folds: the region of each reader names the norm
    holders = [r for r in report.fused if any("norm" in p for p in r.layers)]
    assert holders and all(r.proofs is not None and r.proofs.ok for r in holders)


@pytest.mark.parametrize("name", sorted(KEPT))
def test_a_norm_a_reader_cannot_absorb_stays_with_its_reason(name):
    make, shape, path, words = KEPT[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    result = repfuse.fuse(model, x)
    left = _layers(result.report)[path]
    assert str(left.status) == "left alone" and words in left.reason, left.reason
    assert isinstance(result.model.get_submodule(path), nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


def _bn_nodes(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


@pytest.mark.parametrize("name", sorted(CASES) + sorted(KEPT))
def test_export_then_fuse_onnx(name, tmp_path):
    make, shape = (CASES.get(name) or KEPT[name])[:2]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    path = tmp_path / f"{name}.onnx"
    assert repfuse.export_onnx(model, x, path, dynamic_batch=False).ok
    original = onnx.load(str(path))
    assert _bn_nodes(original) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                      for m in model.modules())
    result = repfuse.fuse_onnx(original)
    assert result.report.ok
    data = x.numpy()
    assert rel_err(ort_run(original, data), ort_run(result.model, data)) <= 1e-5
    left = _bn_nodes(result.model)
    if name in CASES:
        assert left == 0
        assert any("copied into each reader" in n for n in result.report.notes)
    else:
        assert left >= 1
        assert any(r.status.value != "fused" and any("batch_norm" in s for s in r.sources)
                   for r in result.report.regions)
    assert np.isfinite(ort_run(result.model, data)).all()
