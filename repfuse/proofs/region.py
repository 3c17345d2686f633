"""Per-region proofs: a fused ``AffineConv`` against the training form of its region.

``prove_region(expr, fused, example_activation=None, *, tol=None, module=False)``
checks, in float64 and with the ``repfuse.core`` kernels for the fused side, on a
random probe (seeded, one sample covering the wider of the training form's and the fused
kernel's window plus one step, so every tap of either form reads real values and the
border and padding cases are hit: ``probe_shape``) and, when given, on the real
activation at the region's input (its first sample's top-left window of the same
size):

1. ``output[random]``, ``output[activation]``: the fused convolution (``core.conv2d``)
   equals the training-form region (``region.reference.evaluate``, torch ops).
2. ``grad input``: ``core.conv2d_input`` of the fused kernel equals the sum of the
   branches' adjoints (autograd through ``region.reference.evaluate``) for a random upstream
   gradient, on the random probe (the region is affine: its gradients do not depend
   on the input values, and a real activation may have dead channels that would hide
   a wrong weight).
3. ``grad <param>``: for every parameter of the region (``region.parameters``: conv
   weights and biases, BN gamma/beta, tensor scales), the re-parameterization map's
   adjoint (the vector-Jacobian product of ``region.reduce``, by autograd) applied to
   the fused kernel's gradient (``core.conv2d_weight``; for the bias, the sum of the
   upstream gradient) equals torch autograd on the training form.

A transposed fused kernel is run with ``core.conv_transpose2d``,
``core.conv_transpose2d_input`` and ``core.conv_transpose2d_weight`` instead. Probes live
on the canonical (N, C, H, W) view of the region's values (``region.layout``); the
training form receives them in the model's layout (tokens (N, L, C), sequences (N, C, L),
vectors (N, C)) and its output is viewed canonically again, so a front end that read a
layout wrongly fails here.

With ``module=True`` also ``module output[...]``: the module the model receives
(``fused.to_module()``) run in the target dtype, with that dtype's tolerance.

The model's tensors are never touched: the proofs run on float64 copies substituted
into a copy of the expression. The region is affine, so the probe's size, not the real
activation's, is what coverage needs; the real values add realistic magnitudes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from repfuse import core
from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.proofs.compare import SEED, compare, draw, failed, tolerance
from repfuse.proofs.modes import in_differentiable_mode
from repfuse.region import layout as L
from repfuse.report import VerifyReport


# ----------------------------------------------------------------- expression trees
def float64_leaves(expr: rg.Node, memory_format=torch.contiguous_format
                   ) -> tuple[rg.Node, dict[str, Tensor]]:
    """A float64 copy of ``expr`` whose named parameters (``region.parameters``) are
    fresh leaves requiring grad, 4-D ones in ``memory_format``; returns (copy,
    {name: leaf})."""
    named = rg.parameters(expr)
    mapping: dict[int, Tensor] = {}
    leaves: dict[str, Tensor] = {}
    for name, t in named.items():
        if not t.is_floating_point():
            continue
        if id(t) in mapping:
            continue
        leaf = _float64(t, memory_format).requires_grad_(True)
        mapping[id(t)] = leaf
        leaves[name] = leaf
    for t in rg.node_tensors(expr):
        if id(t) not in mapping and t.is_floating_point():
            mapping[id(t)] = t.detach().to(torch.float64)
    return rg.substitute(expr, mapping), leaves


def _float64(t: Tensor, memory_format=torch.contiguous_format, copy: bool = True) -> Tensor:
    """``t`` in float64, in ``memory_format`` if it is 4-D: a copy, or with ``copy=False``
    ``t`` itself (detached) where it is float64 in that format already."""
    if t.dim() != 4:
        memory_format = torch.contiguous_format
    return t.detach().to(torch.float64, copy=copy, memory_format=memory_format)


def proof_memory_format(spec: ConvSpec, layout: str) -> torch.memory_format:
    """The memory format a proof runs in: channels-last for a dense or grouped 2-D conv on
    (N, C, H, W) values, where torch's float64 CPU convolutions on probe-sized inputs run
    two to three times faster than contiguous ones (768 channels, 3x3, a 4x5 probe:
    forward 15 against 39 ms, both gradients 31 against 79 ms); contiguous otherwise
    (depthwise ones run two to ten times slower channels-last; other layouts, transposed
    kernels)."""
    if layout == "NCHW" and not spec.transposed and not spec.is_depthwise:
        return torch.channels_last
    return torch.contiguous_format


class _Reduction(NamedTuple):
    """A region's reduction on float64 leaves, carried by the kernel the fuser keeps."""

    expr64: rg.Node
    leaves: dict[str, Tensor]
    full: object            # the AffineConv whose tensors autograd links to ``leaves``
    memory_format: torch.memory_format


