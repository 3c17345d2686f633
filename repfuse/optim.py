"""Gradient re-parameterization (as in RepOptimizer): train the fused kernel so that
each step equals a step on the multi-branch training form.

Setting. A region whose branches are *linear in their trainable tensors* with
*constant scales*: conv weights and conv biases are trained; batch norms are frozen
(eval mode, so each is a constant per-channel scale and shift), scalar/per-channel
scales are constants, identities and average pools have no trainable tensors, and no
branch chains two convs (a 1x1 -> kxk sequence is bilinear in its two weights). Then
the fused kernel is an affine function of the trainable tensors theta,

    (W, b) = A theta + c,

where ``c`` collects everything that does not depend on theta (identity branches, BN
shifts, ...). For embedded branches W = sum_b s_b * E_b(w_b) (E_b pads/places a kernel,
s_b the frozen per-output-channel BN scale) the Gram map A A^T is diagonal:

    A A^T g = M * g,    M = sum_b s_b^2 * mask_b     (per element; 0 where no branch
                                                       reaches, e.g. corners of ACNet)

Plain SGD. The branches' gradient is A^T g (chain rule; g the gradient w.r.t. (W, b)), so
one step theta <- theta - lr A^T g moves the fused kernel by -lr A A^T g = -lr M * g:
fusing after a step on the training form equals a step on the fused kernel with the
gradient multiplied by M. Momentum SGD (also dampening, Nesterov) is linear in the
gradients, so A maps the branches' momentum buffers onto the fused buffers and the two
stay equal step after step. Weight decay lambda on the branches adds lambda * A theta =
lambda * (W - c) to the fused gradient: decay *towards c*, not towards 0, so it maps to
ordinary weight decay on W only when c = 0 (no identity branch, no constant offsets).
``apply_multipliers(..., weight_decay=lambda)`` applies the exact form.

Not covered (these steps do not commute with fusion): a non-diagonal A A^T (sequences
of convs, learned scales, training-mode BN whose batch statistics depend on the
weights), gradient clipping by norm (the norm of A^T g is not the norm of g), Adam /
RMSProp (per-element normalisation and eps act on the branches' elements, which the
fused elements mix), and decoupled weight decay (AdamW) for the same reason.
``gradient_multipliers`` raises ``NotFusable`` when A A^T is not diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repfuse import region as rg
from repfuse.errors import NotFusable
from repfuse.proofs.compare import SEED
from repfuse.region.tree import children, node_tensors, substitute, walk

#: Relative tolerance of the check that A A^T is diagonal (float64 arithmetic).
DIAGONAL_RTOL = 1e-10


@dataclass
class GradientMultiplier:
    """Per-element multipliers and constant offsets of one fused region (float64)."""

    weight: Tensor          # M for the fused weight, shape (O, I/g, KH, KW)
    bias: Tensor            # M for the fused bias, shape (O,)
    weight_offset: Tensor   # c: the part of the fused weight no trainable tensor reaches
    bias_offset: Tensor

    def weight_grad(self, grad: Tensor, weight: Tensor | None = None,
                    weight_decay: float = 0.0) -> Tensor:
        """The fused weight's gradient equivalent to the branches' (see module doc)."""
        return _mapped(grad, self.weight, self.weight_offset, weight, weight_decay)

    def bias_grad(self, grad: Tensor, bias: Tensor | None = None,
                  weight_decay: float = 0.0) -> Tensor:
        return _mapped(grad, self.bias, self.bias_offset, bias, weight_decay)


def _mapped(grad, mult, offset, value, weight_decay):
    out = grad * mult.to(grad.device, grad.dtype)
    if weight_decay:
        if value is None:
            raise ValueError("weight_decay needs the current fused value")
        out = out + weight_decay * (value.detach() - offset.to(value.device, value.dtype))
    return out


def trainable_tensors(expr: rg.Node) -> list[Tensor]:
    """The tensors trained in the training form: conv weights and conv biases."""
    found: dict[int, Tensor] = {}
    for node in walk(expr):
        if isinstance(node, rg.Conv):
            for t in (node.weight, node.bias):
                if isinstance(t, Tensor) and t.is_floating_point():
                    found.setdefault(id(t), t)
    return list(found.values())


def _check_linear(expr: rg.Node) -> None:
    """Raise ``NotFusable`` if a conv's input depends on another conv (bilinear)."""
    below: dict[int, bool] = {}
    for node in walk(expr):
        kids = children(node)
        has_conv = any(below[id(c)] or isinstance(c, rg.Conv) for c in kids)
        if isinstance(node, rg.Conv) and has_conv:
            raise NotFusable(
                f"conv {node.name or node.spec.describe()} follows another conv in the same "
                "branch: the fused kernel is bilinear in their weights, so no per-element "
                "gradient multiplier exists; train this region in its training form")
        below[id(node)] = has_conv


