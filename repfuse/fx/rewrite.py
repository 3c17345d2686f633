"""Writing fused regions back into a module's fx graph.

What is matched: a region (member nodes, one input, one output) of one module's
graph. What must hold: the fused ``AffineConv`` was proven or at least reduced
exactly. What it becomes: one ``call_module`` of the fused conv on the region
input, placed where the first member was; the members, the asserts that read
their shapes and the parameter reads that only fed them are removed; so are
no-op calls (``nn.Identity``, dropout in eval). The module becomes a
``GraphModule`` with the original class name, holding only the submodules its
graph still calls, so nothing of the training form remains in the hot path.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from repfuse.fx.match import Region, ignorable_nodes, is_assert, real_users
from repfuse.fx.values import PASS_MODULES

_VIEWS = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "contiguous")


def unique_name(taken, base: str) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


def replace_region(graph: fx.Graph, region: Region, target: str) -> fx.Node:
    """Replace ``region`` by ``call_module(target, region.input)``; returns the new node."""
    ign = ignorable_nodes(graph)
    with graph.inserting_before(region.nodes[0]):
        new = graph.call_module(target, (region.input,))
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


def drop_dead(graph: fx.Graph) -> None:
    """Remove parameter reads and pure shape reads that nothing uses any more."""
    changed = True
    while changed:
        changed = False
        ign = ignorable_nodes(graph)
        for n in reversed(list(graph.nodes)):
            if n.users or n.op in ("output", "placeholder"):
                continue
            view_of_attr = n.op == "call_method" and n.target in _VIEWS and n.args \
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"
            if n.op == "get_attr" or view_of_attr or (n in ign and not is_assert(n)):
                graph.erase_node(n)
                changed = True


class NamedGraphModule(fx.GraphModule):
    """A GraphModule that keeps its class name (the fused module's) when deep-copied."""

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.__class__.__name__ = type(self).__name__
        return res


_HOOK_STORES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                "_backward_pre_hooks", "_is_full_backward_hook")


def keep_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (the rewritten ``src``) the hooks registered on ``src``: its inputs and
    outputs are those of ``src``, so the hooks see what they saw before."""
    for name, value in vars(src).items():
        if name.startswith(_HOOK_STORES) and value:
            setattr(dst, name, copy.copy(value))


def build_graph_module(module: nn.Module, graph: fx.Graph, new_modules: dict[str, nn.Module],
                       resolve) -> fx.GraphModule:
    """A GraphModule named like ``module``'s class that holds only what ``graph`` uses."""
    graph.lint()
    attrs: dict = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in attrs:
            if n.target in new_modules:
                attrs[n.target] = new_modules[n.target]
            else:
                attrs[n.target] = resolve(module, n.target)
    gm = NamedGraphModule(attrs, graph, class_name=type(module).__name__)
    gm.training = False
    gm.__dict__["_graphmodule_cls_name"] = type(module).__name__  # kept by pickling
    return gm


def live_users(node: fx.Node, graph: fx.Graph) -> list[fx.Node]:
    return real_users(node, ignorable_nodes(graph))
