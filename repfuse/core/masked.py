"""Region-restricted convolution: forward, grad input and grad weight.

MegEngine's definition, generalised to any stride, per-side padding, dilation and
groups: the product ``x[n, c, ih, iw] * w[o, c, i, j]`` counts in ``y[n, o, oh, ow]``
only where ``region_in[n, ih, iw] == region_out[n, oh, ow]``, (ih, iw) being the
input position tap (i, j) reads for output (oh, ow) (``ConvSpec.reads``). Reads in
the padding contribute zero. Region ids are integer tensors compared exactly (never
through floating point, so ids above 2**24 are fine).

Two implementations:

* ``reference``: im2col with the equality mask (plain tensor ops, exact in float64).
* ``fast``: one native convolution corrected at the *boundary* output positions (those
  with at least one tap whose id differs), or, when boundaries are long and there are
  few distinct ids, one native call on per-region masked copies stacked along the
  batch. Whichever is estimated cheaper is used. The boundary correction subtracts
  the cross-region products from the unrestricted result, so its rounding error is
  that of the unrestricted convolution (absolute, not relative to the restricted
  result); in float64 both paths agree with the reference to ~1e-12.

All functions take NCHW tensors, torch weight layout, the compute dtype and a forward
NCHW ``ConvSpec``; the public kernels in ``repfuse.core.kernels`` normalise to that.
"""

from __future__ import annotations

import torch

from repfuse.core.native import conv2d as native_conv2d
from repfuse.core.native import conv2d_input as native_conv2d_input
from repfuse.core.native import conv2d_weight as native_conv2d_weight
from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError

ALGORITHMS = ("auto", "native", "fast", "reference")
# Stacked per-region copies are used only for at most this many distinct ids.
_MAX_STACKED_IDS = 8
# "stacked" or "boundary" forces one fast strategy (tests exercise both); None decides.
_FORCE: str | None = None


# ---------------------------------------------------------------- taps
class Taps:
    """Where every tap reads, from ``ConvSpec.tap_offsets``: ``rows`` (OH, KH) and
    ``cols`` (OW, KW) input indices clamped into the input, ``row_ok`` / ``col_ok`` of
    the same shapes (false where the tap reads the padding) and their product ``valid``
    (1, OH, KH, OW, KW)."""

    def __init__(self, spec: ConvSpec, in_hw, out_hw, device=None):
        idx, ok = [], []
        for axis in range(2):
            off = torch.tensor(spec.tap_offsets(axis), device=device)
            pos = torch.arange(out_hw[axis], device=device)[:, None] * spec.stride[axis] + off
            ok.append((pos >= 0) & (pos < in_hw[axis]))
            idx.append(pos.clamp(0, in_hw[axis] - 1))
        self.rows, self.cols = idx
        self.row_ok, self.col_ok = ok
        self.valid = (ok[0][:, :, None, None] & ok[1][None, None]).unsqueeze(0)


def patch_taps(spec: ConvSpec, in_hw, out_hw, device=None) -> Taps:
    """The ``Taps`` of a forward convolution from ``in_hw`` to ``out_hw``."""
    return Taps(spec, tuple(in_hw), tuple(out_hw), device)


def gather_patches(x: torch.Tensor, taps: Taps) -> torch.Tensor:
    """im2col without padding copies: (N, C, H, W) -> (N, C, OH, KH, OW, KW). Entries of
    taps that read the padding hold a clamped in-bounds value; mask them with
    ``taps.valid``."""
    return x[:, :, taps.rows[:, :, None, None], taps.cols[None, None]]


# ---------------------------------------------------------------- validation
def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise GeometryError(
            f"algorithm={algorithm!r} is not available for region-restricted convolution; "
            f"use one of {', '.join(ALGORITHMS)}")
    return "reference" if algorithm == "reference" else "fast"


