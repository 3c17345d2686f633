"""Gaps a sweep over real model families found, each on a minimal module of its idiom:
regions that start at a join (an add or concat of activations), a channel split whose
convs are concatenated before a batch norm (MixConv), a pre-norm folded into the first
conv of a child that is not wholly linear, caches filled from parameters in eval mode
(the input model comes back exactly as it was; the fused one copies, pickles and fuses
again), and one report entry per region (ghost-style split paths)."""

from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn.functional as F
from helpers.zoo import seeded_bn
from torch import nn

import repfuse

_bn = seeded_bn


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _fuse(model: nn.Module, x: torch.Tensor):
    model.eval()
    result = repfuse.fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    return result


# ----------------------------------------------------------------------------- joins
class AddThenConvBN(nn.Module):
    """Two activated branches summed, then conv -> BN (Res2Net's hierarchical sums)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = _bn(8, 1)

    def forward(self, x):
        y = torch.relu(self.a(x)) + torch.relu(self.b(x))
        return torch.relu(self.bn(self.conv(y)))


class CatThenConvBN(nn.Module):
    """Two activated branches concatenated, then a 1x1 conv -> BN (CSP / Res2Net)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(12, 8, 1, bias=False)
        self.bn = _bn(8, 2)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return torch.relu(self.bn(self.conv(y)))


def test_region_after_an_add_or_cat_starts_at_the_join():
    x = torch.randn(2, 3, 12, 12)
    for make in (AddThenConvBN, CatThenConvBN):
        torch.manual_seed(0)
        result = _fuse(make(), x)
        assert result.report.norms == (1, 0), make.__name__
        fused = [r for r in result.report.regions if r.status == "fused"]
        assert [r.path for r in fused] == ["conv"], make.__name__
        assert sorted(fused[0].layers) == ["bn", "conv"]


