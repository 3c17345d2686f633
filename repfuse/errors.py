"""Typed errors. Every message names the offending thing and says what to do.

The CLI maps ``ReparamError`` subclasses to exit code 2 (bad input) and
``VerificationError`` to exit code 1; it shows the message, never a traceback.
"""

from __future__ import annotations


class ReparamError(Exception):
    """Base class of all repfuse errors."""


class NotFusable(ReparamError):
    """An algebra operation or a region cannot be fused exactly; the message says why."""


class GeometryError(ReparamError, ValueError):
    """Impossible convolution geometry (also a ``ValueError``, like torch's own)."""


class InputError(ReparamError):
    """A file, checkpoint, model or option that repfuse cannot use."""


class UnsafeInputError(InputError):
    """Loading this input would execute code; it needs an explicit ``--trust-pickle``."""


class VerificationError(ReparamError):
    """The fused model does not match the training form within tolerance."""


class DtypeError(ReparamError, TypeError):
    """A tensor dtype (or device) the kernels cannot use (also a ``TypeError``, like torch's)."""
