"""The whole-model criterion below float64: the training form run in float64 is the truth;
the fused model passes when it is about as close to the truth as the training form in its
own dtype. Every test here asserts a verdict that holds on any machine: the faults are far
above rounding, the correct models far below the criterion's budget, and where the table's
direct comparison must reject, the case is built so that it certainly does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import repfuse
from repfuse.models import create

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PLANTED = "stage1.1.reparam_conv"


@pytest.fixture(scope="module")
def repvgg():
    model = create("repvgg_a0", seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, x


def _plant(fused: nn.Module, fault: str) -> nn.Module:
    broken = copy.deepcopy(fused)
    conv = broken.get_submodule(PLANTED)
    with torch.no_grad():
        if fault == "5% weight error":
            conv.weight.mul_(1.05)
        elif fault == "swapped channel":
            conv.weight[[0, 1]] = conv.weight[[1, 0]].clone()
            conv.bias[[0, 1]] = conv.bias[[1, 0]].clone()
        else:
            conv.bias.zero_()
    return broken


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repvgg_a0_fused_verifies_and_planted_faults_fail(repvgg, dtype):
    model, x = repvgg
    model, x = copy.deepcopy(model).to(dtype), x.to(dtype)
    fused = repfuse.fuse(model, x, verify=False).model
    report = repfuse.verify(model, fused, x)
    assert report.ok, report.to_dict()
    assert report.dtype == str(dtype).removeprefix("torch.")
    for fault in ("5% weight error", "swapped channel", "dropped bias"):
        bad = repfuse.verify(model, _plant(fused, fault), x, grads=False)
        assert [c.name for c in bad.failures] == ["output"], (fault, bad.to_dict())
        detail = next(c for c in bad.failures if c.name == "output").detail
        assert "float64" in detail, detail
    assert next(model.parameters()).dtype == dtype


def _ill_conditioned_stack(depth: int = 40, c: int = 6) -> nn.Module:
    """conv + BN + SiLU, ``depth`` times; every BN's running mean is 10,000x the spread
    of its input, so that the training form computes (x - mean) with catastrophic
    cancellation: in float32 it is certainly further from its float64 result than the
    table's tolerance; the fused conv computes the same function without the cancellation.
    SiLU is smooth, so input gradients have no kinks for rounding to flip."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(depth):
        conv = nn.Conv2d(c, c, 3, padding=1, bias=True)
        bn = nn.BatchNorm2d(c)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / (3 * c ** 0.5))
            conv.bias.fill_(1e4)
            bn.running_mean.fill_(1e4)
            bn.running_mean.add_(0.05 * torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
        layers += [conv, bn, nn.SiLU()]
    return nn.Sequential(*layers).eval()


def test_deep_ill_conditioned_float32_stack_verifies():
    model = _ill_conditioned_stack()
    x = torch.randn(1, 6, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        own = (model(x).double() - truth).abs().max() / truth.abs().max()
    assert own > 1e-3       # the training form alone is far outside rtol 1e-4
    result = repfuse.fuse(model, x)
    assert result.report.ok, result.report.to_dict()
    assert len(result.report.fused) == 40
    notes = " ".join(result.report.model_checks.notes)
    assert "reference itself" in notes and "float64" in notes, notes
    broken = copy.deepcopy(result.model)
    with torch.no_grad():
        broken.get_submodule("117").weight.mul_(1.3)
    assert not repfuse.verify(model, broken, x).ok


class TopK(nn.Module):
    """A RepVGG block, then discrete selections, as a detection head makes them: the k
    positions with the best score (the block's mean activation plus a per-position prior,
    as anchors have), their feature rows gathered by the indices, the indices and the
    argmax position. The 1x1 branch carries an offset that its BN removes again: the
    training form computes it with cancellation (certainly outside the table's tolerance of
    its float64 result), the fused conv without."""

    def __init__(self, c: int = 8, k: int = 5, positions: int = 36):
        super().__init__()
        self.k = k
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)
        prior = torch.randperm(positions, generator=torch.Generator().manual_seed(1))
        self.register_buffer("prior", 4.0 * prior.float())

    def forward(self, x):
        y = torch.relu(self.dense(x) + self.pw(x) + self.identity(x))
        flat = y.flatten(2)                                     # N, C, HW
        scores, index = (flat.mean(1) + self.prior).topk(self.k, dim=1)
        rows = flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1))
        return rows, scores, index, (flat.mean(1) + self.prior).argmax(1)


