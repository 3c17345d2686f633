"""Equivalence proofs.

* ``repfuse.proofs.compare``: the tolerance table by dtype and the one comparison;
* ``repfuse.proofs.region``: per-region proofs of a fused kernel against its region's
  training form, in float64 with the ``repfuse.core`` kernels;
* ``repfuse.proofs.model``: whole-model checks of outputs and input gradients
  (``repfuse.verify``).

Layering: ``compare`` <- ``region``, ``compare`` <- ``model`` (no cycle).
"""

from repfuse.proofs.compare import (
    SEED,
    TOLERANCES,
    Tolerance,
    compare,
    failed,
    least_precise,
    tolerance,
)
from repfuse.proofs.model import as_input_tuple, eval_mode, flatten, verify_models
from repfuse.proofs.region import prove_region

__all__ = ["SEED", "TOLERANCES", "Tolerance", "as_input_tuple", "compare", "eval_mode",
           "failed", "flatten", "least_precise", "prove_region", "tolerance", "verify_models"]
