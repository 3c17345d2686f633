"""Weight gradient of a convolution through one grouped convolution.

The classic trick (older ``torch.nn.grad.conv2d_weight``): the weight gradient

    dW[o, c', i, j] = sum_{n, oh, ow} dy[n, o, oh, ow] * xp[n, g(o) * Cg + c', oh*s + i*d, ...]

is itself a convolution of the (padded) input with the output gradient used as the
filter, with stride and dilation swapped. Viewing the input as (1, N*C, H, W) with
``groups=N*C`` gives every (sample, input channel) pair its own group; the filters of
group (n, c) are the output-gradient channels of c's convolution group, i.e.
``dy[n, (c // Cg) * Og : (c // Cg + 1) * Og]``. Tiling the output gradient that way
(rather than repeating all O channels per input channel, the bug older torch had for
1 < groups < C) makes the trick correct for every ``groups``: 1, 1 < g < C, depthwise
and channel multipliers O != C. The result is cropped to the kernel extent and summed
over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError

# Elements of the tiled output gradient materialised at once (batch chunks bound it).
_TILE_BUDGET = 1 << 24


def _check(x: torch.Tensor, weight_size, grad_output: torch.Tensor, spec: ConvSpec) -> None:
    if spec.layout != "NCHW" or spec.transposed:
        raise GeometryError(f"conv2d_weight_grouped needs a forward NCHW spec, got {spec}")
    if spec.padding_mode != "zeros":
        raise GeometryError(
            f"padding_mode={spec.padding_mode!r}: the grouped weight gradient supports only "
            "'zeros' (pad the input explicitly)")
    spec.check_weight(tuple(weight_size), "weight_size")
    spec.check_grad_output(tuple(x.shape), tuple(grad_output.shape))


def _padded_input(x: torch.Tensor, spec: ConvSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input with the deficit of bottom/right padding added explicitly, and the
    (top, left) padding left to the convolution call (zero rows beyond the read
    extent only produce extra outputs, which are cropped)."""
    top, bottom, left, right = spec.padding
    extra_b, extra_r = max(0, bottom - top), max(0, right - left)
    if extra_b or extra_r:
        x = F.pad(x, (0, extra_r, 0, extra_b))
    return x, (top, left)


def conv2d_weight_grouped(x: torch.Tensor, weight_size, grad_output: torch.Tensor,
                          spec: ConvSpec) -> torch.Tensor:
    """Gradient of a forward convolution with respect to its weight, via one grouped
    convolution per batch chunk (``groups = n_chunk * C``).

    Args:
        x: input, (N, C, H, W), NCHW, in the compute dtype.
        weight_size: torch weight shape (O, C / groups, KH, KW).
        grad_output: (N, O, OH, OW), same dtype as ``x``.
        spec: the forward convolution's ``ConvSpec`` (layout NCHW, not transposed,
            zero padding; any stride, per-side padding, dilation and groups).

    Returns:
        (O, C / groups, KH, KW) tensor in ``x``'s dtype.
    """
    _check(x, weight_size, grad_output, spec)
    n, c, _, _ = x.shape
    _, o, oh, ow = grad_output.shape
    g = spec.groups
    cg, og = spec.in_per_group, spec.out_per_group
    kh, kw = spec.kernel_size
    xp, pad = _padded_input(x, spec)
    hp, wp = xp.shape[2], xp.shape[3]
    per_sample = c * og * oh * ow
    chunk = max(1, min(n, _TILE_BUDGET // max(1, per_sample)))
    total = None
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        xs = xp[start:start + m].reshape(1, m * c, hp, wp)
        # Filters of group (sample, channel c): dy[sample, group(c) * Og : +Og].
        dys = grad_output[start:start + m].reshape(m, g, 1, og, oh, ow)
        filt = dys.expand(m, g, cg, og, oh, ow).reshape(m * c * og, 1, oh, ow)
        out = F.conv2d(xs, filt, None, stride=spec.dilation, padding=pad,
                       dilation=spec.stride, groups=m * c)
        out = out[:, :, :kh, :kw].reshape(m, g, cg, og, kh, kw).sum(0)
        total = out if total is None else total + out
    # (g, Cg, Og, KH, KW) -> (g, Og, Cg, KH, KW) -> (O, Cg, KH, KW)
    return total.permute(0, 2, 1, 3, 4).reshape(o, cg, kh, kw).contiguous()
