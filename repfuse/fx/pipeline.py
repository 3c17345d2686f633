"""``fuse`` for torch models: the fx front end fuses, then every fused region and the
whole model are proven (``repfuse.proofs``).

The front end proper (``fx.fuse`` and below) never imports the proofs; this module (as
``repfuse.onnx.pipeline`` for ONNX) puts the two together.
"""

from __future__ import annotations

from torch import nn

from repfuse.errors import first_line
from repfuse.fx.fuse import FuseResult, fuse_module
from repfuse.proofs.model import verify_models
from repfuse.proofs.region import prove_region
from repfuse.threads import conversion_threads


def fuse_torch_model(model: nn.Module, example_inputs, *, verify: bool = True,
                     inplace: bool = False, tol=None) -> FuseResult:
    """Fuse ``model`` (see ``repfuse.fuse``) and, with ``verify``, prove the result."""
    with conversion_threads():
        return _fuse(model, example_inputs, verify, inplace, tol)


def _fuse(model: nn.Module, example_inputs, verify: bool, inplace: bool, tol) -> FuseResult:
    result = fuse_module(model, example_inputs, verify=verify, inplace=inplace)
    try:
        if verify:
            args = example_inputs if isinstance(example_inputs, (tuple, list)) \
                else (example_inputs,)
            _prove(result, model, tuple(args), tol)
    finally:
        for region in result.regions:
            region.activation = None
        result.regions = []
    return result


def _prove(result: FuseResult, model: nn.Module, args: tuple, tol) -> None:
    report = result.report
    # Largest kernels first, each region's float64 kernel and activation released once
    # proven: the large temporaries then grow the heap once and the smaller regions reuse
    # the space; in model order each large region after many small ones found the heap
    # fragmented and faulted in fresh pages. Reports keep model order.
    pending = sorted(result.regions, key=lambda f: -f.affine.weight.numel())
    result.regions = []
    while pending:
        f = pending.pop(0)
        proofs = prove_region(f.expr, f.affine, f.activation, tol=tol)
        f.report.proofs = proofs
        outs = [c for c in proofs.checks if c.name.startswith("output")] or proofs.checks
        if outs:
            f.report.max_abs_err = max(c.max_abs for c in outs)
            f.report.max_rel_err = max(c.max_rel for c in outs)
        del f, proofs
    try:
        report.model_checks = verify_models(model, result.model, args, grads=True, tol=tol)
    except RuntimeError as err:  # e.g. the model's own in-place ops break its backward
        report.model_checks = verify_models(model, result.model, args, grads=False, tol=tol)
        first = first_line(err, 200)
        report.model_checks.notes.append(f"input gradients not compared: the model's "
                                         f"backward fails ({first})")
    report.verified = True
