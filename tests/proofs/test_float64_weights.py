"""The float64 truth run with the model's own weights cast where they are read
(``repfuse.proofs.exact.Float64Weights``): the same values as the run on a float64 copy,
without the float64 weights alive through the backward; a model whose reads it cannot
stand for is run on the copy."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers.zoo import ZOO, make
from torch import nn

import repfuse
from repfuse.models import create
from repfuse.proofs.exact import Float64Weights, exact_norms, float64_copy
from repfuse.proofs.model import (
    _float64_values,
    eval_mode,
    evaluate,
    run_float64,
    upstream_for,
)
from repfuse.proofs.modes import own_mode


class _Computed(nn.Module):
    """A parent that builds its kernel from its children's weights in forward (padding a
    1x1 into a 3x3), a grouped conv, a batch norm, a linear head, a weight used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.head = nn.Linear(8, 5)
        self.register_buffer("shift", torch.randn(8))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        kernel = self.a.weight + F.pad(self.b.weight, [1, 1, 1, 1])
        y = F.conv2d(x, kernel, self.a.bias + self.b.bias, padding=1)
        y = torch.relu(self.bn(y)) + self.shift.view(1, -1, 1, 1)
        y = self.g(y) + self.g(y * 0.5)
        return self.head(y.mean((2, 3)))


def _copy_run(model, args64, upstream):
    model64 = float64_copy(model)
    with eval_mode(model64), exact_norms():
        flat, _, found = evaluate(model64, args64, True, upstream)
    return {**dict(flat), **found}


