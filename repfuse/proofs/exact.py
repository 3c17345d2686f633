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

The same context computes float64 depthwise convolutions on the CPU with the core's kernels
(``repfuse.core``): aten has no float64 grouped kernel there and runs one convolution per
channel, which made the depthwise layers most of a truth's cost (mobileone_s0 at
1x3x224x224, one thread: 18,726 per-channel convolutions in one truth run).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from repfuse.algebra.bn import bn_scale_shift
from repfuse.core import autograd as core_autograd
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


class _Float64Kernels(TorchFunctionMode):
    """``F.batch_norm`` with running statistics and ``training=False`` as
    ``shift + x * scale`` per channel (plain elementwise kernels, also in backward), and
    ``F.conv2d`` in float64 on the CPU with one input channel per group on the core's
    kernels (``_depthwise``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _affine_batch_norm(*args, **kwargs)
            if out is not None:
                return out
        elif func is F.conv2d:
            out = _depthwise(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _affine_batch_norm(input, running_mean, running_var, weight=None, bias=None,
                       training=False, momentum=0.1, eps=1e-5):
    if training or running_mean is None or running_var is None or input.dim() < 2:
        return None
    scale, shift = bn_scale_shift(running_mean, running_var, weight, bias, eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    # one pass (``input * scale + shift`` made a product the input's size, then the sum):
    # mobileone_s0's truth at 1x3x224x224, one thread, 0.906 against 0.944 s
    return torch.addcmul(shift.to(input.dtype).reshape(shape), input,
                         scale.to(input.dtype).reshape(shape))


def _depthwise(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` of a float64 depthwise convolution on the CPU (one input channel per
    group, any channel multiplier, a batched 4-D input, numeric padding) computed by
    ``repfuse.core.autograd.conv2d``, or None for any other call (aten computes it).

    The core's reference kernels apply the input's unfolded view tap by tap: measured, one
    thread, a 3x3 kernel, forward and input gradient, 1024 channels on 7x7 1.9-2.8 ms
    against aten's 9.4-9.8 ms, 512 on 14x14 1.9-3.1 against 6.2-6.7 ms, 64 on 112x112
    about the same (12-24 ms); grouped convolutions with more input channels per group
    stay on aten, faster there (8 per group, 152 channels on 14x14: 1.2 against 1.8 ms).
    The core's kernels are tested against aten's float64 ones (``tests/core``,
    ``tests/proofs/test_float64_kernels.py``). The weight gradient is made only for a
    weight that requires grad (the truth's weights are casts that do not), and there the
    reference kernels are slower than aten's on large grids, so such a call takes the
    core's ``"auto"`` choice (the reference kernels up to ``REFERENCE_DEPTHWISE_POSITIONS``
    output positions)."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)
            and input.dim() == 4 and weight.dim() == 4 and isinstance(groups, int)
            and groups > 1 and weight.shape[1] == 1 and not isinstance(padding, str)
            and input.dtype == weight.dtype == torch.float64
            and input.device.type == weight.device.type == "cpu"
            and (bias is None or bias.dtype == torch.float64)):
        return None
    algorithm = "auto" if weight.requires_grad else "reference"
    return core_autograd.conv2d(input, weight, bias, stride, padding, dilation, groups,
                                algorithm=algorithm)


@contextlib.contextmanager
def exact_norms() -> Iterator[None]:
    """Eval-mode batch norms computed as per-channel affine maps, float64 depthwise
    convolutions on the core's kernels (see the docstring)."""
    with _Float64Kernels():
        yield


# ------------------------------------------------- float64 weights cast where they are read
_GETTERS = ("shape", "device", "ndim", "requires_grad", "is_leaf", "layout",
            "is_cuda", "is_sparse", "is_quantized", "is_meta", "grad_fn")
_METHODS = ("size", "dim", "numel", "stride", "is_contiguous", "__len__", "nelement",
            "ndimension", "is_floating_point", "is_complex", "storage_offset", "get_device")
#: Torch functions that read only a tensor's metadata: a weight is not cast for them.
_METADATA = frozenset([getattr(torch.Tensor, g).__get__ for g in _GETTERS]
                      + [getattr(torch.Tensor, m) for m in _METHODS])
_DTYPE = torch.Tensor.dtype.__get__