@in_differentiable_mode
def reduce_for_proof(expr: rg.Node, shapes):
    """``region.reduce(expr)`` made once for the fuser and the region's proof
    (``fx.fuser.Reducer``): on float64 leaves (``float64_leaves``, in the memory format the
    proof runs in for the fused spec of ``shapes``, the shape-only reduction), with grad,
    so that the proof's adjoint differentiates this reduction instead of making its own.
    Returns the kernel with detached tensors and the dtype ``reduce`` gives; its
    ``carried`` holds the differentiable reduction until ``prove_region`` takes it. The
    values are those of ``reduce(expr)``: every step of a reduction is in float64, and the
    leaves are exact float64 copies. A region its values refuse raises what
    ``reduce(expr)`` raises (naming ``expr``'s nodes, as a front end's cuts need). Without
    ``shapes`` (only for a ``region.direct`` part, reduced at once: one conv, or branches
    summed whose convs share the input, the group count and so whether they are
    depthwise, which is all the format depends on besides the layout), the memory format
    is its first conv's and the dtype the region's (``region.dtype_device``, what
    ``reduce`` gives such a part); the proof re-makes leaves it finds in another format."""
    if shapes is not None:
        spec, dtype = shapes.spec, shapes.dtype
    else:
        spec = next((n.spec for n in rg.walk(expr)
                     if n.kind is rg.OpKind.CONV and hasattr(n, "spec")), None)
        dtype = rg.dtype_device(expr)[0]
    fmt = torch.contiguous_format if spec is None else \
        proof_memory_format(spec, rg.region_input(expr).layout)
    expr64, leaves = float64_leaves(expr, fmt)
    try:
        full = rg.reduce(expr64)
    except Exception:  # noqa: BLE001 - refused: the same reduction on expr says why
        with torch.no_grad():
            return rg.reduce(expr)
    affine = full.replace(weight=full.weight.detach(), dtype=dtype,
                          bias=None if full.bias is None else full.bias.detach())
    affine.carried = _Reduction(expr64, leaves, full, fmt)
    return affine


# ----------------------------------------------------------------- fused side (core)
def _padded(x: Tensor, spec: ConvSpec) -> tuple[Tensor, tuple]:
    """Input and the padding argument for the core kernels; non-zero padding modes
    are applied here with ``F.pad`` (differentiably) and the kernel gets padding 0."""
    if spec.padding_mode == "zeros":
        return x, spec.padding
    t, b, l, r = spec.padding
    return F.pad(x, (l, r, t, b), mode=spec.padding_mode), (0, 0, 0, 0)


def _transposed_geometry(spec: ConvSpec) -> tuple:
    """(stride, padding, output_padding, groups, dilation) for the transposed kernels."""
    return spec.stride, spec.padding, spec.output_padding, spec.groups, spec.dilation


def fused_forward(x: Tensor, weight: Tensor, bias: Tensor, spec: ConvSpec) -> Tensor:
    """The fused convolution with ``core.conv2d`` (``core.conv_transpose2d``)."""
    if spec.transposed:
        return core.conv_transpose2d(x, weight, bias, *_transposed_geometry(spec))
    xp, pad = _padded(x, spec)
    return core.conv2d(xp, weight, bias, spec.stride, pad, spec.dilation, spec.groups)


def fused_input_grad(x: Tensor, weight: Tensor, grad_out: Tensor, spec: ConvSpec) -> Tensor:
    """Gradient w.r.t. the input of the fused convolution with ``core.conv2d_input``
    (``core.conv_transpose2d_input``)."""
    if spec.transposed:
        return core.conv_transpose2d_input(tuple(x.shape), weight, grad_out,
                                           *_transposed_geometry(spec))
    if spec.padding_mode == "zeros":
        return core.conv2d_input(tuple(x.shape), weight, grad_out, spec.stride, spec.padding,
                                 spec.dilation, spec.groups)
    xl = x.detach().requires_grad_(True)
    xp, pad = _padded(xl, spec)
    gp = core.conv2d_input(tuple(xp.shape), weight, grad_out, spec.stride, pad, spec.dilation,
                           spec.groups)
    (g,) = torch.autograd.grad(xp, xl, gp)
    return g


