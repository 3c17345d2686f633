"""repfuse's own grad mode: the same whatever the caller's.

Conversion scripts call repfuse inside ``torch.no_grad()`` or ``torch.inference_mode()``;
the result and the verdict must not depend on it. Everything repfuse computes runs outside
inference mode, so that the tensors it makes and the modules it returns are ordinary
tensors autograd can use later, with grad disabled (``own_mode``); a proof enables grad
explicitly on its own copies (``differentiable``), and a model whose tensors are inference
tensors is differentiated through an ordinary copy (``ordinary``). The caller's modes are
restored on the way out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from repfuse.pristine import copy_model

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def own_mode() -> Iterator[None]:
    """Outside inference mode, grad disabled."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def differentiable() -> Iterator[None]:
    """Outside inference mode, grad enabled: where a proof differentiates its own copies."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _running_in(mode: Callable[[], contextlib.AbstractContextManager]) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with mode():
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


#: Decorators: the function runs in ``own_mode`` / ``differentiable``.
in_own_mode = _running_in(own_mode)
in_differentiable_mode = _running_in(differentiable)


def has_inference_tensors(model: nn.Module) -> bool:
    return any(t.is_inference() for t in [*model.parameters(), *model.buffers()])


def ordinary(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it with ordinary tensors when some of its parameters or
    buffers are inference tensors (autograd cannot save those for backward)."""
    if not has_inference_tensors(model):
        return model
    with torch.inference_mode(False):
        return copy_model(model)
