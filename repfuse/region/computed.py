"""Tensors computed from parameters and buffers: a value a region node may hold in place
of a tensor (a conv weight generated in forward, a frozen batch norm's scale, a pad value).

``Computed(fn, sources, names)`` is ``fn(*sources)``; ``sources`` are the model's own
parameters and buffers, so the tree utilities list its parameters, ``substitute`` swaps
them (the proofs' float64 leaves), and ``reduce`` and the reference evaluator evaluate it
from them: the map from those parameters to the fused kernel is differentiated through
``fn``. Its dtype, device and shape are read once, when it is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

__all__ = ["Computed", "evaluate_value", "parameter_sources"]


@dataclass(eq=False)
class Computed:
    """``fn(*sources)``: a tensor computed from parameters and buffers (``names``: where
    each source lives in the model, for reports and proofs)."""

    fn: Callable[..., Tensor]
    sources: tuple[Tensor, ...]
    names: tuple[str, ...]
    name: str = ""
    dtype: torch.dtype = field(init=False)
    device: torch.device = field(init=False)
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        with torch.no_grad():
            value = self.fn(*self.sources)
        self.dtype, self.device, self.shape = value.dtype, value.device, tuple(value.shape)

    def dim(self) -> int:
        """The value's rank (as ``Tensor.dim``, for the checks node types make on it)."""
        return len(self.shape)

    def value(self, exact: bool = False) -> Tensor:
        """The tensor (from float64 copies of floating sources with ``exact``)."""
        if exact:
            return self.fn(*[s.to(torch.float64) if s.is_floating_point() else s
                             for s in self.sources])
        return self.fn(*self.sources)

    def map(self, f: Callable[[Tensor], Tensor]) -> Computed:
        """``f`` applied to the value (a reshape, a reciprocal), still computed."""
        inner = self.fn
        return Computed(lambda *s: f(inner(*s)), self.sources, self.names, self.name)

    def with_sources(self, sources: tuple[Tensor, ...]) -> Computed:
        return replace(self, sources=sources)


def evaluate_value(value, exact: bool = False):
    """A node field's value: a ``Computed`` evaluated, anything else as it is."""
    return value.value(exact) if isinstance(value, Computed) else value


def parameter_sources(value: Computed) -> list[tuple[str, Tensor]]:
    """The sources of ``value`` that are parameters (buffers are constants of the map)."""
    return [(n, t) for n, t in zip(value.names, value.sources)
            if isinstance(t, nn.Parameter) and t.is_floating_point()]
