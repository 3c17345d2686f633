"""Pads and crops, including the ones written with slicing (fx front end).

Rules (what is matched / what must hold / what it becomes):

* ``x[..., a:b, c:d]`` on an activation / literal slices of the spatial dimensions only,
  step 1 / ``Crop`` (a pass-through when nothing is removed);
* ``F.pad`` / ``nn.ZeroPad2d`` / ``nn.ConstantPad2d`` / constant mode / ``Crop`` where an
  amount is negative, then ``Pad``;
* ``y = F.pad(x, pad)`` (constant mode, zeros) followed by slice writes
  ``y[:, :, rows, cols] = v`` of one value ``v`` (a number, or a per-channel tensor
  computed from parameters and buffers) that together cover exactly the padded border,
  before any other use of ``y`` (DBB's BN-and-pad, ECB's padding with the preceding conv's
  bias): ``normalize`` first rewrites them into one ``border_pad(x, pad, v)`` call (which
  runs the same writes), classified as a ``Pad`` with value ``v``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from repfuse import region as rg
from repfuse.fx.values import (
    SIGS,
    Context,
    LinearOp,
    bind,
    channel_constant,
    constant,
    is_activation,
    literal,
    same_shape,
    tensor_meta,
)
from repfuse.region.op import OpKind, produces

__all__ = ["border_pad", "normalize", "pad_op"]


def border_pad(x: torch.Tensor, pad, value) -> torch.Tensor:
    """``F.pad(x, pad)`` with the padded border set to ``value`` (``pad`` is ``F.pad``'s
    (left, right, top, bottom))."""
    y = F.pad(x, list(pad))
    left, right, top, bottom = pad
    h, w = y.shape[-2:]
    for rows, cols in ((slice(0, top), slice(None)), (slice(h - bottom, h), slice(None)),
                       (slice(None), slice(0, left)), (slice(None), slice(w - right, w))):
        y[..., rows, cols] = value
    return y


SIGS[border_pad] = (("input", "pad", "value"), ())


def slice_items(index, rank: int) -> tuple[slice, ...] | None:
    """``index`` as one literal slice per dimension, or None if it is not plain slicing."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in items) > 1 or any(i is None for i in items):
        return None
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + (slice(None),) * (rank - len(items) + 1) + items[k + 1:]
    items = items + (slice(None),) * (rank - len(items))
    if len(items) != rank or not all(isinstance(i, slice) for i in items) or \
            not literal(*[(s.start, s.stop, s.step) for s in items]):
        return None
    return items


def _spatial(items: tuple[slice, ...] | None) -> bool:
    return items is not None and all(s == slice(None) for s in items[:-2]) and \
        all(s.step in (None, 1) for s in items[-2:])


# ----------------------------------------------------------------------------- border writes
def _written(writes: list[fx.Node], shape) -> torch.Tensor | None:
    """The (H, W) mask the slice writes cover, or None if one is not a spatial slice."""
    mask = torch.zeros(shape[-2:], dtype=torch.bool)
    for w in writes:
        items = slice_items(w.args[1], len(shape))
        if not _spatial(items):
            return None
        mask[items[-2], items[-1]] = True
    return mask


def _frame(shape, pad) -> torch.Tensor:
    left, right, top, bottom = pad
    h, w = shape[-2:]
    inner = torch.zeros((h - top - bottom, w - left - right), dtype=torch.bool)
    return F.pad(inner, (left, right, top, bottom), value=True)


def _border_writes(p: fx.Node) -> tuple[list[fx.Node], object] | None:
    """The slice writes that pad ``p``'s border with one value, and that value."""
    a = bind(p)
    meta = tensor_meta(p)
    if a is None or meta is None or len(meta[0]) != 4 or a["mode"] != "constant" or \
            a["value"] not in (None, 0, 0.0) or not literal(a["pad"]) or len(a["pad"]) != 4 \
            or min(a["pad"]) < 0:
        return None
    writes = [u for u in p.users if u.op == "call_function" and u.target is operator.setitem
              and u.args[0] is p and len(u.args) == 3]
    if not writes or len({w.args[2] for w in writes}) != 1:
        return None
    order = {n: i for i, n in enumerate(p.graph.nodes)}
    last = max(order[w] for w in writes)
    if any(order[u] < last for u in p.users if u not in writes):
        return None
    mask = _written(writes, meta[0])
    if mask is None or not torch.equal(mask, _frame(meta[0], tuple(a["pad"]))):
        return None
    return sorted(writes, key=order.__getitem__), writes[0].args[2]