def fused_weight_grad(x: Tensor, weight_shape, grad_out: Tensor,
                      spec: ConvSpec) -> tuple[Tensor, Tensor]:
    """Gradients of the fused weight (``core.conv2d_weight``;
    ``core.conv_transpose2d_weight``) and bias (sum of grad_out)."""
    if spec.transposed:
        gw = core.conv_transpose2d_weight(x.detach(), tuple(weight_shape), grad_out,
                                          *_transposed_geometry(spec))
        return gw, grad_out.sum(dim=(0, 2, 3))
    xp, pad = _padded(x.detach(), spec)
    gw = core.conv2d_weight(xp, tuple(weight_shape), grad_out, spec.stride, pad,
                            spec.dilation, spec.groups)
    return gw, grad_out.sum(dim=(0, 2, 3))


# ----------------------------------------------------------------- probes
def probe_shape(spec: ConvSpec, layout: str = "NCHW",
                expr: rg.Node | None = None) -> tuple[int, int, int, int]:
    """(N, C, H, W) of the random probe on the canonical view (``region.layout.probe_size``):
    sized from the wider of the training form's window (``region.read_window`` of ``expr``)
    and the fused kernel's, so a tap the fused kernel lacks or adds is read on real values;
    twice the fused kernel's extent where the window is not known (a transposed conv, or
    no ``expr``). A depthwise kernel gets twice the wider extent, as before the window
    sized probes: on probes of extent plus one, torch's float64 CPU convolution with one
    channel per group at times materialises the unfolded windows of every channel at once
    (2048 channels, 31x31, a 32x33 probe: 16 GB and 21 s for one forward, against 0.2-0.9
    GB on a 62x63 probe; measured, not documented by torch), while a dense kernel's
    float64 convolution costs about the same on either probe."""
    window = None if expr is None or spec.transposed else rg.read_window(expr)
    if window is None:
        n, h, w = L.probe_size(layout, spec.effective_kernel)
    else:
        extent = tuple(max(a, b) for a, b in zip(window[0], spec.effective_kernel))
        jump = tuple(max(a, b) for a, b in zip(window[1], spec.stride))
        n, h, w = L.probe_size(layout, extent, None if spec.is_depthwise else jump)
    return (n, spec.in_channels, h, w)


def _activation_window(act: Tensor, x: Tensor, layout: str) -> Tensor:
    """The real activation's first sample, its top-left window of the probe's size, on a
    copy of the random probe where the activation is smaller."""
    a = L.to_canonical(act.detach(), layout) if act.dim() == L.rank(layout) else act.detach()
    a = a[0] if a.dim() == 4 else a
    out = x.clone()
    h, w = min(a.shape[-2], x.shape[-2]), min(a.shape[-1], x.shape[-1])
    out[0, :, :h, :w] = a[:, :h, :w].to(x)
    return out


def _merger(layout: str, reads: str, gives: str, pooled: bool = False):
    """The map from the probe (canonical view of a region input in ``layout``) to the fused
    kernel's input: the identity (also where the region moves the channel axis: the
    canonical views agree), the mean over positions where the kernel says it pools
    first, or merging the positions of tokens into the batch where it says it reads
    ``reads`` values and gives ``gives`` ones (``input_layout``, ``value_layout``)."""
    if pooled:
        return lambda t: t.mean((2, 3), keepdim=True)
    if not reads or reads == gives or (reads, gives) in L.MOVES:
        return lambda t: t      # (a move of the channel axis is the identity on the view)
    return lambda t: L.to_canonical(L.from_canonical(t, layout).flatten(0, -2), gives)


