"""Activation and normalization patterns that inference runtimes run as one kernel.

Exporters and hand-written models spell some activations and norms out in elementary
ops: GELU as ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (or its tanh approximation),
HardSigmoid as ``relu6(x + 3) / 6``, HardSwish as ``x`` times that, SiLU as
``x * sigmoid(x)``, LayerNorm and RMSNorm as means, a square root, a division and an
affine scale and shift. onnxruntime (Gelu, QuickGelu, LayerNormalization,
SimplifiedLayerNormalization) and OpenVINO (HSigmoid, HSwish, Gelu, MVN) recognise these
forms and run each as one kernel. Some of their ops are linear (the scale by 0.5, the
shift by 3, the division by 6, the norm's affine): folding one into a neighbouring conv
is exact, but the runtime then no longer sees the pattern and the model runs slower. The
front ends leave every op of a pattern found here out of their linear regions.

What is matched (constants within 0.1%; any operand order; each inner value used only
by the pattern, except the input ``x``):

* ``gelu``: erf(x * 1/sqrt(2)) + 1, multiplied by ``x`` and by constants making 0.5 (in
  any order: ``x * (1 + erf) * 0.5``, ``0.5 * (1 + erf) * x``, ``(x * 0.5) * (1 + erf)``).
* ``gelu (tanh)``: tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) + 1, then as ``gelu``.
* ``hardsigmoid``: relu6(x + 3) times constants making 1/6; ``hardswish``: the same
  multiplied by ``x`` (before or after the constants).
* ``silu``: sigmoid(x) or sigmoid(beta * x), multiplied by ``x``.
* ``layernorm``: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps); ``rmsnorm``:
  x / sqrt(mean(x^2) + eps) (a reciprocal or rsqrt times, too). When the means reduce the
  trailing axes (the form a LayerNormalization kernel computes), the chain of constant
  scales and shifts after the division belongs to the pattern; over other axes (a
  channels-first LayerNorm2d) no runtime fuses the affine, and it may fold into a conv.

A front end describes its graph through a ``View``; values are whatever it uses for a
node's output (an ``fx.Node``, an ``onnx_ir.Value``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

#: the normalized op kinds a view reports
KINDS = ("mul", "div", "add", "sub", "erf", "tanh", "sigmoid", "relu6", "pow", "mean",
         "sqrt", "rsqrt", "reciprocal")


class View(Protocol):
    def kind(self, value) -> str | None:
        """The op computing ``value``, one of ``KINDS``, or None."""

    def operands(self, value) -> list:
        """The operands of that op in order: values, or constants."""

    def users(self, value) -> list:
        """The values computed by the ops that read ``value`` (one per op)."""

    def scalar(self, operand) -> float | None:
        """The number a one-element constant operand holds, else None."""

    def is_constant(self, operand) -> bool: ...

    def trailing(self, mean) -> bool:
        """Whether the ``mean`` value reduces the trailing axes of its operand."""


@dataclass(eq=False)
class Pattern:
    """One occurrence: its name and every value it computes (``root`` last)."""

    name: str
    values: list[Any] = field(default_factory=list)

    @property
    def root(self):
        return self.values[-1]


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-3 * abs(target)


def _single_user(view: View, value):
    users = view.users(value)
    return users[0] if len(users) == 1 else None


def _split(view: View, value, kinds=("mul", "div")):
    """``(other, number)`` when ``value`` is ``other`` times (or divided by) a scalar
    constant; None otherwise."""
    kind = view.kind(value)
    if kind not in kinds:
        return None
    ops = view.operands(value)
    if len(ops) != 2:
        return None
    a, b = ops
    cb = view.scalar(b)
    if cb is not None and not view.is_constant(a):
        if kind == "div":
            return (a, 1.0 / cb) if cb else None
        return a, cb
    ca = view.scalar(a)
    if ca is not None and kind == "mul" and not view.is_constant(b):
        return b, ca
    return None


def _other(view: View, value, known):
    """The operand of the binary op ``value`` that is not ``known`` (None if both are)."""
    ops = view.operands(value)
    if len(ops) != 2 or (ops[0] is known) == (ops[1] is known):
        return None
    return ops[1] if ops[0] is known else ops[0]


def _plus_one(view: View, value):
    """The value ``value + 1`` when that is ``value``'s only user."""
    user = _single_user(view, value)
    if user is None or view.kind(user) != "add":
        return None
    return user if _close(view.scalar(_other(view, user, value)), 1.0) else None