def _check_region(ids: torch.Tensor, name: str, expected: tuple, what: str,
                  device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise GeometryError(f"{name} must be an integer tensor of shape {list(expected)}")
    if ids.is_floating_point() or ids.is_complex():
        raise GeometryError(
            f"{name} has dtype {ids.dtype}; region ids must be an integer (or bool) tensor "
            "so that they compare exactly")
    if tuple(ids.shape) != tuple(expected):
        raise GeometryError(
            f"{name} has shape {list(ids.shape)}, expected {list(expected)} "
            f"(N, {what}) for this convolution")
    return ids.to(device)


def check_regions(region_in, region_out, spec: ConvSpec, n: int, in_hw, out_hw, device):
    """Validate ``region_in`` (N, IH, IW) and ``region_out`` (N, OH, OW) and move them to
    ``device``; raises ``GeometryError`` (a ValueError) naming the mask and its expected
    shape."""
    if spec.padding_mode != "zeros":
        raise GeometryError(
            f"padding_mode={spec.padding_mode!r}: region-restricted convolution supports "
            "only 'zeros'")
    rin = _check_region(region_in, "region_in", (n, *in_hw), "IH, IW of the input", device)
    rout = _check_region(region_out, "region_out", (n, *out_hw), "OH, OW of the output",
                         device)
    return rin, rout


def _equal_taps(rin, rout, spec: ConvSpec, in_hw, out_hw):
    """(N, OH, KH, OW, KW) bool: the tap reads inside the input and the ids match."""
    taps = patch_taps(spec, in_hw, out_hw, rin.device)
    rin_p = rin[:, taps.rows[:, :, None, None], taps.cols[None, None]]
    return (rin_p == rout[:, :, None, :, None]) & taps.valid, taps


# ---------------------------------------------------------------- reference
def _grouped_views(spec: ConvSpec, weight: torch.Tensor):
    g, cg, og = spec.groups, spec.in_per_group, spec.out_per_group
    kh, kw = spec.kernel_size
    return weight.reshape(g, og, cg, kh, kw), g, cg, og


def _reference_conv2d(x, weight, spec, rin, rout, out_hw):
    n, c, h, w = x.shape
    mask, taps = _equal_taps(rin, rout, spec, (h, w), out_hw)
    xp = gather_patches(x, taps)
    xp = torch.where(mask[:, None], xp, xp.new_zeros(()))
    wg, g, cg, og = _grouped_views(spec, weight)
    oh, kh, ow, kw = mask.shape[1:]
    y = torch.einsum("ngcpiqj,gocij->ngopq", xp.reshape(n, g, cg, oh, kh, ow, kw), wg)
    return y.reshape(n, g * og, oh, ow)


def _reference_conv2d_input(input_size, weight, grad_output, spec, rin, rout):
    n, c, h, w = input_size
    _, o, oh, ow = grad_output.shape
    mask, taps = _equal_taps(rin, rout, spec, (h, w), (oh, ow))
    wg, g, cg, og = _grouped_views(spec, weight)
    kh, kw = spec.kernel_size
    dp = torch.einsum("ngopq,gocij->ngcpiqj", grad_output.reshape(n, g, og, oh, ow), wg)
    dp = torch.where(mask[:, None], dp.reshape(n, c, oh, kh, ow, kw), dp.new_zeros(()))
    flat = (taps.rows[:, :, None, None] * w + taps.cols[None, None]).reshape(-1)
    dx = grad_output.new_zeros(n * c, h * w)
    dx.index_add_(1, flat, dp.reshape(n * c, -1))
    return dx.reshape(n, c, h, w)


def _reference_conv2d_weight(x, grad_output, spec, rin, rout):
    n, c, h, w = x.shape
    _, o, oh, ow = grad_output.shape
    mask, taps = _equal_taps(rin, rout, spec, (h, w), (oh, ow))
    xp = gather_patches(x, taps)
    xp = torch.where(mask[:, None], xp, xp.new_zeros(()))
    g, cg, og = spec.groups, spec.in_per_group, spec.out_per_group
    kh, kw = spec.kernel_size
    dw = torch.einsum("ngopq,ngcpiqj->gocij", grad_output.reshape(n, g, og, oh, ow),
                      xp.reshape(n, g, cg, oh, kh, ow, kw))
    return dw.reshape(o, cg, kh, kw)


# ---------------------------------------------------------------- fast
def _use_stacked(n_ids: int, frac: float) -> bool:
    """Stacked per-region copies (one native call on ``n_ids`` masked copies) or one
    native call plus im2col work on the fraction ``frac`` of boundary positions (about
    twice a native call's cost per position)? ``_FORCE`` overrides, for tests."""
    if _FORCE is not None:
        return _FORCE == "stacked"
    return n_ids <= _MAX_STACKED_IDS and n_ids < 1 + 2 * frac


class _Plan:
    """How the fast path handles one (region_in, region_out, geometry) case: the
    boundary output positions (pn, ph, pw), their cross taps ``cross`` (P, KH, KW) and,
    when stacking per-region copies is cheaper, the region ids ``ids``."""

    def __init__(self, rin, rout, spec: ConvSpec, in_hw, out_hw):
        taps = self.taps = patch_taps(spec, in_hw, out_hw, rin.device)
        n, (oh, ow) = rin.shape[0], out_hw
        kh, kw = spec.kernel_size
        # (N, OH, OW): some in-bounds tap reads an id different from the output's.
        at = torch.zeros((n, oh, ow), dtype=torch.bool, device=rin.device)
        for i in range(kh):
            by_row = rin.index_select(1, taps.rows[:, i])
            for j in range(kw):
                differs = by_row.index_select(2, taps.cols[:, j]) != rout
                ok = taps.row_ok[:, i, None] & taps.col_ok[None, :, j]
                at |= differs & ok
        self.pn, self.ph, self.pw = at.nonzero(as_tuple=True)
        rows = taps.rows[self.ph][:, :, None]  # (P, KH, 1)
        cols = taps.cols[self.pw][:, None, :]  # (P, 1, KW)
        self.flat = (self.pn[:, None, None] * in_hw[0] + rows) * in_hw[1] + cols  # (P, KH, KW)
        ids_p = rin.reshape(-1)[self.flat.reshape(-1)].reshape(self.flat.shape)
        self.cross = ((ids_p != rout[self.pn, self.ph, self.pw][:, None, None])
                      & taps.row_ok[self.ph][:, :, None] & taps.col_ok[self.pw][:, None, :])
        frac = self.pn.numel() / max(1, n * oh * ow)
        self.ids = None
        if frac > 0:
            ids = torch.unique(rout)
            ids = ids[torch.isin(ids, torch.unique(rin))]
            if _use_stacked(ids.numel(), frac):
                self.ids = ids
        self.rin, self.rout = rin, rout

    def masks(self, dtype):
        ids = self.ids.to(self.rin.dtype)
        m_in = (self.rin[None] == ids.view(-1, 1, 1, 1)).to(dtype)
        m_out = (self.rout[None] == ids.view(-1, 1, 1, 1)).to(dtype)
        return m_in.unsqueeze(2), m_out.unsqueeze(2)  # (K, N, 1, H, W), (K, N, 1, OH, OW)

    def boundary_patches(self, x):
        """Masked input patches at the boundary positions: (P, KH, KW, C)."""
        shape = self.cross.shape
        n = self.pn[:, None, None].expand(shape).reshape(-1)
        rows = self.taps.rows[self.ph][:, :, None].expand(shape).reshape(-1)
        cols = self.taps.cols[self.pw][:, None, :].expand(shape).reshape(-1)
        xp = x[n, :, rows, cols].reshape(*shape, x.shape[1])
        return torch.where(self.cross[..., None], xp, xp.new_zeros(()))

    def scatter_sub(self, dx, dp):
        """``dx`` (N, C, H, W) minus the patch gradients ``dp`` (P, KH, KW, C) of the
        cross taps, added back at the input positions they read (duplicates accumulate;
        the other taps go to a discarded slot, so ``dp`` needs no masking)."""
        n, c, h, w = dx.shape
        discard = n * h * w
        flat = torch.where(self.cross, self.flat, discard).reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        acc = dp.new_zeros(uniq.numel(), c).index_add_(0, inverse, dp.reshape(-1, c))
        if uniq[-1] == discard:
            uniq, acc = uniq[:-1], acc[:-1]
        hw = h * w
        cols = (uniq // hw)[:, None] * (c * hw) + torch.arange(c, device=dx.device) * hw \
            + (uniq % hw)[:, None]
        dx.view(-1).index_add_(0, cols.reshape(-1), acc.reshape(-1), alpha=-1)
        return dx


def _fast_conv2d(x, weight, spec, rin, rout, out_hw):
    plan = _Plan(rin, rout, spec, tuple(x.shape[2:]), out_hw)
    if plan.ids is not None:
        m_in, m_out = plan.masks(x.dtype)
        k, n = m_in.shape[:2]
        xs = (x.unsqueeze(0) * m_in).reshape(k * n, *x.shape[1:])
        ys = native_conv2d(xs, weight, None, spec)
        return (ys.reshape(k, n, *ys.shape[1:]) * m_out).sum(0)
    y = native_conv2d(x, weight, None, spec)
    if plan.pn.numel():
        wg, g, cg, og = _grouped_views(spec, weight)
        xp = plan.boundary_patches(x)
        p, kh, kw, _ = xp.shape
        corr = torch.einsum("pijgc,gocij->pgo", xp.reshape(p, kh, kw, g, cg), wg)
        y[plan.pn, :, plan.ph, plan.pw] -= corr.reshape(p, g * og)
    return y


def _fast_conv2d_input(input_size, weight, grad_output, spec, rin, rout):
    n, c, h, w = input_size
    plan = _Plan(rin, rout, spec, (h, w), tuple(grad_output.shape[2:]))
    if plan.ids is not None:
        m_in, m_out = plan.masks(grad_output.dtype)
        k = m_in.shape[0]
        dys = (grad_output.unsqueeze(0) * m_out).reshape(k * n, *grad_output.shape[1:])
        dxs = native_conv2d_input((k * n, c, h, w), weight, dys, spec)
        return (dxs.reshape(k, n, c, h, w) * m_in).sum(0)
    dx = native_conv2d_input(input_size, weight, grad_output, spec)
    if plan.pn.numel():
        wg, g, cg, og = _grouped_views(spec, weight)
        dyp = grad_output[plan.pn, :, plan.ph, plan.pw]  # (P, O)
        p = dyp.shape[0]
        dp = torch.einsum("pgo,gocij->pijgc", dyp.reshape(p, g, og), wg)
        dx = plan.scatter_sub(dx.contiguous(), dp.reshape(p, *plan.cross.shape[1:], c))
    return dx


def _fast_conv2d_weight(x, weight_size, grad_output, spec, rin, rout):
    plan = _Plan(rin, rout, spec, tuple(x.shape[2:]), tuple(grad_output.shape[2:]))
    if plan.ids is not None:
        m_in, m_out = plan.masks(x.dtype)
        k, n = m_in.shape[:2]
        xs = (x.unsqueeze(0) * m_in).reshape(k * n, *x.shape[1:])
        dys = (grad_output.unsqueeze(0) * m_out).reshape(k * n, *grad_output.shape[1:])
        return native_conv2d_weight(xs, weight_size, dys, spec)
    dw = native_conv2d_weight(x, weight_size, grad_output, spec)
    if plan.pn.numel():
        g, cg, og = spec.groups, spec.in_per_group, spec.out_per_group
        xp = plan.boundary_patches(x)
        p, kh, kw, _ = xp.shape
        dyp = grad_output[plan.pn, :, plan.ph, plan.pw]
        corr = torch.einsum("pgo,pijgc->gocij", dyp.reshape(p, g, og),
                            xp.reshape(p, kh, kw, g, cg))
        dw -= corr.reshape(dw.shape)
    return dw


# ---------------------------------------------------------------- public
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, spec: ConvSpec, region_in,
           region_out, algorithm: str = "auto") -> torch.Tensor:
    """Region-restricted forward convolution.

    Args:
        x: (N, C, H, W) input in the compute dtype.
        weight: (O, C / groups, KH, KW) torch-layout weight, same dtype.
        bias: (O,) or None; added to every output position.
        spec: forward NCHW ``ConvSpec`` (zero padding).
        region_in: (N, H, W) integer ids of the input positions.
        region_out: (N, OH, OW) integer ids of the output positions.
        algorithm: "reference" (im2col with the equality mask) or "auto" / "native" /
            "fast" (native convolution plus boundary correction or stacked regions).

    Returns:
        (N, O, OH, OW) output.
    """
    mode = _check_algorithm(algorithm)
    n, _, h, w = spec.check_input(tuple(x.shape))
    spec.check_weight(tuple(weight.shape))
    out_hw = spec.output_size((h, w))
    rin, rout = check_regions(region_in, region_out, spec, n, (h, w), out_hw, x.device)
    if mode == "reference":
        y = _reference_conv2d(x, weight, spec, rin, rout, out_hw)
    else:
        y = _fast_conv2d(x, weight, spec, rin, rout, out_hw)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


def conv2d_input(input_size, weight: torch.Tensor, grad_output: torch.Tensor, spec: ConvSpec,
                 region_in, region_out, algorithm: str = "auto") -> torch.Tensor:
    """Gradient of the region-restricted convolution with respect to its input.

    Args:
        input_size: (N, C, H, W) of the input.
        weight: (O, C / groups, KH, KW) torch-layout weight.
        grad_output: (N, O, OH, OW) in the weight's dtype.
        spec, region_in, region_out, algorithm: as ``conv2d``.

    Returns:
        (N, C, H, W) input gradient.
    """
    mode = _check_algorithm(algorithm)
    input_size = tuple(int(s) for s in input_size)
    spec.check_weight(tuple(weight.shape))
    n, _, oh, ow = spec.check_grad_output(input_size, tuple(grad_output.shape))
    rin, rout = check_regions(region_in, region_out, spec, n, input_size[2:], (oh, ow),
                              grad_output.device)
    if mode == "reference":
        return _reference_conv2d_input(input_size, weight, grad_output, spec, rin, rout)
    return _fast_conv2d_input(input_size, weight, grad_output, spec, rin, rout)


def conv2d_weight(x: torch.Tensor, weight_size, grad_output: torch.Tensor, spec: ConvSpec,
                  region_in, region_out, algorithm: str = "auto") -> torch.Tensor:
    """Gradient of the region-restricted convolution with respect to its weight.

    Args:
        x: (N, C, H, W) input in the compute dtype.
        weight_size: (O, C / groups, KH, KW).
        grad_output: (N, O, OH, OW), same dtype.
        spec, region_in, region_out, algorithm: as ``conv2d``.

    Returns:
        (O, C / groups, KH, KW) weight gradient.
    """
    mode = _check_algorithm(algorithm)
    weight_size = tuple(int(s) for s in weight_size)
    spec.check_weight(weight_size, "weight_size")
    n, _, oh, ow = spec.check_grad_output(tuple(x.shape), tuple(grad_output.shape))
    rin, rout = check_regions(region_in, region_out, spec, n, tuple(x.shape[2:]), (oh, ow),
                              x.device)
    if mode == "reference":
        return _reference_conv2d_weight(x, grad_output, spec, rin, rout)
    return _fast_conv2d_weight(x, weight_size, grad_output, spec, rin, rout)