@in_differentiable_mode
def prove_region(expr: rg.Node, fused, example_activation: Tensor | None = None, *,
                 tol=None, module: bool = False) -> VerifyReport:
    """Prove that ``fused`` (an ``AffineConv``) computes region ``expr``.

    Args:
        expr: the region expression (``repfuse.region``), live model tensors.
        fused: its ``AffineConv`` (what the model will receive).
        example_activation: the tensor flowing into the region on the example inputs
            ((N, C, H, W) or (C, H, W)), or None.
        tol: as in ``repfuse.proofs.tolerance``; default: the float64 table entry.
        module: also check ``fused.to_module()`` run in the target dtype
            (``module output[...]``, tolerance of that dtype).

    Returns a ``VerifyReport`` (dtype "float64") with the checks of the module
    docstring: ``output[random]``, ``output[activation]`` (when an activation is
    given), ``grad input``, ``grad <param>`` for every ``region.parameters`` entry. It
    never raises for a wrong fusion, only reports it; neither ``expr``'s tensors nor
    ``fused`` are modified (but for its ``carried`` reduction, taken). The caller's grad
    mode does not matter: the proof runs on its own float64 copies, outside inference
    mode, with grad enabled. When ``fused`` carries its reduction (``reduce_for_proof``,
    in the memory format the proof runs in), its float64 leaves are the proof's copies and
    the adjoint differentiates that reduction; otherwise the proof makes both.

    Cost (one sample the size of ``probe_shape``): a forward and a backward of the
    training form and a forward / input gradient / weight gradient of the fused kernel
    with the core; on the activation's window a forward of each (separately and without
    autograd: stacking the two samples into one batch measured slower); the reduction's
    adjoint (and, without a carried one, the float64 reduction itself).
    """
    t64 = tolerance(torch.float64, tol)
    report = VerifyReport(dtype="float64")
    spec: ConvSpec = fused.spec
    layout = rg.region_input(expr).layout
    fmt = proof_memory_format(spec, layout)
    # no copy where the fused kernel is float64 in ``fmt`` already (nothing writes to it)
    weight = _float64(fused.weight, fmt, copy=False)
    bias = fused.bias.detach().to(torch.float64) if fused.bias is not None \
        else torch.zeros(spec.out_channels, dtype=torch.float64, device=weight.device)
    gen = torch.Generator().manual_seed(SEED)
    reduced = getattr(fused, "carried", None)
    if reduced is not None:
        fused.carried = None        # taken: its graph is freed by the adjoint below
    if isinstance(reduced, _Reduction) and (reduced.memory_format == fmt or all(
            t.dim() != 4 for t in reduced.leaves.values())):   # (a format is of 4-D leaves)
        expr64, leaves = reduced.expr64, reduced.leaves    # the fuser's reduction (same values)
    else:
        reduced = None
        expr64, leaves = float64_leaves(expr, fmt)
    try:
        out_layout = rg.value_layouts(expr)[id(expr)]
    except Exception as e:  # noqa: BLE001 - a layout the nodes do not agree on: not proven
        report.checks.append(failed("output[random]", f"{type(e).__name__}: {e}", t64))
        return report
    merge = _merger(layout, getattr(fused, "input_layout", ""), fused.value_layout,
                    getattr(fused, "pooled", False))
    x = draw(probe_shape(spec, layout, expr), gen, memory_format=fmt).to(weight.device)
    probes = {"random": x}
    if example_activation is not None:
        probes["activation"] = _activation_window(example_activation, x, layout)
    xin = x.clone().requires_grad_(True)
    refs = {}
    for name, p in probes.items():
        try:
            with torch.set_grad_enabled(name == "random"):
                value = L.from_canonical(xin if name == "random" else p, layout)
                refs[name] = y_ref = L.to_canonical(rg.evaluate(expr64, value), out_layout)
            y_fused = fused_forward(merge(p), weight, bias, spec)
        except Exception as e:  # a geometry mismatch is a failed proof, not a crash
            report.checks.append(failed(f"output[{name}]", f"{type(e).__name__}: {e}", t64))
            return report
        report.checks.append(compare(f"output[{name}]", y_ref, y_fused, t64))
        if module:
            report.checks.append(_module_check(name, fused, p, layout, out_layout, y_ref, tol))
    if not report.ok and any(c.name.startswith("output") and c.max_abs == float("inf")
                             for c in report.checks):
        return report       # shapes differ: gradients cannot be compared
    y_ref = refs["random"]
    del refs
    grad_out = draw(y_ref.shape, gen, memory_format=fmt if y_ref.dim() == 4
                    else torch.contiguous_format).to(x.device)
    xl = x.detach().requires_grad_(True)
    xf = merge(xl)
    gx_fused = fused_input_grad(xf.detach(), weight, grad_out, spec)
    if xf is not xl:   # the adjoint of merging positions into the batch
        (gx_fused,) = torch.autograd.grad(xf, xl, gx_fused)
    shape = weight.shape
    del weight          # a float64 copy of the kernel, where one was made, is freed first
    # the mapping's adjoint first: its float64 intermediates (the size of the fused kernel)
    # are freed before the training form's parameter gradients exist (peak memory)
    adjoint = _adjoint(expr64, leaves, xf.detach(), grad_out, spec, shape, t64,
                       None if reduced is None else reduced.full)
    del reduced
    grads = list(torch.autograd.grad(y_ref, [xin] + list(leaves.values()), grad_out,
                                     allow_unused=True))
    del y_ref
    gx_ref = grads.pop(0)
    gx_ref = gx_ref if gx_ref is not None else torch.zeros_like(x)
    report.checks.append(compare("grad input", gx_ref, gx_fused, t64))
    del gx_ref, gx_fused
    if isinstance(adjoint, list):
        report.checks += adjoint
        return report
    for name, leaf in leaves.items():   # one parameter at a time, each freed once compared
        ga, gt = adjoint.pop(name), grads.pop(0)
        ga = torch.zeros_like(leaf) if ga is None else ga
        gt = torch.zeros_like(leaf) if gt is None else gt
        report.checks.append(compare(f"grad {name}", gt, ga, t64))
        del ga, gt
    return report