class MixedConv(nn.ModuleDict):
    """A channel split, one conv per part (each its own kernel size), concat (MixConv)."""

    def __init__(self, c: int, out: int):
        super().__init__()
        self.splits = [c // 2, c - c // 2]
        self["0"] = nn.Conv2d(self.splits[0], out // 2, 3, padding=1, bias=False)
        self["1"] = nn.Conv2d(self.splits[1], out - out // 2, 5, padding=2, bias=False)

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([c(parts[i]) for i, c in enumerate(self.values())], 1)


class NormAct(nn.BatchNorm2d):
    """BN and an activation in one module (timm's BatchNormAct2d)."""

    def __init__(self, c: int, act: bool):
        super().__init__(c)
        self.load_state_dict(_bn(c, c).state_dict())
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-D input")
        return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                     self.bias, False, 0.0, self.eps))


class MixBlock(nn.Module):
    """MixConv -> BN+act, MixConv -> BN (linear), and a plain ``nn.BatchNorm2d`` after a
    MixConv: each BN is moved into the concat's parts and folds into their convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv_pw = MixedConv(8, 12)
        self.bn1 = NormAct(12, act=True)
        self.conv_pwl = MixedConv(12, 8)
        self.bn2 = NormAct(8, act=False)
        self.conv_last = MixedConv(8, 6)
        self.bn3 = _bn(6, 9)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_pw(x))))
        return self.bn3(self.conv_last(torch.relu(x + y)))


def test_split_convs_cat_then_bn_folds_into_each_conv():
    torch.manual_seed(0)
    model = MixBlock()
    result = _fuse(model, torch.randn(2, 3, 10, 10))
    assert result.report.norms[1] == 0
    fused = sorted(r.path for r in result.report.regions if r.status == "fused")
    assert fused == [f"{m}.{i}" for m in ("conv_last", "conv_pw", "conv_pwl") for i in "01"]
    norms = {layer.path: str(layer.status) for layer in result.report.layers
             if layer.kind == "norm"}
    assert norms == {"bn1": "fused", "bn2": "fused", "bn3": "fused"}
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase)
                   for m in result.model.modules())
    assert type(result.model.conv_pw).__name__ == "MixedConv"


# ----------------------------------------------------------------------------- boundaries
class ConvMlp(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, 2 * c, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """A pre-norm (parent's BN) before a child whose forward is not wholly linear, as in
    NextViT: ``x + mlp(norm(x))``; a 3x3 child conv with zero padding is not exact."""

    def __init__(self, k: int):
        super().__init__()
        self.norm = _bn(8, 7)
        self.mlp = ConvMlp(8)
        self.mlp.fc1 = nn.Conv2d(8, 16, k, padding=k // 2)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_pre_norm_folds_into_the_first_conv_of_a_child_where_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    result = _fuse(PreNormBlock(1), x)
    assert result.report.norms == (1, 0)
    padded = _fuse(PreNormBlock(3), x)
    assert padded.report.norms == (1, 1)
    [left] = [layer for layer in padded.report.layers if layer.path == "norm"]
    assert str(left.status) == "left alone" and "padding" in left.reason


class QKV(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 3, padding=1)   # a padded conv: its copy would not fold

    def forward(self, x):
        a = (self.q(x) * self.k(x)).sigmoid()
        return a * self.v(x)


class PreNormAttention(nn.Module):
    """A pre-norm read by three layers of the child after it (NextViT's attention), one of
    which (a padded conv) cannot absorb a copy (tests/fx/test_norm_readers.py: when all
    can)."""

    def __init__(self):
        super().__init__()
        self.norm = _bn(8, 8)
        self.attn = QKV(8)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def test_a_norm_read_by_several_layers_says_so():
    torch.manual_seed(0)
    result = _fuse(PreNormAttention(), torch.randn(1, 8, 6, 6))
    [left] = [layer for layer in result.report.layers if layer.kind == "norm"]
    assert str(left.status) == "left alone"
    assert "read by 3 ops (attn.q, attn.k, attn.v)" in left.reason


# ----------------------------------------------------------------------------- caches
class CachedBiasAttention(nn.Module):
    """A bias table gathered by index and cached in eval mode, cleared by ``train()``
    (LeViT / EfficientViT / TinyViT attention)."""

    def __init__(self, c: int = 8, n: int = 4):
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1, bias=False)
        self.bn = _bn(3 * c, 3)
        self.biases = nn.Parameter(torch.randn(1, 2 * n - 1))
        idx = torch.arange(n)
        self.register_buffer("idxs", (idx[:, None] - idx[None, :]).abs(), persistent=False)
        self.cache: dict[str, torch.Tensor] = {}
        self.calls = 0

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.cache:
            self.cache = {}
        return self

    def bias(self, device) -> torch.Tensor:
        if self.training:
            return self.biases[:, self.idxs]
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.biases[:, self.idxs]
        return self.cache[key]

    def forward(self, x):
        self.calls += 1
        q, k, v = self.bn(self.qkv(x)).flatten(2).chunk(3, dim=1)  # (B, C, HW)
        a = (q.transpose(1, 2) @ k).softmax(-1)                     # HW = n tokens
        a = a + self.bias(x.device)
        return (v @ a.transpose(1, 2)).reshape(x.shape)


def _plain(model: nn.Module) -> list:
    return [(n, {k: v for k, v in vars(m).items()
                 if k not in ("_parameters", "_buffers", "_modules")})
            for n, m in model.named_modules()]


def test_cache_filled_in_eval_leaves_the_input_as_it_was():
    torch.manual_seed(0)
    model = CachedBiasAttention().eval()
    x = torch.randn(1, 8, 2, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _plain(model)
    cache = model.cache
    for verify in (True, False):
        result = repfuse.fuse(model, x, verify=verify)
        assert result.report.norms == (1, 0)
        assert model.cache is cache and cache == {}
        assert _plain(model) == plain and model.calls == 0
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        for m in (model, result.model):
            copy.deepcopy(m)
            torch.save(m, io.BytesIO())
        pickle.loads(pickle.dumps(result.model))
        again = repfuse.fuse(result.model, x)
        assert again.report.norms == (0, 0)
    assert repfuse.verify(model, result.model, x).ok
    assert model.cache == {} and result.model.cache == {}


def test_a_cache_with_autograd_history_is_copied_detached():
    """The user ran the model in eval mode with gradients on: its cache holds a tensor
    with history; fusing must still work and leave that very tensor in place."""
    torch.manual_seed(0)
    model = CachedBiasAttention().eval()
    x = torch.randn(1, 8, 2, 2)
    model(x)
    held = model.cache["cpu"]
    assert held.grad_fn is not None
    result = _fuse(model, x)
    assert model.cache == {"cpu": held} and model.cache["cpu"] is held
    assert result.model.cache["cpu"].grad_fn is None
    copy.deepcopy(result.model)


# ----------------------------------------------------------------------------- reports
class GhostLike(nn.Module):
    """A ghost module: a primary conv (+BN) and a cheap depthwise conv (+BN) on its
    output, concatenated (GhostNet): the pair is not exact as one conv."""

    def __init__(self):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), _bn(4, 4))
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                                   _bn(4, 5))

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)


def test_every_region_is_reported_once():
    torch.manual_seed(0)
    result = _fuse(GhostLike(), torch.randn(1, 4, 8, 8))
    paths = [r.path for r in result.report.regions]
    assert len(paths) == len(set(paths)), paths
    assert result.report.norms == (2, 0)
    outcome = {r.path: str(r.status) for r in result.report.regions}
    assert outcome == {"cat": "split", "primary.0": "fused", "cheap.0": "fused"}
