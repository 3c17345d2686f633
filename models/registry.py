"""Architectures registered by name: ``@register_model``, ``create``, ``names``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from repfuse.errors import InputError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; the builder takes ``num_classes``."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model name {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def register_variants(family: Callable[..., nn.Module], variants, doc: str) -> None:
    """Register one builder per variant name: ``family(variant, num_classes=...)``;
    ``doc`` formats the variant's suffix (``"repvgg_a0"`` -> ``"A0"``) into its docstring."""
    for variant in variants:
        register_model(_variant_builder(family, variant, doc))


def _variant_builder(family, variant: str, doc: str):
    def build(num_classes: int = 1000) -> nn.Module:
        return family(variant, num_classes=num_classes)

    build.__name__ = build.__qualname__ = variant
    build.__doc__ = doc.format(variant.split("_", 1)[1].upper())
    return build


def names() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; an unknown name raises ``InputError`` that
    lists the close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(str(name).lower(), names(), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names())}"
    raise InputError(f"unknown architecture {name!r}: {hint}") from None


def create(name: str, *, seed: int | None = None, realistic_bn: bool = True,
           num_classes: int = 1000, calibration_shape: tuple[int, ...] | None = None,
           **kwargs) -> nn.Module:
    """Build the training form of architecture ``name`` in eval mode.

    ``seed`` makes the random weights reproducible (without touching torch's global
    random state); ``None`` draws them from the global generator. With ``realistic_bn``
    every batch norm gets random affine parameters and running statistics measured on
    random inputs of ``calibration_shape`` (default ``init.CALIBRATION_SHAPE``; the
    defaults, ones and zeros, hide fusion bugs).
    """
    from repfuse.models.init import CALIBRATION_SHAPE, init_model

    build = builder(name)
    try:
        inspect.signature(build).bind(num_classes=num_classes, **kwargs)
    except TypeError:
        accepted = ", ".join(inspect.signature(build).parameters)
        raise InputError(f"architecture {name!r} takes no option(s) "
                         f"{', '.join(sorted(kwargs))}; it accepts: {accepted}") from None
    return init_model(lambda: build(num_classes=num_classes, **kwargs), seed=seed,
                      realistic_bn=realistic_bn,
                      calibration_shape=calibration_shape or CALIBRATION_SHAPE)
