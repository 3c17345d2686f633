"""A batch norm after a channel concat of convs, moved into the concat's parts.

What is matched: an eval-mode batch norm (an ``nn.BatchNorm2d`` call, or ``F.batch_norm``
with ``training=False`` on parameters and buffers, as an inlined ``BatchNormAct2d``
runs it) whose input is ``torch.cat(parts, dim=1)`` of 4-D values, read by nothing else,
where every part is the output of a conv (an ``nn.Conv2d`` call or ``F.conv2d``) read only
by the concat: the MixConv idiom (a channel split, one conv per part, concat, BN), or
parallel convs on different inputs.
What must hold: nothing more; a batch norm is per channel, so
``bn(cat(a, b)) == cat(bn[:ca](a), bn[ca:](b))`` exactly.
What it becomes: ``cat([F.batch_norm(part, stats[lo:hi], ...)], 1)``, each slice computed
from the norm's own parameters and buffers, so each part (conv, norm slice) is a region
of its own that folds into one conv, and the proofs differentiate through the slices.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repfuse.fx.match import ignorable_nodes, real_users
from repfuse.fx.norms import eval_norm
from repfuse.fx.values import bind, tensor_meta

__all__ = ["distribute_norms"]


def _is_conv(node: fx.Node, root: nn.Module) -> bool:
    if len(node.users) != 1 or tensor_meta(node) is None or len(tensor_meta(node)[0]) != 4:
        return False
    if node.op == "call_module":
        try:
            return isinstance(root.get_submodule(node.target), nn.Conv2d)
        except AttributeError:
            return False
    return node.op == "call_function" and node.target is F.conv2d


def _parts(cat: fx.Node, root: nn.Module, ign: set) -> list[fx.Node] | None:
    """The parts of a channel concat of convs read only by its one user (and shape
    reads for asserts), or None."""
    if cat.op != "call_function" or cat.target not in (torch.cat, torch.concat) \
            or len(real_users(cat, ign)) != 1:
        return None
    a = bind(cat)
    if a is None or not isinstance(a["tensors"], (list, tuple)) or len(a["tensors"]) < 2:
        return None
    parts = list(a["tensors"])
    meta = tensor_meta(cat)
    if meta is None or len(meta[0]) != 4 or a["dim"] not in (1, -3) \
            or len(set(parts)) != len(parts) or not all(_is_conv(p, root) for p in parts):
        return None
    return parts


def distribute_norms(graph: fx.Graph, root: nn.Module) -> None:
    """Rewrite every match in ``graph`` (see the module docstring); ``root``: the module
    the graph belongs to."""
    ign = ignorable_nodes(graph)
    for node in list(graph.nodes):
        inp = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if inp is None or _parts(inp, root, ign) is None:
            continue
        found = eval_norm(node, root)
        if found is None:
            continue
        stats, eps = found.stats, found.eps
        old = [a for a in node.all_input_nodes if a.op == "get_attr"]
        parts, start, outs = _parts(inp, root, ign), 0, []
        with graph.inserting_before(inp.next):   # before the shape reads of ``inp``
            attrs = {k: None if t is None else graph.get_attr(t) for k, t in stats.items()}
            for p in parts:
                stop = start + tensor_meta(p)[0][1]
                cut = {k: None if v is None else graph.call_function(
                    operator.getitem, (v, slice(start, stop))) for k, v in attrs.items()}
                out = graph.call_function(F.batch_norm, (
                    p, cut["running_mean"], cut["running_var"], cut["weight"], cut["bias"],
                    False, 0.0, eps))
                out.meta = dict(p.meta)
                outs.append(out)
                start = stop
            joined = graph.call_function(torch.cat, (outs, 1))
        joined.meta = dict(node.meta)
        node.replace_all_uses_with(joined)
        graph.erase_node(node)
        inp.replace_all_uses_with(joined)   # the shape reads
        graph.erase_node(inp)
        for v in old:
            if not v.users:   # an inlined F.batch_norm's own reads
                graph.erase_node(v)