def _tail(view: View, start, x, target: float, need_x: bool):
    """The values after ``start`` through single users that multiply it by constants or
    by ``x`` (or ``x`` times a constant), until the constants make ``target`` and (when
    ``need_x``) ``x`` was a factor; ``(values, saw_x)`` or None."""
    values, factor, saw_x, value = [], 1.0, False, start
    while not (_close(factor, target) and (saw_x or not need_x)):
        user = _single_user(view, value)
        if user is None or view.kind(user) not in ("mul", "div"):
            return None
        other = _other(view, user, value)
        if other is None or (view.kind(user) == "div" and view.operands(user)[0] is not value):
            return None
        number = view.scalar(other)
        if number is not None:
            factor = factor / number if view.kind(user) == "div" else factor * number
        elif view.kind(user) == "mul" and not saw_x and other is x:
            saw_x = True
        elif view.kind(user) == "mul" and not saw_x and _x_times(view, other, x, user):
            saw_x = True
            factor *= _split(view, other)[1]
            values.append(other)
        else:
            return None
        values.append(user)
        value = user
    return values, saw_x


def _x_times(view: View, value, x, user) -> bool:
    split = _split(view, value)
    return split is not None and split[0] is x and view.users(value) == [user]


def _gelu(view: View, erf) -> Pattern | None:
    split = _split(view, view.operands(erf)[0])
    if split is None or not _close(split[1], 1 / math.sqrt(2)):
        return None
    x, scaled = split[0], view.operands(erf)[0]
    one = _plus_one(view, erf)
    tail = _tail(view, one, x, 0.5, True) if one is not None else None
    if tail is None:
        return None
    return Pattern("gelu", [scaled, erf, one, *tail[0]])


def _cube_of(view: View, value, x) -> list | None:
    """The values computing ``x ** 3`` as ``value`` (Pow, or x * x * x), or None."""
    if view.kind(value) == "pow":
        base, power = view.operands(value)
        return [value] if base is x and _close(view.scalar(power), 3.0) else None
    if view.kind(value) != "mul":
        return None
    a, b = view.operands(value)
    for square, single in ((a, b), (b, a)):
        if single is x and view.kind(square) == "mul" and view.operands(square) == [x, x]:
            return [square, value]
    return None


def _gelu_tanh(view: View, tanh) -> Pattern | None:
    split = _split(view, view.operands(tanh)[0])
    if split is None or not _close(split[1], math.sqrt(2 / math.pi)):
        return None
    inner, scaled = split[0], view.operands(tanh)[0]
    if view.kind(inner) != "add" or len(view.operands(inner)) != 2:
        return None
    for x, term in (view.operands(inner), reversed(view.operands(inner))):
        cubic = _split(view, term)
        cube = _cube_of(view, cubic[0], x) if cubic and _close(cubic[1], 0.044715) else None
        one = _plus_one(view, tanh)
        tail = _tail(view, one, x, 0.5, True) if cube and one is not None else None
        if tail is not None:
            return Pattern("gelu (tanh)", [*cube, term, inner, scaled, tanh, one, *tail[0]])
    return None


def _hardsigmoid(view: View, relu6) -> Pattern | None:
    shifted = view.operands(relu6)[0]
    if view.kind(shifted) != "add" or len(view.operands(shifted)) != 2:
        return None
    a, b = view.operands(shifted)
    x, three = (a, b) if view.scalar(b) is not None else (b, a)
    if not _close(view.scalar(three), 3.0) or view.users(shifted) != [relu6]:
        return None
    tail = _tail(view, relu6, x, 1 / 6, False)
    if tail is None:
        return None
    values, saw_x = tail
    last = values[-1] if values else relu6
    user = _single_user(view, last)
    if not saw_x and user is not None and view.kind(user) == "mul" \
            and _other(view, user, last) is x:
        values, saw_x = [*values, user], True
    return Pattern("hardswish" if saw_x else "hardsigmoid", [shifted, relu6, *values])


def _silu(view: View, sigmoid) -> Pattern | None:
    arg = view.operands(sigmoid)[0]
    split = _split(view, arg, ("mul",))
    candidates = [(arg, [])]
    if split is not None and view.users(arg) == [sigmoid]:     # sigmoid(beta * x)
        candidates.append((split[0], [arg]))
    for x, inner in candidates:
        tail = _tail(view, sigmoid, x, 1.0, True)
        if tail is not None:
            return Pattern("silu", [*inner, sigmoid, *tail[0]])
    return None


