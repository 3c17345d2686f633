"""repfuse.fuse behaviour: purity, idempotence, training mode, regions left alone with
a reason (shared modules, misaligned branches, padding modes, BN without running
statistics, weights that are not parameters), untraceable models, dtypes, reports."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.zoo import Net, RepVGG, batch_norms_left, conv_bn, count_convs, make, randomize_bn

import repfuse
from repfuse.errors import InputError, VerificationError


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def close(a, b, tol=1e-10):
    return (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


def test_input_model_unchanged_byte_for_byte():
    model = make("dbb")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    structure = repr(model)
    result = repfuse.fuse(model, x64(1, 3, 10, 10))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
        assert after[k].data_ptr() == ptrs[k]
    assert repr(model) == structure
    # the fused model owns its tensors: training it cannot touch the input model
    theirs = {t.data_ptr() for t in model.state_dict().values()}
    assert not theirs & {t.data_ptr() for t in result.model.state_dict().values()}


def test_inplace_modifies_the_given_model():
    model = make("repvgg")
    x = x64(1, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    result = repfuse.fuse(model, x, inplace=True, verify=False)
    assert result.model is model
    assert count_convs(model) == 2 and batch_norms_left(model) == 0
    with torch.no_grad():
        assert close(model(x), ref)


def test_idempotent():
    model = make("mobileone_dw")
    x = x64(1, 3, 10, 10)
    once = repfuse.fuse(model, x).model
    twice = repfuse.fuse(once, x)
    assert twice.report.regions == []
    assert any("no fusable" in n for n in twice.report.notes)
    assert repr(twice.model) == repr(once)
    assert twice.report.params_before == twice.report.params_after
    with torch.no_grad():
        assert close(twice.model(x), once(x), 0)


def test_training_mode_is_fused_as_eval_and_reported():
    model = make("repvgg").train()
    x = x64(2, 3, 10, 10)
    result = repfuse.fuse(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert not result.model.training and not any(m.training for m in result.model.modules())
    assert any("training mode" in n for n in result.report.notes)
    assert result.report.ok
    with torch.no_grad():
        assert close(result.model(x), model.eval()(x))


class SharedConv(nn.Module):
    """A RepVGG block whose 3x3 conv is also used by a second block."""

    def __init__(self, c=8):
        super().__init__()
        self.shared = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.pw = conv_bn(c, c, 1, padding=0)
        self.id = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn_a(self.shared(x)) + self.pw(x) + self.id(x))
        return F.relu(self.bn_b(self.shared(y)))


def test_shared_conv_region_left_alone_with_reason():
    model = randomize_bn(SharedConv()).double().eval()
    x = x64(1, 8, 10, 10)
    result = repfuse.fuse(model, x)
    skipped = result.report.skipped
    assert skipped and all("shared" in s.reason and "2 times" in s.reason for s in skipped)
    fused = result.model
    assert isinstance(fused.shared, nn.Conv2d)
    assert torch.equal(fused.shared.weight, model.shared.weight)
    # what does not involve the shared conv is still folded (the 1x1 branch and its BN)
    assert [r.branches for r in result.report.fused] == [["conv1x1+bn"]]
    assert result.report.ok
    with torch.no_grad():
        assert close(fused(x), model(x))


class Misaligned(nn.Module):
    """3x3/s2 pad 1 + 2x2/s2 pad 0: equal shapes on even inputs, different grids."""

    def __init__(self, c=4):
        super().__init__()
        self.a = conv_bn(c, c, 3, 2, 1)
        self.b = conv_bn(c, c, 2, 2, 0)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


class PaddingModes(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.a(x) + self.b(x)))


class NoRunningStats(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = conv_bn(c, c, 3)
        self.id = nn.BatchNorm2d(c, track_running_stats=False)

    def forward(self, x):
        return F.relu(self.conv(x) + self.id(x))


class ConstantWeight(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        # a plain attribute: not a parameter or buffer
        self.w = torch.randn(c, c, 3, 3, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(c)
        self.pw = conv_bn(c, c, 1, padding=0)

    def forward(self, x):
        return F.relu(self.bn(F.conv2d(x, self.w, padding=1)) + self.pw(x))


@pytest.mark.parametrize("cls, words, folded", [
    (Misaligned, ["output grids"], [["conv3x3/s2+bn"], ["conv2x2/s2+bn"]]),
    (PaddingModes, ["padding"], []),
    (NoRunningStats, ["running statistics"], [["conv3x3+bn"]]),
    (ConstantWeight, ["not a parameter or buffer"], [["conv1x1+bn"]]),
])
def test_unfusable_regions_left_alone_with_reason(cls, words, folded):
    model = randomize_bn(cls()).double().eval()
    x = x64(2, 4, 8, 8)
    result = repfuse.fuse(model, x)
    assert result.report.skipped, result.report.to_dict()
    reason = result.report.skipped[0].reason
    assert all(w in reason for w in words), reason
    assert sorted(r.branches for r in result.report.fused) == sorted(folded)
    assert result.report.ok
    with torch.no_grad():
        assert close(result.model(x), model(x))


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: only the submodules can be traced."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(RepVGG(), RepVGG())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        if x.sum() > 0:
            x = x * 2
        return self.head(x.mean((2, 3)))


def test_untraceable_top_level_fuses_submodules():
    model = randomize_bn(Untraceable()).double().eval()
    x = x64(1, 3, 10, 10)
    result = repfuse.fuse(model, x)
    assert len(result.report.fused) == 2 and result.report.ok
    assert any("not symbolically traceable" in n for n in result.report.notes)
    fused = result.model
    assert type(fused) is Untraceable and isinstance(fused.head, nn.Linear)
    assert count_convs(fused) == 3 and batch_norms_left(fused) == 0
    with torch.no_grad():
        assert close(fused(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reduced_in_float64_and_cast_error_reported(dtype):
    model = make("repvgg").to(dtype)
    x = torch.randn(1, 3, 10, 10).to(dtype)
    result = repfuse.fuse(model, x)
    (region,) = result.report.fused
    assert 0 < region.cast_error < (1e-2 if dtype == torch.bfloat16 else 1e-3)
    conv = result.model.block.reparam_conv
    assert conv.weight.dtype == dtype
    assert result.report.ok, result.report.to_dict()


def test_report_to_dict_is_json_and_names_what_was_fused():
    model = make("repvgg")
    result = repfuse.fuse(model, x64(1, 3, 10, 10))
    d = json.loads(json.dumps(result.report.to_dict()))
    (region,) = d["regions"]
    assert region["path"] == "block.reparam_conv"
    assert sorted(region["branches"]) == ["bn", "conv1x1+bn", "conv3x3+bn"]
    assert region["result"] == "conv3x3"
    assert region["params_before"] == 8 * 8 * 9 + 8 * 8 + 3 * 2 * 8
    assert region["params_after"] == 8 * 8 * 9 + 8
    assert d["ok"] and d["verified"] and d["model_checks"]["ok"]
    assert d["params_before"] - d["params_after"] == region["params_before"] - \
        region["params_after"]


def test_verification_catches_a_wrong_rewrite(monkeypatch):
    """A fused kernel that is wrong by 1e-3: fuse raises, with the report."""
    from repfuse.algebra import affine

    original = affine.AffineConv.to_module

    def wrong(self):
        module = original(self)
        with torch.no_grad():
            module.weight.mul_(1.001)
        return module
    monkeypatch.setattr(affine.AffineConv, "to_module", wrong)
    model = make("acb")
    with pytest.raises(VerificationError) as info:   # no model returned
        repfuse.fuse(model, x64(1, 3, 10, 10))
    assert not info.value.report.ok
    assert not info.value.report.model_checks.ok


def test_bad_example_inputs():
    model = make("repvgg")
    with pytest.raises(InputError):
        repfuse.fuse(model, "not a tensor")
    with pytest.raises(InputError):
        repfuse.fuse(model, x64(1, 5, 10, 10))


def test_net_paths_and_classes_kept():
    torch.manual_seed(0)
    model = randomize_bn(Net(nn.Sequential(RepVGG(), RepVGG()))).double().eval()
    result = repfuse.fuse(model, x64(1, 3, 10, 10), verify=False)
    fused = result.model
    assert type(fused) is Net and isinstance(fused.block, nn.Sequential)
    assert type(fused.block[0]).__name__ == "RepVGG"
    assert [r.path for r in result.report.fused] == ["block.0.reparam_conv",
                                                      "block.1.reparam_conv"]


def test_fused_model_saves_and_loads_with_class_names(tmp_path):
    model = make("repvgg")
    x = x64(1, 3, 10, 10)
    fused = repfuse.fuse(model, x, verify=False).model
    path = tmp_path / "fused.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)  # our own file, written just above
    assert type(loaded.block).__name__ == "RepVGG"
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


class TwoOut(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3), conv_bn(c, c, 1, padding=0)

    def forward(self, x):
        return self.a(x), self.b(x)


class Unpacks(nn.Module):
    """Unpacks a submodule's tuple: traced through the submodule instead of as a leaf."""

    def __init__(self, c=8):
        super().__init__()
        self.two = TwoOut(c)
        self.id = nn.BatchNorm2d(c)

    def forward(self, x):
        a, b = self.two(x)
        return F.relu(a + b + self.id(x))


