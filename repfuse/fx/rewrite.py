"""Writing fused regions back into a module's fx graph.

What is matched: a region (member nodes, one input, one output) of one module's
graph. What must hold: the fused ``AffineConv`` was proven or at least reduced
exactly. What it becomes: one ``call_module`` of the fused conv on the region
input, placed where the first member was (its parameter-free parts are graph ops
around it: a region that moves the channel axis is the layer, then the permute; a pooled
head the pool, then the layer; ``graph_parts``); the members, the asserts that read
their shapes and the parameter reads (and computations on parameters) that only fed
them are removed; so are no-op calls (``nn.Identity``, dropout in eval). The graph is
then installed into its module (``fx.install``), so nothing of the training form
remains in the hot path.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repfuse.algebra.modules import Permute
from repfuse.fx.match import Region, ignorable_nodes, is_assert
from repfuse.fx.values import PASS_MODULES, inplace_target


def unique_name(taken, base: str) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


#: parameter-free parts of a fused module the graph computes itself, around the layer
_GRAPH_PARTS = (Permute, nn.AdaptiveAvgPool2d, nn.Flatten)


def graph_parts(module: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """``(before, layer, after)``: a fused ``nn.Sequential``'s leading and trailing
    parameter-free parts the graph computes itself (the permute a region that moves the
    channel axis keeps, the global pool and flatten of a pooled head), and the module to
    install (the layer, or what is left of the Sequential: a pad module stays with its
    conv). The layer installed under the user's name (``head``) then computes what a
    layer of that name computes (a head reads pooled features)."""
    if not isinstance(module, nn.Sequential):
        return [], module, []
    parts = list(module)
    i, j = 0, len(parts)
    while i < j - 1 and isinstance(parts[i], _GRAPH_PARTS):
        i += 1
    while j - 1 > i and isinstance(parts[j - 1], _GRAPH_PARTS):
        j -= 1
    if (i, j) == (0, len(parts)):
        return [], module, []
    core = parts[i] if j - i == 1 else nn.Sequential(*parts[i:j])
    return parts[:i], core, parts[j:]


def _graph_op(graph: fx.Graph, part: nn.Module, x: fx.Node) -> fx.Node:
    """The graph node computing parameter-free ``part`` on ``x``."""
    if isinstance(part, Permute):
        return graph.call_method("permute", (x, part.dims))
    if isinstance(part, nn.AdaptiveAvgPool2d):
        return graph.call_function(F.adaptive_avg_pool2d, (x, part.output_size))
    if isinstance(part, nn.Flatten):
        return graph.call_method("flatten", (x, part.start_dim, part.end_dim))
    raise TypeError(f"no graph op for {type(part).__name__}")


def replace_region(graph: fx.Graph, region: Region, target: str, before=(),
                   after=()) -> fx.Node:
    """Replace ``region`` by ``call_module(target, region.input)``, with the
    parameter-free parts ``before`` and ``after`` it (``graph_parts``) as graph ops;
    returns the node giving the region's value."""
    ign = ignorable_nodes(graph)
    with graph.inserting_before(region.nodes[0]):
        x = region.input
        for part in before:
            x = _graph_op(graph, part, x)
        new = graph.call_module(target, (x,))
        for part in after:
            new = _graph_op(graph, part, new)
    new.meta.update(region.output.meta)
    region.output.replace_all_uses_with(new)
    members = set(region.nodes)
    tainted = []
    for n in graph.nodes:
        if n in ign and any(a in members or a in tainted for a in n.all_input_nodes):
            tainted.append(n)
    for n in reversed(tainted):
        graph.erase_node(n)
    for n in reversed(region.nodes):
        graph.erase_node(n)
    return new


def drop_noops(graph: fx.Graph, module: nn.Module) -> None:
    """Remove calls of no-op modules (identity, dropout in eval)."""
    for n in list(graph.nodes):
        if n.op == "call_module" and len(n.args) == 1 and not n.kwargs \
                and isinstance(n.args[0], fx.Node):
            try:
                m = module.get_submodule(n.target)
            except AttributeError:
                continue
            if type(m) in PASS_MODULES:
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)


def _on_parameters(graph: fx.Graph, module: nn.Module) -> set[fx.Node]:
    """Parameter reads and the computations on them alone (no activation, no literal-only
    call, no in-place write)."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "get_attr" or (
                n.op in ("call_function", "call_method") and n.all_input_nodes
                and all(a in out for a in n.all_input_nodes)
                and inplace_target(n, module) is None):
            out.add(n)
    return out


def drop_dead(graph: fx.Graph, module: nn.Module) -> None:
    """Remove parameter reads, computations on parameters alone and pure shape reads that
    nothing uses any more."""
    changed = True
    while changed:
        changed = False
        ign = ignorable_nodes(graph)
        params = _on_parameters(graph, module)
        for n in reversed(list(graph.nodes)):
            if n.users or n.op in ("output", "placeholder"):
                continue
            if n in params or (n in ign and not is_assert(n)):
                graph.erase_node(n)
                changed = True
