"""Accounting for every convolution and normalization layer of a model (fx front end).

``inventory(model)`` lists the conv and norm modules by path before fusion;
``account(layers, found, reports)`` gives each one an outcome (``report.LayerStatus``):

* ``fused``: part of a fused region;
* ``left alone``: part of a region that was not fused (the region's reason), or a norm no
  region could hold (a lone batch norm between nonlinear ops, a batch norm whose output
  several ops read when one of them cannot absorb a copy of it (``fx.readers``), a norm
  that normalizes with its input's own statistics);
* ``unchanged``: a conv with nothing linear next to it to fold (already its inference form);
* ``not reached``: not called on the example inputs, called from code that could not be
  traced (the reason names the module and why), or inside a module that ran its own code
  because it was called with arguments its trace does not take.

``count(model, found)`` gives the whole-model numbers of convs and norms: modules, plus
the functional ``F.conv2d`` / ``F.batch_norm`` calls in the traced graphs of modules the
model still holds.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from repfuse import region as rg
from repfuse.fx.reach import TORCH_LAYER, Reach
from repfuse.report import LayerReport, LayerStatus, RegionReport, RegionStatus

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm) \
    + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def layer_kind(m: nn.Module) -> str | None:
    """"conv", "norm" or None (a batch norm by another library, such as torchvision's
    ``FrozenBatchNorm2d``, is recognised by its class name)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, _NORMS) or "BatchNorm" in type(m).__name__:
        return "norm"
    return None


def inventory(model: nn.Module) -> dict[str, nn.Module]:
    """path -> module, for every conv and norm module."""
    return {path: m for path, m in model.named_modules() if layer_kind(m)}


def expression_layers(expr: rg.Node) -> list[str]:
    """The names (module paths) of the convs, norms and per-channel constants a region
    expression holds."""
    kinds = (rg.Conv, rg.BatchNorm, rg.Scale, rg.Shift)
    return sorted({n.name for n in rg.walk(expr) if isinstance(n, kinds) and n.name})


def _not_reached(m: nn.Module, found: Reach) -> str:
    if id(m) not in found.ran:
        return "not called when the model runs on the example inputs"
    caller = found.from_python.get(id(m))
    if caller is not None and caller.graph is None:
        where = f"inside {caller.path or 'the model'} ({type(caller.module).__name__})"
        if caller.reason == TORCH_LAYER:
            return f"{where}, {TORCH_LAYER}"
        return f"{where}: not traceable: {caller.reason}"
    sites = found.sites.get(id(m), set())
    for unit in found.units.values():
        if unit.graph is None or not any(n.graph is unit.graph for n in sites):
            continue
        if id(unit.module) in found.unplain:
            return (f"inside {unit.path or 'the model'} ({type(unit.module).__name__}), which "
                    "is called with arguments its traced forward does not take")
        if id(unit.module) in found.changed_args:
            return (f"inside {unit.path or 'the model'} ({type(unit.module).__name__}), which "
                    f"hands {found.changed_args[id(unit.module)]} a list or dict that it "
                    "changes (its traced forward may not see the change)")
    return ""


#: Ops that only change the layout of a value (followed from a norm to its readers).
_LAYOUT_OPS = frozenset({"reshape", "view", "transpose", "permute", "flatten", "contiguous",
                         "unflatten", "movedim"})


def _name(n) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def _readers(m: nn.Module, found: Reach) -> list[str]:
    """The layers that read the output of norm ``m`` when there are several (through
    layout ops, and into the forward of the child module that reads it), else []."""
    for site in found.sites.get(id(m), ()):
        unit = next((u for u in found.units.values() if u.graph is site.graph), None)
        node = site
        while len(node.users) == 1 and _name(next(iter(node.users))) in _LAYOUT_OPS:
            node = next(iter(node.users))
        users = [u for u in node.users if _name(u) not in ("getattr", "size", "dim")]
        base = unit.path if unit is not None else ""
        if len(users) == 1 and users[0].op == "call_module" and unit is not None:
            child = found.units.get(id(unit.module.get_submodule(users[0].target)))
            inputs = [] if child is None or child.graph is None else \
                [n for n in child.graph.nodes if n.op == "placeholder"][:1]
            if inputs:
                base = child.path
                users = [u for u in inputs[0].users
                         if _name(u) not in ("getattr", "size", "dim")]
        if len(users) > 1:
            return [f"{base}.{u.target}" if u.op == "call_module" and base else
                    str(u.target if u.op == "call_module" else u.name) for u in users]
    return []


def _unchanged(m: nn.Module, found: Reach | None = None) -> tuple[LayerStatus, str]:
    if layer_kind(m) == "conv":
        return LayerStatus.UNCHANGED, "nothing linear next to it to fold into it"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
        return LayerStatus.LEFT_ALONE, "normalizes with batch statistics (no running statistics)"
    readers = _readers(m, found) if found is not None and "BatchNorm" in type(m).__name__ \
        else []
    if readers:
        return LayerStatus.LEFT_ALONE, (
            f"its output is read by {len(readers)} ops ({', '.join(readers[:4])}): folding it "
            "would need one copy per reader, which repfuse makes only when every reader "
            "absorbs its copy (a linear layer, or a conv without padding, after layout ops and "
            "average pools without padding)")
    if "BatchNorm" in type(m).__name__:
        return LayerStatus.LEFT_ALONE, ("a lone batch norm between nonlinear ops: no conv next "
                                        "to it to fold into")
    return LayerStatus.LEFT_ALONE, "not linear: normalizes with its input's own statistics"


def account(layers: dict[str, nn.Module], found: Reach,
            reports: list[RegionReport]) -> list[LayerReport]:
    """One ``LayerReport`` per layer of ``layers`` (see the module docstring)."""
    fused = {p for r in reports if r.status is RegionStatus.FUSED for p in r.layers}
    refused: dict[str, str] = {}
    for r in reports:
        if r.status is not RegionStatus.FUSED:
            for p in r.layers:
                refused.setdefault(p, r.reason)
    out = []
    for path, m in layers.items():
        if path in fused:
            status, reason = LayerStatus.FUSED, ""
        elif path in refused:
            status, reason = LayerStatus.LEFT_ALONE, refused[path]
        else:
            reason = _not_reached(m, found)
            status = LayerStatus.NOT_REACHED
            if not reason:
                status, reason = _unchanged(m, found)
        out.append(LayerReport(path, layer_kind(m), type(m).__name__, status, reason))
    return out


def count(model: nn.Module, found: Reach) -> tuple[int, int]:
    """(convs, norms) of ``model``: its conv and norm modules, plus the functional ones in
    the traced graphs of its modules that ran."""
    modules = {id(m): m for m in model.modules()}
    convs = sum(layer_kind(m) == "conv" for m in modules.values())
    norms = sum(layer_kind(m) == "norm" for m in modules.values())
    for unit in found.units.values():
        if unit.graph is None or id(unit.module) not in found.ran or \
                id(unit.module) not in modules:
            continue
        for n in unit.graph.nodes:
            if n.op == "call_function":
                convs += n.target is F.conv2d
                norms += n.target is F.batch_norm
    return convs, norms
