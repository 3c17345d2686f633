"""``pristine.copy_model``: what ``copy.deepcopy`` gives (empty containers included, which
it copies up front), with tensors carrying autograd history in plain attributes copied
detached; the original is never changed through the copy."""

from __future__ import annotations

import copy

import torch
from torch import nn

from repfuse.pristine import copy_model


class Holder(nn.Module):
    def __init__(self, shared: list) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)
        self.shared, self.cache, self.seen = shared, {}, set()

    def forward(self, x):
        self.cache["y"] = self.conv(x)
        return self.cache["y"]


def _model():
    shared = []                             # one empty list held by both modules
    return nn.Sequential(Holder(shared), Holder(shared))


def test_same_as_deepcopy_and_independent_of_the_original():
    model = _model()
    model(torch.randn(1, 2, 9, 9))          # caches hold tensors with autograd history
    copied = copy_model(model)
    plain = copy.deepcopy(_model())
    for a, b in zip(copied.modules(), plain.modules()):
        assert type(a) is type(b) and vars(a).keys() == vars(b).keys()
        for k, v in vars(a).items():
            assert type(v) is type(getattr(b, k)), k
    for m, c in zip(model.modules(), copied.modules()):
        for k, v in vars(m).items():
            if isinstance(v, (dict, list, set)):
                assert vars(c)[k] is not v, k      # every container is a fresh copy
    assert copied[0].shared is copied[1].shared    # aliasing kept, as deepcopy keeps it
    assert copied[0].cache["y"].grad_fn is None    # a cached tensor with history: detached
    torch.testing.assert_close(copied[0].cache["y"], model[0].cache["y"].detach())
    # hooks and attributes added to the copy do not reach the original
    copied[0].register_forward_hook(lambda *a: None)
    copied[0].shared.append(1)
    copied[0].seen.add(1)
    assert not model[0]._forward_hooks and model[0].shared == [] and not model[0].seen
    for p, q in zip(model.parameters(), copied.parameters()):
        assert p is not q and torch.equal(p, q)