def test_module_unpacking_a_tuple_is_traced_through():
    model = randomize_bn(Unpacks()).double().eval()
    x = x64(1, 8, 10, 10)
    result = repfuse.fuse(model, x)
    assert [sorted(r.branches) for r in result.report.fused] == [
        ["bn", "conv1x1+bn", "conv3x3+bn"]]
    assert count_convs(result.model) == 1 and result.report.ok
    with torch.no_grad():
        assert close(result.model(x), model(x))


class DepthwiseThenExpand(nn.Module):
    """A depthwise 7x7 + BN followed by a dense 1x1 expansion (FastViT's conv MLP)."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = conv_bn(c, c, 7, groups=c)
        self.fc1 = nn.Conv2d(c, 4 * c, 1)

    def forward(self, x):
        return F.gelu(self.fc1(self.dw(x)))


def test_region_that_would_grow_is_split():
    model = randomize_bn(DepthwiseThenExpand()).double().eval()
    x = x64(1, 8, 12, 12)
    result = repfuse.fuse(model, x)
    (split,) = result.report.split
    assert "multiply the parameters" in split.reason and not result.report.skipped
    assert [r.branches for r in result.report.fused] == [["conv7x7 dw+bn"]]
    assert isinstance(result.model.fc1, nn.Conv2d) and result.model.fc1.kernel_size == (1, 1)
    assert result.report.params_after < result.report.params_before
    with torch.no_grad():
        assert close(result.model(x), model(x))


def test_channels_last_model_keeps_channels_last_kernels():
    """A model converted to channels_last gets fused kernels in that format (the other
    format would be converted on every call); an NCHW model keeps NCHW kernels."""
    from repfuse.models import create

    for fmt in (torch.channels_last, torch.contiguous_format):
        model = create("repvgg_a0", seed=0).to(memory_format=fmt)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        x = x.to(memory_format=fmt)
        result = repfuse.fuse(model, x)
        assert result.report.ok and len(result.report.fused) == 22
        kernels = [m.weight for m in result.model.modules() if isinstance(m, nn.Conv2d)]
        assert all(w.is_contiguous(memory_format=fmt) for w in kernels)
        if fmt == torch.channels_last:
            assert not any(w.is_contiguous() for w in kernels if w.shape[-1] > 1)
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
