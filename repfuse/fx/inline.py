"""Opening a submodule call whose forward starts or ends with a linear op (fx front end).

What is matched: ``conv -> child(x)`` where the child's forward begins with a batch
norm on its input but continues with something nonlinear (``BatchNormAct2d``: BN
then an activation inside one module); and ``child(x) -> bn`` where the child's
forward ends with a conv after something nonlinear (a deep stem ``Sequential(conv,
bn, relu, ..., conv)`` followed by the model's ``bn1``), or with a channel concat of
convs (MixConv, followed by the block's BN: ``fx.distribute`` then moves the BN into the
parts); and ``bn -> child(x)`` where the child's forward begins with a conv or a linear
layer on its input (an MLP module after the block's norm, NextViT's ``norm ->
mlp.fc1``). What must hold: the conv's only user is the call (the call's only user is
the BN; a concat of convs counts as a conv), the child is called once, takes one tensor
and returns one value. What it becomes: the child's graph copied into the caller's
graph (its submodule and parameter targets prefixed with the child's path), so the conv
and the BN form one region in the caller and fold; the rest of the child stays.
A child that returns a tuple the caller only indexes is opened the same way, so
regions can span its outputs.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repfuse.fx.trace import ModuleGraph


def _calls(node, module: nn.Module, function, layer: type[nn.Module]) -> bool:
    """Whether ``node`` calls ``function`` or a submodule of ``module`` of type ``layer``."""
    if node.op == "call_function":
        return node.target is function
    if node.op == "call_module":
        try:
            return isinstance(module.get_submodule(node.target), layer)
        except AttributeError:
            return False
    return False


def _produces_conv(node, module: nn.Module) -> bool:
    """A conv's output, or a channel concat of convs' outputs (MixConv), read once."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return False
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        return isinstance(parts, (list, tuple)) and len(parts) > 1 and all(
            _produces_conv(p, module) for p in parts)
    return _calls(node, module, F.conv2d, nn.Conv2d)


def after_concat_of_convs(call: fx.Node, module: nn.Module) -> bool:
    """Whether ``call`` reads a channel concat of convs (a linear child after it is opened
    too, so that ``fx.distribute`` can move its batch norm into the concat's parts)."""
    arg = call.args[0] if call.args else None
    return isinstance(arg, fx.Node) and arg.op == "call_function" \
        and arg.target in (torch.cat, torch.concat) and _produces_conv(arg, module)


def _starts_with_bn(child: ModuleGraph) -> bool:
    placeholders = [n for n in child.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return False
    out = next(n for n in child.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node):
        return False
    users = [u for u in placeholders[0].users
             if not (u.op == "call_function" and u.target is getattr)]
    if len(users) != 1:
        return False
    return _is_bn(users[0], child.module)


def _is_bn(node, module: nn.Module) -> bool:
    return _calls(node, module, F.batch_norm, nn.BatchNorm2d)


_LAYERS = ((F.conv2d, nn.Conv2d), (F.linear, nn.Linear), (F.conv1d, nn.Conv1d))


def _produces_bn(node, module: nn.Module) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1 and (
        _is_bn(node, module) or _calls(node, module, F.batch_norm, nn.BatchNorm1d))


def _starts_with_layer(child: ModuleGraph) -> bool:
    """The child's input is read by one conv or linear layer (and only by it)."""
    placeholders = [n for n in child.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return False
    users = [u for u in placeholders[0].users
             if not (u.op == "call_function" and u.target is getattr)]
    return len(users) == 1 and users[0].args[:1] == (placeholders[0],) and any(
        _calls(users[0], child.module, f, layer) for f, layer in _LAYERS)


def _ends_with_conv(call: fx.Node, module: nn.Module, child: ModuleGraph) -> bool:
    """The child returns a conv's output and the caller's only use of it is a BN."""
    users = list(call.users)
    if len(users) != 1 or not _is_bn(users[0], module) or users[0].args[0] is not call:
        return False
    placeholders = [n for n in child.graph.nodes if n.op == "placeholder"]
    out = next(n for n in child.graph.nodes if n.op == "output")
    return len(placeholders) == 1 and _produces_conv(out.args[0], child.module)


def _returns_tuple(call: fx.Node, child: ModuleGraph) -> bool:
    """The child returns a tuple of values that the caller only indexes."""
    placeholders = [n for n in child.graph.nodes if n.op == "placeholder"]
    out = next(n for n in child.graph.nodes if n.op == "output")
    return (len(placeholders) == 1 and isinstance(out.args[0], (tuple, list))
            and all(isinstance(v, fx.Node) for v in out.args[0]) and bool(call.users)
            and all(u.op == "call_function" and u.target is operator.getitem
                    and isinstance(u.args[1], int) for u in call.users))


def should_inline(call: fx.Node, module: nn.Module, child: ModuleGraph | None,
                  single_use: bool) -> bool:
    """Whether ``call`` (a call of ``child``'s module in ``module``'s graph) is opened:
    a conv followed by a module that starts with a BN, a module ending with a conv
    followed by a BN, a BN followed by a module that starts with a conv or linear layer,
    or a module returning a tuple."""
    if child is None or child.graph is None or not single_use or len(call.args) != 1 \
            or call.kwargs:
        return False
    return (_produces_conv(call.args[0], module) and _starts_with_bn(child)) \
        or (_produces_bn(call.args[0], module) and _starts_with_layer(child)) \
        or _ends_with_conv(call, module, child) or _returns_tuple(call, child)


def inline_call(graph: fx.Graph, call: fx.Node, child: fx.Graph) -> None:
    """Replace ``call`` in ``graph`` by a copy of ``child`` (targets prefixed)."""
    prefix = call.target
    env: dict[fx.Node, object] = {}
    out = None
    with graph.inserting_before(call):
        for n in child.nodes:
            if n.op == "placeholder":
                env[n] = call.args[0]
                continue
            if n.op == "output":
                out = fx.map_arg(n.args[0], lambda a: env[a])
                break
            new = graph.node_copy(n, lambda a: env[a])
            if n.op in ("call_module", "get_attr"):
                new.target = f"{prefix}.{n.target}"
            new.meta = dict(n.meta)
            env[n] = new
    if isinstance(out, (tuple, list)):
        for u in list(call.users):
            u.replace_all_uses_with(out[u.args[1]])
            graph.erase_node(u)
    else:
        call.replace_all_uses_with(out)
    graph.erase_node(call)
