"""``repfuse verify``: do two models compute the same function?"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from torch import nn

import repfuse
from repfuse.cli.context import CheckFailed, set_stage
from repfuse.cli.options import DEFAULT_SHAPE, SHAPE, output_options, tol_option
from repfuse.cli.render import checks_table, consoles, failure_summary, status, write_json
from repfuse.cli.source import Source, load_source
from repfuse.io.atomic import check_output_path
from repfuse.onnx.runtime import OnnxRunner

PREFIXES = ("arch:", "timm:", "factory:")


def load_spec(spec: str, *, weights, trust_pickle: bool, seed: int, input_shape) -> Source:
    """A model named by a file path or ``arch:NAME`` / ``timm:NAME`` / ``factory:MOD:FN``."""
    kwargs = dict(weights=weights, trust_pickle=trust_pickle, seed=seed, input_shape=input_shape)
    if spec.startswith("arch:"):
        return load_source(arch=spec[5:], **kwargs)
    if spec.startswith("timm:"):
        return load_source(timm_name=spec[5:], **kwargs)
    if spec.startswith("factory:"):
        return load_source(factory=spec[8:], **kwargs)
    path = Path(spec)
    if not path.exists():
        raise click.BadParameter(f"{spec!r} is neither a file nor arch:NAME, timm:NAME or "
                                 "factory:MODULE:CALLABLE")
    if path.is_dir():
        raise click.BadParameter(f"{spec!r} is a directory; give a model file")
    return load_source(model_file=spec, **kwargs)


def _runner(source: Source) -> nn.Module:
    return OnnxRunner(source.model, source.label) if source.kind == "onnx" else source.model


@click.command()
@click.argument("reference", metavar="REFERENCE")
@click.argument("candidate", metavar="CANDIDATE")
@click.option("--reference-weights", "--ref-weights", "ref_weights", metavar="CKPT",
              type=click.Path(exists=True, dir_okay=False), help="Checkpoint for REFERENCE.")
@click.option("--candidate-weights", "--cand-weights", "cand_weights", metavar="CKPT",
              type=click.Path(exists=True, dir_okay=False), help="Checkpoint for CANDIDATE.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow unpickling arbitrary objects (.pt2, pickled modules). Trusted files "
                   "only.")
@click.option("--input-shape", type=SHAPE, default=None, metavar="N,C,H,W",
              help="Example input shape [default: from an ONNX/.pt2 file, else 1,3,224,224].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random weights (arch:/timm:/factory: without weights) and inputs.")
@click.option("--no-grads", is_flag=True,
              help="Compare outputs only (input gradients are compared when both are torch "
                   "models).")
@tol_option
@output_options
@click.pass_context
def verify(ctx, reference, candidate, ref_weights, cand_weights, trust_pickle, input_shape,
           seed, no_grads, tol, json_path, quiet):
    """Check that CANDIDATE computes what REFERENCE computes (exit 1 if not).

    Each model is a file (.onnx run by onnxruntime; .pt2 or a pickled nn.Module with
    --trust-pickle) or arch:NAME, timm:NAME, factory:MODULE:CALLABLE (seeded random weights
    unless --reference-weights / --candidate-weights). Outputs are compared, and input
    gradients too when both models are torch models.

    \b
    Examples:
      repfuse verify train.onnx deploy.onnx
      repfuse verify arch:repvgg_a0 build/repvgg_a0.onnx --input-shape 1,3,224,224
      repfuse verify arch:repvgg_a0 deploy.pt2 --reference-weights train.pth --trust-pickle
    """
    out, err = consoles(quiet)
    set_stage(ctx, "load")
    inputs = [p for p in (reference, candidate, ref_weights, cand_weights)
              if p and not str(p).startswith(PREFIXES)]
    if json_path is not None:
        check_output_path(json_path, inputs=inputs, force=True)
    sources = []
    for spec, weights in ((reference, ref_weights), (candidate, cand_weights)):
        with status(err, f"loading {spec}"):
            sources.append(load_spec(spec, weights=weights, trust_pickle=trust_pickle,
                                     seed=seed, input_shape=input_shape))
    ref, cand = sources
    for s in sources:
        for note in s.notes:
            err.print(f"[yellow]note:[/yellow] {s.label}: {note}")
    shape = input_shape or next((s.input_shape for s in sources if s.kind == "onnx"
                                 or s.input_shape != DEFAULT_SHAPE), DEFAULT_SHAPE)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen).to(ref.dtype)
    grads = not no_grads and ref.kind == "torch" and cand.kind == "torch"

    set_stage(ctx, "verify")
    with status(err, "comparing"):
        report = repfuse.verify(_runner(ref), _runner(cand), x, grads=grads, tol=tol)
    if not grads:
        report.notes.append("input gradients not compared"
                            + (" (--no-grads)" if no_grads else " (an ONNX model)"))
    out.print(checks_table(report.checks,
                           title=f"{cand.label} vs {ref.label}, input {tuple(shape)}"))
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    if json_path:
        write_json(json_path, {"command": "verify", "reference": ref.label,
                               "candidate": cand.label, "input_shape": list(shape),
                               "report": report.to_dict()}, inputs=inputs)
    if not report.ok:
        raise CheckFailed(f"{candidate} differs from {reference}: {failure_summary(report)}")
    worst = max(report.checks, key=lambda c: c.max_rel, default=None)
    figure = f", worst max rel err {worst.max_rel:.2e} ({worst.name})" if worst else ""
    out.print(f"[green]equivalent[/green]: {len(report.checks)} check(s) passed{figure}")
