"""repfuse.models: reference training-form architectures, registered by name.

Plain multi-branch modules with no fuse / deploy methods (``repfuse.fuse`` fuses
them); module and parameter names follow the official repositories so their training
checkpoints load with ``strict=True`` (see ``load_checkpoint``).

>>> from repfuse import models
>>> net = models.create("repvgg_a0", seed=0)
"""

from repfuse.io.checkpoint import load_checkpoint
from repfuse.models import acnet, dbb, mobileone, repvgg  # noqa: F401  (registration)
from repfuse.models.init import init_model, randomize_batchnorms
from repfuse.models.registry import builder, create, names, register_model

__all__ = ["create", "names", "builder", "register_model", "load_checkpoint",
           "init_model", "randomize_batchnorms"]
