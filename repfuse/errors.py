"""Typed errors. Every message names the offending thing and says what to do.

The CLI maps ``ReparamError`` subclasses to exit code 2 (bad input) and
``VerificationError`` to exit code 1; it shows the message, never a traceback.
"""

from __future__ import annotations


class ReparamError(Exception):
    """Base class of all repfuse errors."""


class NotFusable(ReparamError):
    """An algebra operation or a region cannot be fused exactly; the message says why.

    ``node``: the region-expression node the refusal is about, when known."""

    def __init__(self, message: str = "", *, node: object = None) -> None:
        super().__init__(message)
        self.node = node


class GeometryError(ReparamError, ValueError):
    """Impossible convolution geometry (also a ``ValueError``, like torch's own)."""


class InputError(ReparamError):
    """A file, checkpoint, model or option that repfuse cannot use."""


class UnsafeInputError(InputError):
    """Loading this input would execute code; it needs an explicit ``--trust-pickle``.

    ``imports``: the Python globals the file would import (``module.name``), when known."""

    def __init__(self, message: str = "", *, imports: list[str] | None = None) -> None:
        super().__init__(message)
        self.imports = list(imports or [])


class VerificationError(ReparamError):
    """The fused model does not match the training form within tolerance.

    ``report``: the report holding the figures (a ``FuseReport`` or ``VerifyReport``)."""

    def __init__(self, message: str = "", *, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class DtypeError(ReparamError, TypeError):
    """A tensor dtype (or device) the kernels cannot use (also a ``TypeError``, like torch's)."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message (or its type name), cut at the end
    of its first sentence when longer than ``limit`` characters."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            if len(line) > limit:
                end = line.find(". ")
                line = line[:end + 1] if 0 < end < limit else line[:limit].rstrip() + "..."
            return line
    return type(exc).__name__