def _topk_case(dtype):
    torch.manual_seed(0)
    model = TopK().eval()
    gen = torch.Generator().manual_seed(0)
    # rounding of the offset moves a score by at most half an ulp of it (0.004 in float32,
    # 0.125 in float16) times the BN's scale: far below the selection's margins (0.5)
    offset = 1e5 if dtype == torch.float32 else 256.0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(8, generator=gen))
                m.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
        model.pw[0].bias.fill_(offset)
        model.pw[1].running_mean.add_(offset)
    model = model.to(dtype)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(dtype)
    # the selections are decided with margins far above the dtype's rounding
    with torch.no_grad():
        exact = copy.deepcopy(model).double()
        y = torch.relu(exact.dense(x.double()) + exact.pw(x.double())
                       + exact.identity(x.double()))
        scores = (y.flatten(2).mean(1) + exact.prior).sort(dim=1, descending=True).values
    gaps = scores[:, :model.k + 1].diff(dim=1).abs()
    assert (gaps > 0.5).all() and scores.abs().max() < 200
    return model, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_discrete_selection_after_a_fused_region(dtype):
    model, x = _topk_case(dtype)
    with torch.no_grad():
        own = (model(x)[0].double() - copy.deepcopy(model).double()(x.double())[0]).abs().max()
    assert own > 0.01 * torch.finfo(dtype).eps ** 0.5    # far outside the table's rtol
    result = repfuse.fuse(model, x)
    assert result.report.ok, result.report.to_dict()
    assert len(result.report.fused) == 1
    names = [c.name for c in result.report.model_checks.checks]
    assert names == ["output[0]", "output[1]", "output[2]", "output[3]", "grad input"]
    broken = copy.deepcopy(result.model)
    conv = next(m for m in broken.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(2.0)
    bad = repfuse.verify(model, broken, x)
    assert "output[0]" in {c.name for c in bad.failures}, bad.to_dict()


def _kinky(shift_below_float64: float):
    """relu(x + s) * w where s is added only in arithmetic below float64: emulates a
    candidate that rounds a unit sitting exactly at the kink across it (its function is
    exact; only its float32 evaluation flips the kink)."""
    w = torch.linspace(-1, 1, 64)

    class Kinky(nn.Module):
        def forward(self, x):
            s = 0.0 if x.dtype == torch.float64 else shift_below_float64
            return torch.relu(x + s) * w.to(x.dtype)

    return Kinky()


def test_gradient_kink_flips_of_rounding_pass_and_real_gradient_faults_fail():
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))
    x.view(-1)[::500] = 0.0                       # units exactly at the kink
    report = repfuse.verify(_kinky(0.0), _kinky(1e-7), x)
    assert report.ok, report.to_dict()
    grad = report.checks[-1]
    assert grad.name == "grad input" and grad.max_rel > 0.1   # the table alone rejects
    assert "float64" in grad.detail

    class Detached(nn.Module):
        def forward(self, x):
            return _kinky(0.0)(x.detach()) + 0 * x

    bad = repfuse.verify(_kinky(0.0), Detached(), x)
    assert [c.name for c in bad.failures] == ["grad input"]


class Buggy(nn.Module):
    """A training form whose own float32 evaluation is wrong (as a torch kernel bug would
    make it): it rounds its activation to bfloat16 in float32 only."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        y = self.conv(x)
        if y.dtype == torch.float32:
            y = y.to(torch.bfloat16).to(torch.float32)
        return y


def test_training_form_far_from_its_float64_run_is_named():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 9, 9)
    report = repfuse.verify(Buggy(conv), conv, x)
    assert report.ok, report.to_dict()
    notes = " ".join(report.notes)
    assert "reference itself" in notes and "output" in notes, notes
    worse = copy.deepcopy(conv)
    with torch.no_grad():
        worse.bias.add_(0.5)
    bad = repfuse.verify(Buggy(conv), worse, x)
    assert not bad.ok


def test_user_tolerance_is_the_slack():
    """``tol`` sets the slack of the same criterion; a float64 model has no rounding to
    judge and keeps the table's comparison."""
    model = _ill_conditioned_stack(depth=4)
    x = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    fused = repfuse.fuse(model, x, verify=False).model
    assert repfuse.verify(model, fused, x, tol=(0.0, 0.0)).ok
    m64, x64 = copy.deepcopy(model).double(), x.double()
    f64 = repfuse.fuse(m64, x64, verify=False).model
    assert not repfuse.verify(m64, f64, x64, tol=(0.0, 0.0)).ok
    assert repfuse.verify(m64, f64, x64).ok


class _TokenProjections(nn.Module):
    """Two levels, each a 1x1 conv + BN, flattened to tokens, concatenated and read by a
    Linear (a detection decoder's input projections, batch 1). The backward of the
    concatenation hands each BN a channels-last upstream gradient with a degenerate batch
    stride, on which torch's eval-mode batch-norm backward has returned wrong input
    gradients (torch 2.14, CPU): the training form is then the model far from the truth."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)) for _ in range(2))
        self.head = nn.Linear(16, 5)

    def forward(self, a, b):
        tokens = [p(x).flatten(2).permute(0, 2, 1) for p, x in zip(self.proj, (a, b))]
        return self.head(torch.cat(tokens, 1))


def test_truth_does_not_share_the_reference_batch_norm_kernel():
    torch.manual_seed(0)
    model = _TokenProjections().eval()
    with torch.no_grad():
        for p in model.proj:
            bn = p[1]
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    inputs = (torch.randn(1, 8, 6, 6), torch.randn(1, 8, 3, 3))
    result = repfuse.fuse(model, inputs)
    assert result.report.ok
    assert repfuse.verify(model, result.model, inputs).ok
    # a planted fault in one fused projection is still caught
    with torch.no_grad():
        result.model.proj[1][0].weight[3] *= 1.05
    assert not repfuse.verify(model, result.model, inputs).ok


def test_float64_copy_of_a_model_holding_a_cache_with_autograd_history():
    from repfuse.proofs.exact import float64_copy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[0].cache = {"bias": model[0].weight.sum() * 2}   # filled by a forward with grad on
    copied = float64_copy(model)
    assert copied[0].weight.dtype == torch.float64
    assert copied[0].cache["bias"].grad_fn is None
    assert torch.equal(copied[0].cache["bias"], model[0].cache["bias"].detach())
    assert model[0].cache["bias"].grad_fn is not None   # the model itself is untouched
