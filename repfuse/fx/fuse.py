"""torch.fx front end: fuse every linear region of an ``nn.Module`` into one conv.

``fuse_module(model, example_inputs, ...) -> FuseResult`` (the implementation of
``repfuse.fuse``):

1. copy the module tree (tensors are shared with the input model and never written;
   the ones that survive fusion are cloned at the end; a cache holding a tensor with
   autograd history is copied detached: ``repfuse.pristine``), switch to eval mode;
2. run the model once on the example inputs (``fx.reach``): every module it calls is
   traced with its submodules as leaves (``fx.trace``) and runs through its graph, which
   records every value's shape (the plain attributes of the modules, caches included,
   are put back as they were afterwards); a module that cannot be traced runs its own Python on
   real values and the modules it calls are reached the same way;
3. per module, bottom-up: classify nodes (``fx.ops``), find maximal regions
   (``fx.match``); a module whose whole forward is one region is a linear op of its
   caller, so a region spanning several modules is fused in the smallest module that
   contains it; each region is reduced (``region.reduce``) and written back into its
   module, which keeps its class (``fx.rewrite``, ``fx.install``); regions that cannot
   be fused exactly are left alone and split;
4. account for every conv and norm layer (``fx.account``) and, with ``verify``, capture
   each region's real input activation, so that the layer above
   (``repfuse.fx.pipeline``) can prove every region (its ``check``, before the region's
   rewrite is kept) and the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from repfuse.errors import InputError, first_line
from repfuse.fx.account import account, count, inventory
from repfuse.fx.fuser import Fuser, Reducer, RegionCheck
from repfuse.fx.reach import Reach, reach
from repfuse.fx.trace import META
from repfuse.pristine import copy_model, untouched
from repfuse.region.op import is_region_value
from repfuse.region.patterns import kept_note
from repfuse.report import FuseReport


@dataclass
class FuseResult:
    """``model``: the fused module (eval mode); ``report``: what was fused and proven."""

    model: nn.Module
    report: FuseReport
    #: (module path in ``model``, region expression) of every fused layer: what it
    #: computes, for the whole-model check (no kernels are kept; emptied after it)
    kernels: list = field(default_factory=list)


# ---------------------------------------------------------------------- copying
def _share_copy(model: nn.Module) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A copy of the module tree that shares the parameters of ``model`` (never written)
    and has its own buffers: running the copy may update buffers (``F.batch_norm`` with
    ``training=True``), which must not reach the input model."""
    tensors = {id(t): t for t in model.parameters()}
    return copy_model(model, dict(tensors)), tensors


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
    return meta is not None and is_region_value(*meta) \
        and any(u.op in ("call_module", "call_function", "call_method") for u in node.users)


def _run(work: nn.Module, args: tuple, capture) -> Reach:
    """``reach`` on the example inputs; a failure the model also shows without repfuse
    is the inputs' (``InputError``), any other is a defect of repfuse."""
    try:
        return reach(work, args, capture)
    except Exception as err:
        first = first_line(err, 300)
        try:
            with torch.no_grad():
                work(*args)
        except Exception:  # noqa: BLE001 - the model itself fails on these inputs
            raise InputError(f"running the model on example_inputs failed "
                             f"({type(err).__name__}: {first}); pass inputs the model "
                             "accepts") from err
        raise RuntimeError(f"repfuse could not run the model through its traced graphs "
                           f"({type(err).__name__}: {first}); the model itself runs on these "
                           "inputs: this is a repfuse defect, please report it") from err


# ---------------------------------------------------------------------- entry point
def fuse_module(model: nn.Module, example_inputs, *, verify: bool = True,
                inplace: bool = False, check: RegionCheck | None = None,
                reducer: Reducer | None = None) -> FuseResult:
    """Fuse every linear region of ``model`` (see ``repfuse.fuse``); with ``verify`` the
    regions' input activations are captured for the proofs, which run a layer above:
    ``check(expression, AffineConv, activation)`` is each region's proof, run before its
    rewrite is kept (a region whose proof fails stays in its training form); ``reducer``
    (``fx.fuser.Reducer``), when given, computes the regions' kernels in a way the check
    reuses."""
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
    layers = inventory(work)
    with untouched(work):   # the run fills no cache and sets no attribute for good
        found = _run(work, args, _capture if verify else None)
    before = count(work, found)
    fuser = Fuser(work, found, verify, check, reducer)
    for unit in found.entries:
        fuser.rewrite(unit)
    found.drop_captures()
    fused = work
    fused.eval()
    if original:
        _unshare(fused, original)
    report.regions = fuser.reports
    report.search = dict(fuser.search)
    if kept_note(fuser.kept):
        report.notes.append(kept_note(fuser.kept))
    report.layers = account(layers, found, fuser.reports)
    after = count(fused, found)
    report.convs, report.norms = (before[0], after[0]), (before[1], after[1])
    report.params_after = _count(fused)
    opaque = found.opaque
    if opaque:
        names = ", ".join(f"{u.path or '(root)'} ({type(u.module).__name__})" for u in opaque[:4])
        more = f" and {len(opaque) - 4} more" if len(opaque) > 4 else ""
        report.notes.append(f"{len(opaque)} module(s) are not symbolically traceable ({names}"
                            f"{more}; first: {opaque[0].reason}): they run their own code and "
                            "the modules they call were fused on their own")
    if not report.fused:
        report.notes.append("no fusable linear regions found; the model is unchanged")
    return FuseResult(fused, report, fuser.kernels)