def _squared(view: View, value, x) -> bool:
    if view.kind(value) == "pow":
        return view.operands(value)[0] is x and _close(view.scalar(view.operands(value)[1]), 2)
    return view.kind(value) == "mul" and view.operands(value) == [x, x]


def _normalized(view: View, variance, numerators: list):
    """The values from ``variance + eps`` to ``n / sqrt(...)`` (or ``n * rsqrt(...)``,
    ``n * reciprocal(sqrt(...))``) for ``n`` one of ``numerators``, or None."""
    eps = _single_user(view, variance)
    if eps is None or view.kind(eps) != "add" or view.scalar(_other(view, eps, variance)) is None:
        return None
    chain, step = [eps], _single_user(view, eps)
    if step is not None and view.kind(step) == "sqrt":
        chain.append(step)
        after = _single_user(view, step)
        if after is not None and view.kind(after) == "div" and \
                view.operands(after)[1] is step and _among(view.operands(after)[0], numerators):
            return [*chain, after]
        step = after if after is not None and view.kind(after) == "reciprocal" else None
    elif step is None or view.kind(step) != "rsqrt":
        return None
    if step is None:
        return None
    chain.append(step)
    after = _single_user(view, step)
    if after is not None and view.kind(after) == "mul" and \
            _among(_other(view, after, step), numerators):
        return [*chain, after]
    return None


def _among(value, values: list) -> bool:
    return any(value is v for v in values)


def _affine_tail(view: View, value) -> list:
    """Scales and shifts by constants after ``value``, through single users."""
    values = []
    while (user := _single_user(view, value)) is not None and view.kind(user) in (
            "mul", "div", "add", "sub"):
        other = _other(view, user, value)
        if other is None or not view.is_constant(other):
            break
        values.append(user)
        value = user
    return values


def _norm(view: View, mean) -> Pattern | None:
    arg = view.operands(mean)[0]
    # layernorm: x - mean(x), written once or twice (``(x - u).pow(2)``, ``(x - u) / ...``)
    centred = [u for u in view.users(mean)
               if view.kind(u) == "sub" and _among(arg, view.operands(u)[:1])
               and view.operands(u)[1] is mean]
    for first in centred:
        for square in view.users(first):
            variance = _single_user(view, square)
            if not _squared(view, square, first) or variance is None \
                    or view.kind(variance) != "mean":
                continue
            chain = _normalized(view, variance, centred)
            if chain is not None:
                tail = _affine_tail(view, chain[-1]) if view.trailing(mean) else []
                return Pattern("layernorm", [mean, *centred, square, variance, *chain, *tail])
    for x in (view.operands(arg)[0],) if view.kind(arg) in ("pow", "mul") else ():
        chain = _normalized(view, mean, [x]) if _squared(view, arg, x) else None
        if chain is not None:                # rmsnorm: x / sqrt(mean(x^2) + eps)
            tail = _affine_tail(view, chain[-1]) if view.trailing(mean) else []
            return Pattern("rmsnorm", [arg, mean, *chain, *tail])
    return None


_MATCHERS = {"erf": _gelu, "tanh": _gelu_tanh, "relu6": _hardsigmoid, "sigmoid": _silu,
             "mean": _norm}


def find_patterns(view: View, values) -> list[Pattern]:
    """Every pattern in ``values`` (a graph's values in order); a value belongs to at
    most one pattern (the first found: a layernorm's variance is not an rmsnorm too)."""
    found, taken = [], set()
    for value in values:
        matcher = _MATCHERS.get(view.kind(value))
        if matcher is None or id(value) in taken:
            continue
        pattern = matcher(view, value)
        if pattern is None or any(id(v) in taken for v in pattern.values):
            continue
        taken |= {id(v) for v in pattern.values}
        found.append(pattern)
    return found


def kept_note(patterns: list[Pattern]) -> str | None:
    """The report's note on the patterns left whole, or None when there are none."""
    if not patterns:
        return None
    counts = Counter(p.name for p in patterns)
    kinds = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    return (f"kept whole, as runtimes fuse each into one kernel: {kinds} written out in "
            "elementary ops (linear regions stop at their edges; their scales and shifts "
            "are not folded into neighbouring convs)")