def _module_check(name: str, fused, probe: Tensor, layout: str, out_layout: str,
                  y_ref: Tensor, tol):
    """``module output[name]``: ``fused.to_module()`` run in the target dtype on the probe
    in the region input's layout, its output read in the region output's layout (a module
    that fails to run on it fails the check)."""
    target = fused.dtype if fused.dtype is not None else torch.float32
    try:
        with torch.no_grad():
            y_mod = fused.to_module()(L.from_canonical(probe.to(target), layout))
            y_mod = L.to_canonical(y_mod, out_layout)
    except Exception as e:  # noqa: BLE001 - a module that does not run is not proven
        return failed(f"module output[{name}]", f"{type(e).__name__}: {e}",
                      tolerance(target, tol))
    return compare(f"module output[{name}]", y_ref, y_mod, None if tol is None else tol)


def _adjoint(expr64, leaves, x, grad_out, spec, weight_shape, t64,
             reduced=None) -> dict | list:
    """Checks 3, the fused side: the adjoint of the re-parameterization map applied to the
    fused kernel's gradient (core.conv2d_weight, sum of grad_out), ``{name: gradient or
    None}``; or the list of failed checks when the map does not reach the parameters.
    ``reduced``: the map already applied to ``leaves`` (``reduce_for_proof``), else it is
    applied here (``region.reduce(expr64)``)."""
    if not leaves:
        return {}
    gw, gb = fused_weight_grad(x, weight_shape, grad_out, spec)
    fused64 = reduced if reduced is not None else rg.reduce(expr64)
    del reduced
    if tuple(fused64.weight.shape) != tuple(gw.shape):
        return [failed("grad parameters", f"the region reduces to a kernel of shape "
                       f"{tuple(fused64.weight.shape)}, the fused one has "
                       f"{tuple(gw.shape)}", t64)]
    outs = [(fused64.weight, gw)]
    if fused64.bias is not None:
        outs.append((fused64.bias, gb))
    outs = [(o, g) for o, g in outs if o.requires_grad]
    del fused64, gw, gb
    if not outs:
        return [failed("grad parameters", "the fused kernel does not depend on the region's "
                       "parameters through autograd", t64)]
    found = torch.autograd.grad([o for o, _ in outs], list(leaves.values()),
                                [g for _, g in outs], allow_unused=True)
    return dict(zip(leaves, found))


def worst(report: VerifyReport, prefix: str = "output") -> tuple[float, float]:
    """(max abs, max relative) error over the checks whose name starts with ``prefix``."""
    sel = [c for c in report.checks if c.name.startswith(prefix)]
    if not sel:
        return 0.0, 0.0
    return max(c.max_abs for c in sel), max(c.max_rel for c in sel)