def _setup(model, shape=(2, 4, 9, 7)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flat = [("output", model.eval()(x))]
    return (x,), (x.double(),), upstream_for(flat)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_run_equals_the_float64_copy_run():
    torch.manual_seed(0)
    model = _Computed()
    args, args64, upstream = _setup(model)
    weights = Float64Weights(model)
    with own_mode(), eval_mode(model), exact_norms(), weights.running():
        flat, _, found = evaluate(model, args64, True, upstream)
    assert weights.impure is None
    with own_mode():
        want = _copy_run(model, args64, upstream)
        values = _float64_values(model, args, True, upstream)
    assert flat[0][1].dtype == torch.float64 and found["grad input"].dtype == torch.float64
    for name in ("output", "grad input"):
        torch.testing.assert_close(values[name], want[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat[0][1], want["output"], rtol=1e-12, atol=1e-12)


class _Recording(Float64Weights):
    """Keeps a weak reference to every cast it makes."""

    def __init__(self, model):
        super().__init__(model)
        self.made: list[weakref.ref] = []

    def _cast(self, value, cast, read):
        n = len(cast)
        out = super()._cast(value, cast, read)
        self.made += [weakref.ref(c) for c in cast[n:]]
        return out


@pytest.mark.parametrize("hooks", [True, False], ids=["saved as weights", "saved as casts"])
def test_casts_are_not_held_through_the_backward(hooks):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.Flatten(), nn.LazyLinear(4))
    args, args64, upstream = _setup(model, (1, 3, 8, 8))
    weights = _Recording(model)
    with own_mode(), torch.enable_grad(), eval_mode(model), exact_norms():
        x = args64[0].clone().requires_grad_(True)
        running = weights.running() if hooks else weights
        with running:
            y = model(x)
            gc.collect()
            alive = [r for r in weights.made if r() is not None]
            (grad,) = torch.autograd.grad(y, x, upstream["output"].double())
        want = _copy_run(model, args64, upstream)["grad input"]
    assert len(weights.made) >= 6
    if hooks:
        assert alive == []
    else:  # the control: without the hooks autograd keeps the conv and linear weights
        assert len(alive) >= 3
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


class _Writes(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("buf", torch.zeros(4))

    def forward(self, x):
        w = self.conv.weight
        with torch.no_grad():
            if self.how == "data":
                w.data.add_(1.0)
            elif self.how == "in place":
                w.mul_(2.0)
            elif self.how == "view":
                w[0].zero_()
            elif self.how == "out":
                torch.add(self.buf, 3.0, out=self.buf)
        if self.how == "below float64":
            return F.conv2d(x.half().double(), w.half().double(), padding=1)
        return F.conv2d(x, w, self.conv.bias, padding=1) + self.buf.view(1, -1, 1, 1)


@pytest.mark.parametrize("how", ["data", "in place", "view", "out", "below float64"])
def test_reads_it_cannot_stand_for_run_on_the_copy(how):
    torch.manual_seed(0)
    model = _Writes(how)
    args, args64, upstream = _setup(model)
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(4, 4, 3, 3))
        model.buf.zero_()
    before = _state(model)
    weights = Float64Weights(model)
    with own_mode(), eval_mode(model), exact_norms(), weights.running():
        evaluate(model, args64, True, upstream)
    assert weights.impure is not None
    reference = copy.deepcopy(model)
    with own_mode():
        values = _float64_values(model, args, True, upstream)
        want = _copy_run(reference, args64, upstream)
    for name in ("output", "grad input"):
        torch.testing.assert_close(values[name], want[name], rtol=1e-12, atol=1e-12)
    for k, v in _state(model).items():   # the user's weights are not written
        assert torch.equal(v, before[k]), k


def test_a_weight_dtype_reads_float64():
    class Follows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv(x.to(self.conv.weight.dtype))

    model = Follows()
    args, args64, upstream = _setup(model)
    weights = Float64Weights(model)
    with own_mode(), eval_mode(model), exact_norms(), weights.running():
        flat, _, _ = evaluate(model, args64, True, upstream)
    assert weights.impure is None and flat[0][1].dtype == torch.float64


def test_inference_tensor_weights():
    with torch.inference_mode():
        model = _Computed()
    args, args64, upstream = _setup(model)
    with own_mode():
        values = _float64_values(model, args, True, upstream)
        want = _copy_run(model, args64, upstream)
    for name in ("output", "grad input"):
        torch.testing.assert_close(values[name], want[name], rtol=1e-12, atol=1e-12)


def test_a_cache_filled_in_the_run_is_put_back():
    """The run uses the model itself: what its forward stores in plain attributes is put
    back afterwards (a float64 cache must not stay behind in the user's model)."""
    class Caches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.cache = None

        def forward(self, x):
            self.cache = self.conv.weight * 2
            return self.conv(x)

    model = Caches()
    args, args64, upstream = _setup(model)    # runs it in float32: fills the cache
    before = model.cache
    with own_mode():
        flat, _, _ = run_float64(model, args64, True, upstream)
    assert flat[0][1].dtype == torch.float64
    assert model.cache is before and before.dtype == torch.float32


def test_a_float64_weight_written_in_the_run_is_not_written():
    """A weight already in float64 is still read through a copy: a write in the run goes to
    the copy (and sends the run to the float64 copy of the model)."""
    model = _Writes("in place").double()
    args64 = (torch.randn(2, 4, 9, 7, dtype=torch.float64),)
    upstream = None
    before = _state(model)
    weights = Float64Weights(model)
    with own_mode(), eval_mode(model), exact_norms(), weights.running():
        evaluate(model, args64, True, upstream)
    assert weights.impure is not None
    for k, v in _state(model).items():
        assert torch.equal(v, before[k]), k


def _stands_for_the_copy(model, x):
    args64 = (x.double(),)
    with torch.no_grad():
        upstream = upstream_for([("output", model.eval()(x))])
    weights = Float64Weights(model)
    with own_mode(), eval_mode(model), exact_norms(), weights.running():
        flat, _, found = evaluate(model, args64, True, upstream)
    assert weights.impure is None, weights.impure
    with own_mode():
        want = _copy_run(model, args64, upstream)
    torch.testing.assert_close(flat[0][1], want["output"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found["grad input"], want["grad input"], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("name", sorted(ZOO) + ["acnet_resnet18", "dbb_resnet18",
                                                "mobileone_s0", "repvgg_a0"])
def test_zoo_training_and_fused_forms_run_without_the_copy(name):
    """Every design of the fx zoo and some of repfuse.models, in training form and fused
    (a GraphModule where the fuser rewrote it): the run casts every weight where it is
    read and gives the float64 copy's values."""
    torch.manual_seed(0)
    if name in ZOO:
        model, x = make(name).float(), torch.randn(2, 3, 12, 12)
    else:
        model, x = create(name, seed=0), torch.randn(1, 3, 32, 32)
    _stands_for_the_copy(model, x)
    _stands_for_the_copy(repfuse.fuse(model, x, verify=False).model, x)
