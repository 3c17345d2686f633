"""``describe``: the branch kinds of a region, e.g. ``["conv3x3+bn", "conv1x1+bn", "bn"]``.

One description per node type (registered with ``region.registry.describer``): it gets
the node and its children's branch lists and returns the node's branch list.
"""

from __future__ import annotations

from repfuse.core.spec import ConvSpec
from repfuse.region import nodes as N
from repfuse.region.registry import DESCRIBERS, describer
from repfuse.region.tree import children, walk


def _after(child: list[str], mine: str) -> list[str]:
    """A unary node ``mine`` applied to its child's branches."""
    if len(child) == 1:
        return [mine if child[0] == "identity" else f"{child[0]}+{mine}"]
    return ["(" + ", ".join(child) + f")+{mine}"]


@describer(N.Input)
def _input(node: N.Input, args: list[list[str]]) -> list[str]:
    return ["identity"]


@describer(N.Add)
def _add(node: N.Add, args: list[list[str]]) -> list[str]:
    return [s for a in args for s in a]


@describer(N.Concat)
def _concat(node: N.Concat, args: list[list[str]]) -> list[str]:
    return ["cat(" + ", ".join(s for a in args for s in a) + ")"]


@describer(N.Sub)
def _sub(node: N.Sub, args: list[list[str]]) -> list[str]:
    return args[0] + ["-" + s for s in args[1]]


@describer(N.Neg)
def _neg(node: N.Neg, args: list[list[str]]) -> list[str]:
    return ["-" + s for s in args[0]]


def _conv1d(spec: ConvSpec) -> str:
    """``conv1d3/s2 d2 g4`` for a spec with one row."""
    k, s, d = spec.kernel_size[1], spec.stride[1], spec.dilation[1]
    text = f"conv1d{k}" + (f"/s{s}" if s != 1 else "") + (f" d{d}" if d != 1 else "")
    if spec.groups > 1:
        text += " dw" if spec.groups == spec.in_channels == spec.out_channels \
            else f" g{spec.groups}"
    return text


@describer(N.Conv)
def _conv(node: N.Conv, args: list[list[str]]) -> list[str]:
    return _after(args[0], _conv1d(node.spec) if node.weight.dim() == 3
                  else node.spec.describe())


@describer(N.ConvTranspose)
def _conv_transpose(node: N.ConvTranspose, args: list[list[str]]) -> list[str]:
    return _after(args[0], node.spec.describe())


@describer(N.Linear)
def _linear(node: N.Linear, args: list[list[str]]) -> list[str]:
    return _after(args[0], "linear")


@describer(N.GlobalPool)
def _global_pool(node: N.GlobalPool, args: list[list[str]]) -> list[str]:
    return _after(args[0], "globalpool")


@describer(N.Transpose, N.Flatten, N.Unflatten)
def _relayout(node: N.Node, args: list[list[str]]) -> list[str]:
    return args[0]


@describer(N.BatchNorm)
def _batch_norm(node: N.BatchNorm, args: list[list[str]]) -> list[str]:
    return _after(args[0], "bn")


@describer(N.AvgPool)
def _avg_pool(node: N.AvgPool, args: list[list[str]]) -> list[str]:
    k = ConvSpec(1, 1, node.kernel_size).kernel_size
    return _after(args[0], f"avgpool{k[0]}x{k[1]}")


@describer(N.Scale)
def _scale(node: N.Scale, args: list[list[str]]) -> list[str]:
    return _after(args[0], "scale")


@describer(N.Shift)
def _shift(node: N.Shift, args: list[list[str]]) -> list[str]:
    return _after(args[0], "shift")


@describer(N.Pad)
def _pad(node: N.Pad, args: list[list[str]]) -> list[str]:
    return _after(args[0], "pad")


@describer(N.Crop)
def _crop(node: N.Crop, args: list[list[str]]) -> list[str]:
    return _after(args[0], "crop")


#: The longest branch description and the most branches kept per node: a value read
#: twice (a ghost module's concat of x and f(x), a residual sum) doubles its description
#: at each such node; a description is for a report, so a deep stack is cut short.
MAX_CHARS, MAX_BRANCHES = 160, 32


def _bounded(branches: list[str]) -> list[str]:
    out = [s if len(s) <= MAX_CHARS else s[:MAX_CHARS - 3] + "..." for s in branches]
    if len(out) > MAX_BRANCHES:
        out = out[:MAX_BRANCHES - 1] + [f"... ({len(out) - MAX_BRANCHES + 1} more)"]
    return out


def describe(expr: N.Node) -> list[str]:
    """Branch kinds, e.g. ``["conv3x3+bn", "conv1x1+bn", "bn"]`` (each at most
    ``MAX_CHARS`` long, at most ``MAX_BRANCHES`` of them)."""
    memo: dict[int, list[str]] = {}
    for node in walk(expr):
        memo[id(node)] = _bounded(
            DESCRIBERS[type(node)](node, [memo[id(c)] for c in children(node)]))
    return memo[id(expr)]
