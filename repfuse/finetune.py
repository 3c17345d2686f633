"""Sparse update of fused models (on-device fine-tuning).

A fused (inference-form) model is fine-tuned by updating, in chosen convolutions, only
the weights that read chosen input channels. The backward pass needs the activations
of those channels only, so only those are kept: activation memory for backward shrinks
to ``k / C`` of the dense one for a conv updated on ``k`` of its ``C`` input channels.

* ``SparseUpdateConv2d(conv, in_channels)`` wraps an ``nn.Conv2d`` of any groups
  (dense, grouped such as RepVGG-B1g4's, depthwise with any channel multiplier): the
  selected weights are a trainable parameter ``weight_sel``; the rest of the kernel is a
  frozen buffer. Its autograd
  function saves ``x[:, in_channels]`` (never ``x``), computes the weight gradient with
  ``core.conv2d_weight`` on those channels (the compact form of
  ``core.conv2d_weight(x, ..., in_channels=...)``, which reads the same channels), the
  input gradient with ``core.conv2d_input`` and the bias gradient as the sum of the
  upstream gradient.
* ``sparse_update(model, {path: channels})`` wraps the chosen convs (and by default
  freezes every other parameter); ``merge(model)`` writes the updated weights back into
  plain ``nn.Conv2d`` modules.
* ``saved_activation_bytes(model, inputs)`` measures the bytes autograd keeps for
  backward (tensors saved by autograd that are not parameters or buffers).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse import core
from repfuse.core.sparse import channel_index
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError, InputError


def _rows_cols(spec: ConvSpec, idx: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """groups > 1: the weight entries input channel ``idx[t]`` reaches, as (row, column)
    index vectors of length k * Og: rows ``grp*Og .. grp*Og + Og - 1`` of its group
    ``grp = c // Cg`` and column ``c % Cg`` (depthwise: rows ``c*m .. c*m + m - 1``,
    column 0). groups=1: (None, None), the selected weights are ``weight[:, idx]``."""
    if spec.groups == 1:
        return None, None
    og, cg = spec.out_per_group, spec.in_per_group
    rows = ((idx // cg)[:, None] * og + torch.arange(og, device=idx.device)).flatten()
    return rows, (idx % cg).repeat_interleave(og)


def full_weight(frozen: Tensor, weight_sel: Tensor, idx: Tensor, rows: Tensor | None,
                cols: Tensor | None = None) -> Tensor:
    """The complete kernel: ``frozen`` with the selected part replaced by ``weight_sel``
    (groups=1: (O, k, KH, KW), columns ``idx``; otherwise (k*Og, 1, KH, KW) at the
    ``rows`` / ``cols`` entries of ``_rows_cols``)."""
    if rows is not None:
        if cols is None:
            cols = torch.zeros_like(rows)
        return frozen.index_put((rows, cols), weight_sel[:, 0])
    return frozen.index_copy(1, idx, weight_sel)


def _weight_grad(x_sel: Tensor, grad_out: Tensor, spec: ConvSpec, idx: Tensor,
                 rows: Tensor | None) -> Tensor:
    """Gradient of the selected weights from the kept channels only."""
    kh, kw = spec.kernel_size
    k = x_sel.shape[1]
    if rows is None:
        size = (spec.out_channels, k, kh, kw)
        return core.conv2d_weight(x_sel, size, grad_out, spec.stride, spec.padding,
                                  spec.dilation, 1)
    # every selected channel is a group of its own against the Og output channels it
    # reaches: one conv weight gradient with groups=k
    og = spec.out_per_group
    size = (k * og, 1, kh, kw)
    return core.conv2d_weight(x_sel, size, grad_out.index_select(1, rows), spec.stride,
                              spec.padding, spec.dilation, k)


class _SparseConv(torch.autograd.Function):
    """y = conv(x, W) + b with W = frozen except ``weight_sel``; saves x[:, idx] only."""

    @staticmethod
    def forward(ctx, x, weight_sel, bias, frozen, idx, rows, cols, spec):
        weight = full_weight(frozen, weight_sel, idx, rows, cols)
        y = core.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        x_sel = x.index_select(1, idx) if ctx.needs_input_grad[1] else None
        ctx.spec, ctx.x_shape, ctx.has_bias = spec, tuple(x.shape), bias is not None
        ctx.save_for_backward(x_sel, weight_sel if ctx.needs_input_grad[0] else None,
                              frozen if ctx.needs_input_grad[0] else None, idx, rows, cols)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_sel, weight_sel, frozen, idx, rows, cols = ctx.saved_tensors
        spec = ctx.spec
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            weight = full_weight(frozen, weight_sel, idx, rows, cols)
            gx = core.conv2d_input(ctx.x_shape, weight, grad_out, spec.stride, spec.padding,
                                   spec.dilation, spec.groups)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(x_sel, grad_out, spec, idx, rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum(dim=(0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


class SparseUpdateConv2d(nn.Module):
    """An ``nn.Conv2d`` whose weights are trained only on the input channels
    ``in_channels``: groups=1: ``weight_sel`` is ``weight[:, in_channels]``; otherwise
    (k*Og, 1, KH, KW), block t the Og weights of input channel ``in_channels[t]`` (its
    group's output channels, its column in the group; depthwise: the rows of the
    channel). The bias is trained when ``train_bias`` and the conv has one."""

    def __init__(self, conv: nn.Conv2d, in_channels, *, train_bias: bool = True):
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str):
            raise InputError(f"SparseUpdateConv2d needs an nn.Conv2d with numeric padding, "
                             f"got {type(conv).__name__}")
        spec = ConvSpec.from_module(conv)
        self.spec = spec
        self.conv_spec = spec.replace(padding_mode="zeros", padding=0) \
            if spec.padding_mode != "zeros" else spec
        idx = channel_index(in_channels, spec.in_channels, conv.weight.device)
        if idx.numel() and torch.unique(idx).numel() != idx.numel():
            raise GeometryError(f"in_channels={idx.tolist()} repeats a channel")
        self.register_buffer("idx", idx)
        rows, cols = _rows_cols(spec, idx)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        w = conv.weight.detach()
        self.register_buffer("frozen", w.clone())
        sel = w[rows, cols].unsqueeze(1) if rows is not None else w.index_select(1, idx)
        self.weight_sel = nn.Parameter(sel.clone())
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=train_bias)
        else:
            self.bias = None

    @property
    def weight(self) -> Tensor:
        """The complete current kernel (for inspection and ``to_conv``)."""
        return full_weight(self.frozen, self.weight_sel.detach(), self.idx, self.rows,
                           self.cols)

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        if spec.padding_mode != "zeros":
            t, b, l, r = spec.padding
            x = F.pad(x, (l, r, t, b), mode=spec.padding_mode)
        return _SparseConv.apply(x, self.weight_sel, self.bias, self.frozen, self.idx,
                                 self.rows, self.cols, self.conv_spec)

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the updated weights."""
        s = self.spec
        conv = nn.Conv2d(s.in_channels, s.out_channels, s.kernel_size, s.stride,
                         s.torch_padding, s.dilation, s.groups, bias=self.bias is not None,
                         padding_mode=s.padding_mode, device=self.frozen.device,
                         dtype=self.frozen.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def sparse_update(model: nn.Module, channels: dict, *, freeze_rest: bool = True,
                  train_bias: bool = True, inplace: bool = False) -> nn.Module:
    """Wrap the convs named in ``channels`` ({module path: input channels}) in
    ``SparseUpdateConv2d``. With ``freeze_rest`` every other parameter stops requiring
    grad. Returns the model (a deep copy unless ``inplace``)."""
    if not inplace:
        model = copy.deepcopy(model)
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    for path, sel in channels.items():
        try:
            conv = model.get_submodule(path)
        except AttributeError as err:
            raise InputError(f"sparse_update: model has no module {path!r}") from err
        _set(model, path, SparseUpdateConv2d(conv, sel, train_bias=train_bias))
    return model


def merge(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``SparseUpdateConv2d`` by a plain ``nn.Conv2d`` with its weights."""
    if not inplace:
        model = copy.deepcopy(model)
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseUpdateConv2d)]
    for path, m in wrapped:
        _set(model, path, m.to_conv())
    return model


def saved_activation_bytes(model: nn.Module, *inputs: Tensor, loss=None) -> int:
    """Bytes of the tensors autograd keeps for backward when running ``model(*inputs)``
    (each storage counted once; parameters and buffers excluded). ``loss`` (default:
    sum of the output) is applied too, and the graph is freed without a backward."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters())
           + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
        value = out.sum() if loss is None else loss(out)
    del value, out
    return sum(seen.values())