def _with(expr: rg.Node, trainable: list[Tensor], values: list[Tensor]):
    """(W, b) of ``expr`` with the trainable tensors replaced by ``values`` and every
    other tensor by a float64 constant copy."""
    mapping = {id(t): v for t, v in zip(trainable, values)}
    for t in node_tensors(expr):
        if id(t) not in mapping and t.is_floating_point():
            mapping[id(t)] = t.detach().to(torch.float64)
    fused = rg.reduce(substitute(expr, mapping))
    bias = fused.bias if fused.bias is not None else torch.zeros(
        fused.spec.out_channels, dtype=torch.float64, device=fused.weight.device)
    return fused.weight, bias


def gradient_multipliers(expr: rg.Node) -> GradientMultiplier:
    """Per-element gradient multipliers M and offsets c of the fused kernel of ``expr``.

    Computed with autograd through ``region.reduce``: c = (W, b) at theta = 0,
    M = A (A^T 1). A seeded random probe g then checks A A^T g == M * g; if not (the
    region is not a sum of embedded branches with constant scales) ``NotFusable``.
    """
    _check_linear(expr)
    trainable = trainable_tensors(expr)
    if not trainable:
        raise NotFusable("region has no conv weight or bias to train; nothing to multiply")
    leaves = [t.detach().to(torch.float64).clone().requires_grad_(True) for t in trainable]
    zeros = [torch.zeros_like(v) for v in leaves]
    with torch.no_grad():
        c_w, c_b = _with(expr, trainable, zeros)

    def gram(gw: Tensor, gb: Tensor) -> tuple[Tensor, Tensor]:
        w, b = _with(expr, trainable, leaves)
        outs = [(w, gw), (b, gb)]
        outs = [(o, g) for o, g in outs if o.requires_grad]
        at_g = torch.autograd.grad([o for o, _ in outs], leaves, [g for _, g in outs],
                                   allow_unused=True)
        at_g = [torch.zeros_like(v) if a is None else a for v, a in zip(leaves, at_g)]
        with torch.no_grad():
            aw, ab = _with(expr, trainable, at_g)
        return aw - c_w, ab - c_b

    m_w, m_b = gram(torch.ones_like(c_w), torch.ones_like(c_b))
    gen = torch.Generator().manual_seed(SEED)
    pw = torch.randn(c_w.shape, generator=gen, dtype=torch.float64).to(c_w.device)
    pb = torch.randn(c_b.shape, generator=gen, dtype=torch.float64).to(c_b.device)
    gw, gb = gram(pw, pb)
    for got, want in ((gw, m_w * pw), (gb, m_b * pb)):
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-300)
        if want.numel() and float((got - want).abs().max()) > DIAGONAL_RTOL * scale:
            raise NotFusable("the re-parameterization map's Gram matrix A A^T is not diagonal "
                             "(branches are not embedded kernels with constant scales); no "
                             "per-element gradient multiplier exists for this region")
    return GradientMultiplier(m_w.detach(), m_b.detach(), c_w.detach(), c_b.detach())


def apply_multipliers(conv: nn.Module, mult: GradientMultiplier, *,
                      weight_decay: float = 0.0) -> list:
    """Register gradient hooks on a fused conv (``nn.Conv2d``, or a Sequential ending in
    one) so that its gradients become ``M * g (+ weight_decay * (W - c))``: an optimizer
    step on it (SGD, momentum SGD, both *without* their own weight decay) then equals the
    same step on the training form with ``weight_decay`` on the branches. Returns the
    hook handles (``handle.remove()`` to undo)."""
    if isinstance(conv, nn.Sequential):
        conv = conv[-1]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"apply_multipliers needs an nn.Conv2d, got {type(conv).__name__}")
    if tuple(conv.weight.shape) != tuple(mult.weight.shape):
        raise ValueError(f"conv weight has shape {list(conv.weight.shape)}, multipliers "
                         f"{list(mult.weight.shape)}: not the fused conv of this region")
    handles = [conv.weight.register_hook(
        lambda g, w=conv.weight: mult.weight_grad(g, w, weight_decay))]
    if conv.bias is not None:
        handles.append(conv.bias.register_hook(
            lambda g, b=conv.bias: mult.bias_grad(g, b, weight_decay)))
    return handles