def normalize(graph: fx.Graph) -> None:
    """Rewrite every padding by border writes in ``graph`` into one ``border_pad`` call."""
    for p in list(graph.nodes):
        if p.op != "call_function" or p.target is not F.pad:
            continue
        found = _border_writes(p)
        if found is None:
            continue
        writes, value = found
        with graph.inserting_after(writes[-1]):
            new = graph.call_function(border_pad, (bind(p)["input"], tuple(bind(p)["pad"]),
                                                   value))
        new.meta = dict(p.meta)
        p.replace_all_uses_with(new, delete_user_cb=lambda u, w=tuple(writes): u not in w)
        for w in writes:
            graph.erase_node(w)
        graph.erase_node(p)


# ----------------------------------------------------------------------------- rules
def pad_op(inp, pad, value, label: str = "", blocked: str = "") -> LinearOp | None:
    """``F.pad``'s (left, right[, top, bottom]) with ``value``: a crop where an amount is
    negative, then a pad."""
    if not is_activation(inp, (4,)) or len(pad) not in (2, 4):
        return None
    left, right = pad[0], pad[1]
    top, bottom = (pad[2], pad[3]) if len(pad) == 4 else (0, 0)
    sides = (top, bottom, left, right)
    crop = tuple(max(-p, 0) for p in sides)
    padding = tuple(max(p, 0) for p in sides)

    def build(xs):
        y = rg.Crop(xs[0], crop, label) if any(crop) else xs[0]
        return rg.Pad(y, padding, value, label) if any(padding) else y
    kind = OpKind.PAD if any(padding) else OpKind.CROP
    return LinearOp(kind, [inp], build, blocked, label)


@produces(rg.Crop)
def crop_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    """``x[..., a:b, c:d]``: a crop of the spatial dimensions."""
    inp = a["input"]
    if not is_activation(inp, (4,)):
        return None
    items = slice_items(a["index"], 4)
    if not _spatial(items):
        return None
    crop = []
    for s, size in zip(items[2:], tensor_meta(inp)[0][2:]):
        start, stop, _ = s.indices(size)
        if stop <= start:
            return None
        crop += [start, size - stop]
    if not any(crop):
        return LinearOp(OpKind.PASS, [inp], lambda xs: xs[0]) if same_shape(node, inp) \
            else None
    cut = tuple(crop)
    return LinearOp(OpKind.CROP, [inp], lambda xs: rg.Crop(xs[0], cut, node.name),
                    label=node.name)


@produces(rg.Pad, rg.Crop)
def pad_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    if a["mode"] != "constant" or not literal(a["pad"], a["value"]):
        return None
    value = 0.0 if a["value"] is None else float(a["value"])
    return pad_op(a["input"], tuple(a["pad"]), value, node.name)


@produces(rg.Pad)
def border_pad_function(a: dict, ctx: Context, node: fx.Node) -> LinearOp | None:
    """``border_pad(x, pad, v)``: a pad with the value ``v``."""
    x, v = a["input"], a["value"]
    if not is_activation(x, (4,)) or not literal(a["pad"]):
        return None
    value, why = constant(ctx, v) if isinstance(v, fx.Node) else (v, "")
    if isinstance(value, (bool, int)):
        value = float(value)
    found = channel_constant(value, tensor_meta(x)[0]) if value is not None else None
    if found is None or found[1] != 1:
        return None
    factor = found[0]
    return pad_op(x, tuple(a["pad"]), factor, node.name,
                  f"{node.name}: pad value {why}" if why else "")
