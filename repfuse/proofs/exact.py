"""The float64 runs the whole-model criterion judges against (``repfuse.proofs.truth``).

Two things make a float64 copy of a model less than the truth it stands for, and both are
handled here:

* the copy itself: a model that caches a tensor computed in forward (an attention-bias
  cache filled in eval mode) holds a tensor with autograd history right after the
  reference run, and ``copy.deepcopy`` refuses such tensors; they are copied detached.
* torch's eval-mode batch-norm kernel: its CPU backward has returned wrong input
  gradients (torch 2.14: relative L2 error about 1.4) when the upstream gradient has
  batch 1 and a channels-last layout with a batch stride other than C*H*W, which the
  backward of ``flatten(2).transpose(1, 2)`` (+ ``cat`` over levels) gives: RT-DETR's
  decoder input projections, LeViT's stem. An eval-mode
  batch norm is an affine map per channel; in the float64 runs it is computed as one
  (``exact_norms``), so the truth does not share the kernel with the runs it judges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from repfuse.algebra.bn import bn_scale_shift
from repfuse.pristine import copy_model


def float64_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with float64 copies of its floating parameters and buffers (what
    ``copy.deepcopy(model).double()`` gives, ties kept), made without an intermediate copy
    in the model's own dtype; tensors with autograd history held in plain attributes
    (caches filled by a forward with grad on) are copied detached (``pristine.copy_model``)."""
    memo: dict[int, object] = {}
    with torch.inference_mode(False):
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in memo or not t.is_floating_point():
                continue
            c = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
        return copy_model(model, memo)


class _AffineNorms(TorchFunctionMode):
    """``F.batch_norm`` with running statistics and ``training=False`` as
    ``x * scale + shift`` per channel (plain elementwise kernels, also in backward)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _affine_batch_norm(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _affine_batch_norm(input, running_mean, running_var, weight=None, bias=None,
                       training=False, momentum=0.1, eps=1e-5):
    if training or running_mean is None or running_var is None or input.dim() < 2:
        return None
    scale, shift = bn_scale_shift(running_mean, running_var, weight, bias, eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return input * scale.to(input.dtype).reshape(shape) + shift.to(input.dtype).reshape(shape)


@contextlib.contextmanager
def exact_norms() -> Iterator[None]:
    """Eval-mode batch norms computed as per-channel affine maps (see the docstring)."""
    with _AffineNorms():
        yield
