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
        self.pair, self.sizes = None, (3, 4.0, "x", None)

    def forward(self, x):
        self.cache["y"] = self.conv(x)
        self.pair = (self.cache["y"] * 2, 2)    # in a tuple too (not all items plain)
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
            assert type(v) is type(getattr(b, k)) or k == "pair", k    # set by the run
    for m, c in zip(model.modules(), copied.modules()):
        for k, v in vars(m).items():
            if isinstance(v, (dict, list, set)):
                assert vars(c)[k] is not v, k      # every container is a fresh copy
    assert copied[0].shared is copied[1].shared    # aliasing kept, as deepcopy keeps it
    assert copied[0].cache["y"].grad_fn is None    # a cached tensor with history: detached
    assert copied[0].pair[0].grad_fn is None and copied[0].pair[1] == 2
    torch.testing.assert_close(copied[0].cache["y"], model[0].cache["y"].detach())
    # hooks and attributes added to the copy do not reach the original
    copied[0].register_forward_hook(lambda *a: None)
    copied[0].shared.append(1)
    copied[0].seen.add(1)
    assert not model[0]._forward_hooks and model[0].shared == [] and not model[0].seen
    for p, q in zip(model.parameters(), copied.parameters()):
        assert p is not q and torch.equal(p, q)


class Buffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        base = torch.arange(8.0)
        self.register_buffer("whole", base)
        self.register_buffer("part", base[2:6])           # a view of ``whole``'s storage
        self.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())
        self.alias = self.bn.running_mean                  # a plain attribute, same tensor
        self.register_buffer("tagged", torch.ones(2))
        self.tagged.note = "kept"                          # a tensor attribute


def test_buffers_are_copied_as_deepcopy_copies_them():
    model = Buffers()
    copied, plain = copy_model(model), copy.deepcopy(model)
    for (name, a), (_, b), (_, o) in zip(copied.named_buffers(), plain.named_buffers(),
                                         model.named_buffers()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset(), name
        assert a.untyped_storage().data_ptr() != o.untyped_storage().data_ptr(), name
    # storage sharing, aliases and tensor attributes survive as in deepcopy
    assert copied.part.untyped_storage().data_ptr() == copied.whole.untyped_storage().data_ptr()
    copied.whole[3] = -1.0
    assert copied.part[1] == -1.0 and model.whole[3] == 3.0
    assert copied.alias is copied.bn.running_mean
    assert copied.tagged.note == "kept"
    copied.bn.running_var.add_(1.0)                    # the copy's buffers are its own
    assert torch.equal(model.bn.running_var, torch.ones(3))
