"""repfuse.verify / repfuse.proofs.verify_models: whole-model outputs and input gradients."""

import copy
import importlib
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import repfuse
from repfuse.errors import InputError
from repfuse.proofs import TOLERANCES, compare, tolerance


def _branchy(c=4):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(c, c, 3, padding=1)
            self.b = nn.Conv2d(c, c, 1)
            self.bn = nn.BatchNorm2d(c)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return torch.relu(self.bn(self.a(x) + self.b(x)) + x)

    return Block().double()


def _fused(ref):
    """An independent fusion by hand (torch ops), as a candidate that must pass."""
    c = ref.a.out_channels
    w = ref.a.weight.detach().clone()
    w[:, :, 1, 1] += ref.b.weight.detach()[:, :, 0, 0]
    b = ref.a.bias.detach() + ref.b.bias.detach()
    s = ref.bn.weight.detach() / torch.sqrt(ref.bn.running_var + ref.bn.eps)
    conv = nn.Conv2d(c, c, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(w * s[:, None, None, None])
        conv.bias.copy_((b - ref.bn.running_mean) * s + ref.bn.bias.detach())

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    return Fused()


def test_exact_candidate_passes_and_reports_figures():
    ref = _branchy()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    rep = repfuse.verify(ref, _fused(ref), x)
    assert rep.ok, rep.to_dict()
    names = [c.name for c in rep.checks]
    assert names == ["output", "grad input"]
    assert all(c.max_abs < 1e-12 for c in rep.checks)
    assert rep.dtype == "float64"
    json.dumps(rep.to_dict())


def test_models_inputs_and_flags_untouched():
    ref = _branchy()
    ref.train()
    cand = _fused(ref)
    before = copy.deepcopy(ref.state_dict())
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    x0 = x.clone()
    rep = repfuse.verify(ref, cand, x)
    assert rep.ok
    assert ref.training and all(m.training for m in ref.modules())
    assert cand.training
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in ref.parameters())
    assert torch.equal(x, x0) and not x.requires_grad


def test_perturbed_weight_is_caught():
    ref = _branchy()
    cand = _fused(ref)
    with torch.no_grad():
        cand.conv.weight.mul_(1 + 1e-3 * torch.randn_like(cand.conv.weight))
    rep = repfuse.verify(ref, cand, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert not rep.ok
    assert {c.name for c in rep.failures} == {"output", "grad input"}
    assert "worst at" in rep.failures[0].detail


def test_detached_input_caught_by_gradients_only():
    ref = _branchy()
    fused = _fused(ref)

    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fused

        def forward(self, x):
            return self.inner(x.detach())

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    rep = repfuse.verify(ref, Detaching(), x)
    assert not rep.ok
    assert [c.name for c in rep.failures] == ["grad input"]
    assert "do not depend on input" in rep.failures[0].detail
    assert repfuse.verify(ref, Detaching(), x, grads=False).ok


def test_partially_detached_caught():
    """Outputs equal, gradient only through one of the two paths."""
    ref = _branchy()
    fused = _fused(ref)

    class Half(nn.Module):
        def forward(self, x):
            return torch.relu(fused.conv(x.detach()) + x)

    rep = repfuse.verify(ref, Half(), torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert [c.name for c in rep.failures] == ["grad input"]


def test_tuple_inputs_and_outputs():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, 3, padding=1).double()

    class Two(nn.Module):
        def forward(self, x, y, k):
            return conv(x) * k, {"s": (conv(x) + y).sum(dim=1)}

    class TwoSwapped(nn.Module):
        def forward(self, x, y, k):
            return conv(x) * k, {"s": (conv(x) + y.flip(-1)).sum(dim=1)}

    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5,
                                                                      dtype=torch.float64)
    rep = repfuse.verify(Two(), Two(), (x, y, 2.0))
    assert rep.ok
    assert [c.name for c in rep.checks] == ["output[0]", "output[1]['s']", "grad input[0]",
                                            "grad input[1]"]
    bad = repfuse.verify(Two(), TwoSwapped(), (x, y, 2.0))
    assert {c.name for c in bad.failures} == {"output[1]['s']", "grad input[1]"}


def test_structure_and_shape_mismatch():
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)

    class Pair(nn.Module):
        def forward(self, x):
            return conv(x), conv(x)

    class Crop(nn.Module):
        def forward(self, x):
            return conv(x)[..., 1:]

    assert not repfuse.verify(conv, Pair(), x).ok
    rep = repfuse.verify(conv, Crop(), x)
    assert not rep.ok and "shape" in rep.failures[0].detail


