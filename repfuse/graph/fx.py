"""torch.fx front end: fuse every linear region of an ``nn.Module`` into one conv.

``fuse_module(model, example_inputs, ...) -> FuseResult`` (the implementation of
``repfuse.fuse``):

1. copy the module tree (tensors are shared with the input model and never written;
   the ones that survive fusion are cloned at the end), switch to eval mode;
2. trace every module with its submodules as leaves (``fx_trace``) and run the
   graphs once on the example inputs to learn every value's shape;
3. per module, bottom-up: classify nodes (``fx_ops``), find maximal regions
   (``fx_match``); a module whose whole forward is one region is a linear op of its
   caller, so a region spanning several modules is fused in the smallest module that
   contains it; each region is reduced (``region.reduce``) and written back
   (``fx_rewrite``); regions that cannot be fused exactly are left alone and split;
4. optionally prove every fused region and the whole model (``repfuse.proofs``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from repfuse.errors import InputError
from repfuse.graph.fx_fuser import FusedRegion, Fuser
from repfuse.graph.fx_trace import META, run_graphs, trace_all
from repfuse.report import FuseReport


@dataclass
class FuseResult:
    """``model``: the fused module (eval mode); ``report``: what was fused and proven."""

    model: nn.Module
    report: FuseReport


# ---------------------------------------------------------------------- copying
def _share_copy(model: nn.Module) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A copy of the module tree that shares the parameters of ``model`` (never written)
    and has its own buffers: running the copy may update buffers (``F.batch_norm`` with
    ``training=True``), which must not reach the input model."""
    tensors = {id(t): t for t in model.parameters()}
    memo = dict(tensors)
    return copy.deepcopy(model, memo), tensors


def _unshare(model: nn.Module, original: dict[int, torch.Tensor]) -> None:
    """Clone every tensor of ``model`` that still belongs to the input model (ties kept)."""
    clones: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or id(t) not in original:
                    continue
                if id(t) not in clones:
                    if isinstance(t, nn.Parameter):
                        clones[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad)
                    else:
                        clones[id(t)] = t.detach().clone()
                store[name] = clones[id(t)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InputError("example_inputs must be a tensor or a non-empty tuple of tensors, got "
                     f"{type(example_inputs).__name__}")


def _capture(node: fx.Node) -> bool:
    meta = node.meta.get(META)
    return meta is not None and len(meta[0]) == 4 and meta[1].is_floating_point \
        and any(u.op in ("call_module", "call_function", "call_method") for u in node.users)


# ---------------------------------------------------------------------- entry point
def fuse_module(model: nn.Module, example_inputs, *, verify: bool = True,
                inplace: bool = False, tol=None) -> FuseResult:
    """Fuse every linear region of ``model``; see ``repfuse.fuse``."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _args(example_inputs)
    report = FuseReport(params_before=_count(model))
    if any(m.training for m in model.modules()):
        report.notes.append("the model was in training mode: its eval-mode (inference) "
                            "function was fused; the returned model is in eval mode")
    if inplace:
        work, original = model, {}
    else:
        work, original = _share_copy(model)
    work.eval()
    graphs, opaque = trace_all(work, len(args))
    try:
        run_graphs(work, graphs, opaque, args, _capture if verify else None)
    except Exception as err:
        first = (str(err).splitlines() or [""])[0][:300]
        raise InputError(f"running the model on example_inputs failed ({type(err).__name__}: "
                         f"{first}); pass inputs the model accepts") from err
    fuser = Fuser(work, graphs, verify)
    for mg in [graphs[id(work)]] + [g for g in graphs.values() if g.calls]:
        fuser.rewrite(mg)
    fused = fuser.result()
    fused.eval()
    if original:
        _unshare(fused, original)
    for mg in opaque:
        report.notes.append(f"module {mg.path or '(root)'} ({type(mg.module).__name__}) is not "
                            f"symbolically traceable ({mg.reason}); its submodules were "
                            "searched separately")
    report.regions = fuser.reports
    report.params_after = _count(fused)
    if not report.fused:
        report.notes.append("no fusable linear regions found; the model is unchanged")
    if verify:
        _verify(report, fuser.fused, model, fused, args, tol)
    for r in fuser.fused:
        r.activation = None
    return FuseResult(fused, report)


def _verify(report: FuseReport, fused_regions: list[FusedRegion], model: nn.Module,
            fused: nn.Module, args: tuple, tol) -> None:
    from repfuse.proofs import prove_region, verify_models

    for f in fused_regions:
        proofs = prove_region(f.expr, f.affine, f.activation, tol=tol)
        f.report.proofs = proofs
        outs = [c for c in proofs.checks if c.name.startswith("output")] or proofs.checks
        if outs:
            f.report.max_abs_err = max(c.max_abs for c in outs)
            f.report.max_rel_err = max(c.max_rel for c in outs)
    try:
        report.model_checks = verify_models(model, fused, args, grads=True, tol=tol)
    except RuntimeError as err:  # e.g. the model's own in-place ops break its backward
        report.model_checks = verify_models(model, fused, args, grads=False, tol=tol)
        first = str(err).splitlines()[0][:200]
        report.model_checks.notes.append(f"input gradients not compared: the model's "
                                         f"backward fails ({first})")
    report.verified = True