class _Source:
    """What autograd keeps of a saved float64 cast of a weight (or a view of one): the
    weight itself, cast again when the backward asks for it (a float32 -> float64 cast is
    exact, so the backward reads the same values)."""

    __slots__ = ("source", "view")

    def __init__(self, source: torch.Tensor, view: tuple | None):
        self.source, self.view = source, view

    def cast(self) -> torch.Tensor:
        t = self.source.detach().to(torch.float64)
        return t if self.view is None else t.as_strided(*self.view)


class Float64Weights(TorchFunctionMode):
    """Run a model as its float64 copy (``float64_copy``) runs, without making the copy:
    each floating parameter and buffer (a source) is cast to float64 where a torch function
    reads it, for that call, and autograd's saved copies of a cast keep the source and
    cast it again in backward. The float64 weights are then never all alive at once: the
    truth of a model costs its activations, not twice its weights (a 426M-parameter model:
    3.4 GB).

    The run stands for the copy's run only where the model reads its weights through torch
    functions; ``impure`` names the first read it does not stand for (the copy's run is
    then the truth): a weight written in place, directly or through a tensor that shares
    its cast's memory (``w.data.clamp_()``: the write would go to a cast that the next
    read does not see), or a result below float64 from a call that read a weight
    (``w.float()``). ``w.dtype`` of a source reads float64, as on the copy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.sources = {id(t): t for t in [*model.parameters(), *model.buffers()]
                        if t.is_floating_point()}
        self.live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(cast) -> both
        # tensors that share a cast's memory (``w.data``, ``w[0]``, ``w.t()``), alive
        self.aliases: dict[int, weakref.ref] = {}
        self.impure: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        # ``==``, not ``is``: each attribute read hands the mode a new method-wrapper
        if func == _DTYPE and args and id(args[0]) in self.sources:
            return torch.float64
        read: list[torch.Tensor] = []   # the casts made for this call, and aliases read
        cast: list[torch.Tensor] = []
        args, kwargs = self._cast(args, cast, read), self._cast(kwargs, cast, read)
        if not read:
            return func(*args, **kwargs)
        if self.impure is None and (
                (_writes_first(func) and args and any(args[0] is r for r in read))
                or any(o is r for o in _leaves(kwargs.get("out")) for r in read)):
            self.impure = f"{_name(func)} writes a weight in place"
        try:
            out = func(*args, **kwargs)
        finally:
            for c in cast:
                self.live.pop(id(c), None)
        memory = {r.untyped_storage().data_ptr() for r in read}
        for o in _leaves(out):
            if not isinstance(o, torch.Tensor):
                continue
            if self.impure is None and o.is_floating_point() and o.dtype != torch.float64:
                self.impure = f"{_name(func)} reads a weight below float64"
            if o.untyped_storage().data_ptr() in memory:
                self.aliases[id(o)] = weakref.ref(o)
        return out

    def _cast(self, value, cast: list, read: list):
        if isinstance(value, torch.Tensor):
            key = id(value)
            alias = self.aliases.get(key)
            if alias is not None:
                if alias() is value:
                    read.append(value)
                else:
                    del self.aliases[key]
            source = self.sources.get(key)
            if source is None or source is not value:
                return value
            c = source.detach().to(torch.float64, copy=True)  # never the weight itself
            self.live[id(c)] = (c, source)
            cast.append(c)
            read.append(c)
            return c
        if type(value) in (tuple, list):
            return type(value)(self._cast(v, cast, read) for v in value)
        if type(value) is dict:
            return {k: self._cast(v, cast, read) for k, v in value.items()}
        return value

    def pack(self, t: torch.Tensor):
        """Saved-tensor hook: a cast (or a view of one) is kept as its source."""
        entry = self.live.get(id(t))
        if entry is not None and entry[0] is t:
            return _Source(entry[1], None)
        base = t._base
        if base is not None and t.dtype == torch.float64:
            entry = self.live.get(id(base))
            if entry is not None and entry[0] is base:
                return _Source(entry[1], (t.size(), t.stride(), t.storage_offset()))
        return t

    @staticmethod
    def unpack(packed):
        return packed.cast() if isinstance(packed, _Source) else packed

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The mode and its saved-tensor hooks, for a forward and its backward."""
        with self, torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


def _writes_first(func) -> bool:
    """Whether ``func`` writes its first argument in place (``add_``, ``__iadd__``,
    ``__setitem__``, a property's setter, ``copy_``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        return name in _WRITING_DUNDERS
    return name.endswith("_")


_WRITING_DUNDERS = frozenset(["__setitem__", "__set__"] + [
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                            "or", "xor", "lshift", "rshift", "matmul")])


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _leaves(out) -> list:
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in _leaves(o)]
    return [out]