def test_float32_one_ulp_passes_and_1e3_fails():
    ref = _branchy().float()
    cand = _fused(_branchy()).float()
    x = torch.randn(2, 4, 8, 8)
    assert repfuse.verify(ref, cand, x).ok
    with torch.no_grad():
        w = cand.conv.weight
        w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
    assert repfuse.verify(ref, cand, x).ok
    with torch.no_grad():
        w.mul_(1 + 1e-3 * torch.randn_like(w))
    rep = repfuse.verify(ref, cand, x)
    assert not rep.ok and rep.dtype == "float32"


def test_compare_definitions():
    a = torch.tensor([0.0, 2.0, -4.0], dtype=torch.float64)
    b = torch.tensor([1e-6, 2.0, -4.0 + 3e-6], dtype=torch.float64)
    c = compare("x", a, b)
    assert c.max_abs == pytest.approx(3e-6)
    assert c.max_rel == pytest.approx(3e-6 / 4.0)
    assert not c.ok  # float64: 1e-10 + 1e-9 * 4
    assert compare("x", a, b, tol=(0.0, 1e-6)).ok
    assert compare("x", a, b, tol={"atol": 3e-6}).ok
    nan = torch.tensor([float("nan"), float("inf"), 1.0])
    assert compare("n", nan, nan.clone()).ok
    assert not compare("n", nan, torch.tensor([0.0, float("inf"), 1.0])).ok
    assert not compare("n", nan, torch.tensor([float("nan"), -float("inf"), 1.0])).ok
    assert compare("e", torch.zeros(0), torch.zeros(0)).ok
    # the largest difference either way, wherever it sits; a NaN in one place only fails
    big = torch.arange(6, dtype=torch.float64)
    for i in range(6):
        for d in (-0.5, 0.5):
            off = big.clone()
            off[i] += d
            assert compare("m", big, off).max_abs == 0.5
            off[(i + 3) % 6] = float("nan")
            assert not compare("m", big, off).ok


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       block=st.integers(1, 40), flat=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_compare_in_blocks_finds_the_largest_difference_and_value(shape, data, block, flat,
                                                                   seed):
    """The comparison reduces in blocks of the elements in memory order (any block size,
    any memory order, the two tensors alike or not; one block on the tensors or on their
    memory-order views, from any size): its figures are the largest difference and the
    largest reference value wherever they lie, and one NaN in any block fails it."""
    compare_module = importlib.import_module("repfuse.proofs.compare")

    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(shape, generator=gen, dtype=torch.float64)
    cand = ref + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    order = data.draw(st.permutations(range(len(shape))))
    back = [order.index(d) for d in range(len(shape))]
    alike = data.draw(st.booleans())
    ref_stored = ref.permute(order).contiguous().permute(back)
    cand_stored = cand.permute(order).contiguous().permute(back) if alike else cand
    where = data.draw(st.integers(0, ref.numel() - 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare_module, "_BLOCK", block)
        patch.setattr(compare_module, "_FLAT", flat)
        c = compare("x", ref_stored, cand_stored, tol=(1.0, 0.0))
        assert c.max_abs == float((ref - cand).abs().max())
        assert c.max_rel == float((ref - cand).abs().max()) / float(ref.abs().max())
        assert c.ok
        broken = cand.clone()
        broken.view(-1)[where] = float("nan")
        broken = broken.permute(order).contiguous().permute(back) if alike else broken
        assert not compare("x", ref_stored, broken, tol=(1.0, 0.0)).ok


def test_tolerance_table_and_errors():
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    prev = 0.0
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        t = tolerance(d)
        assert t.rtol > prev and t.rtol > torch.finfo(d).eps
        prev = t.rtol
    assert tolerance(torch.float32, 0.5) == (0.5, 0.5)
    for bad in ("x", (1.0,), {"rtl": 1}, -1.0, True):
        with pytest.raises(InputError):
            tolerance(torch.float32, bad)
    with pytest.raises(InputError, match="example_inputs"):
        repfuse.verify(nn.Identity(), nn.Identity(), "not a tensor")


def test_inplace_first_op_and_crashing_candidate():
    conv = nn.Conv2d(2, 2, 3, padding=1).double()

    class InplaceFirst(nn.Module):
        def forward(self, x):
            return conv(torch.relu_(x))

    class Plain(nn.Module):
        def forward(self, x):
            return conv(torch.relu(x))

    class Crash(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    x0 = x.clone()
    assert repfuse.verify(Plain(), InplaceFirst(), x).ok
    assert torch.equal(x, x0)
    rep = repfuse.verify(Plain(), Crash(), x)
    assert not rep.ok and "boom" in rep.failures[0].detail
    with pytest.raises(InputError, match="reference model fails"):
        repfuse.verify(Crash(), Plain(), x)


def test_float32_detached_input_still_caught():
    ref = _branchy().float()
    fused = _fused(_branchy()).float()

    class Detaching(nn.Module):
        def forward(self, x):
            return fused(x.detach())

    rep = repfuse.verify(ref, Detaching(), torch.randn(2, 4, 6, 6))
    assert [c.name for c in rep.failures] == ["grad input"]
