"""``pristine.untouched`` puts every module's plain attributes back: the same objects, with
the contents their containers had (empty ones emptied again), attributes added during the
body removed."""

from __future__ import annotations

import torch
from torch import nn

from repfuse.pristine import untouched


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.cache: dict = {}
        self.seen: list = []
        self.names = {"a": 1}
        self.tags: set = {"x"}
        self.flag = False

    def forward(self, x):
        self.cache["k"] = x.sum()
        self.seen.append(1)
        self.names["b"] = 2
        del self.names["a"]
        self.tags.clear()
        self.flag = True
        self.extra = 3
        return self.conv(x)


def test_plain_state_is_put_back():
    m = _Stateful()
    cache, seen, names, tags = m.cache, m.seen, m.names, m.tags
    hooks = m.conv._forward_hooks
    with untouched(m):
        m(torch.randn(1, 2, 3, 3))
        m.conv._forward_hooks[0] = print           # an empty hook dict filled
        m.seen = ["replaced"]                       # an attribute rebound
    assert m.cache is cache and m.cache == {}
    assert m.seen is seen and seen == []
    assert m.names is names and names == {"a": 1}
    assert m.tags is tags and tags == {"x"}
    assert m.flag is False and not hasattr(m, "extra")
    assert m.conv._forward_hooks is hooks and not hooks


def test_a_filled_then_rebound_empty_container_is_emptied():
    m = _Stateful()
    cache = m.cache
    with untouched(m):
        cache["late"] = 1
        m.cache = {"other": 2}
    assert m.cache is cache and cache == {}


def test_an_attribute_swapped_for_another_is_put_back():
    """One attribute deleted and another added (the same number of them), one rebound to
    an equal but new object: each is put back as the very object it was."""
    m = _Stateful()
    m.gone = None
    pair = (1, 2)
    m.pair = pair
    with untouched(m):
        del m.gone
        m.added = None
        m.pair = tuple(list(pair))                  # equal, another object
    assert m.gone is None and not hasattr(m, "added")
    assert m.pair is pair
