"""The model a command works on: one ``ModelSpec`` built from the shared model options.

``@model_options`` adds MODEL_FILE, --arch, --factory, --timm, --weights, --trust-pickle,
--input-shape and --seed to a command and hands it one ``model: ModelSpec`` instead of
eight arguments; ``model.load()`` builds or loads it (``repfuse.cli.source``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import click

from repfuse.cli.options import SHAPE
from repfuse.cli.source import Source, load_source


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from, as the user gave it."""

    model_file: str | None = None
    arch: str | None = None
    factory: str | None = None
    timm_name: str | None = None
    weights: str | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None
    seed: int = 0

    @property
    def inputs(self) -> list[str]:
        """The user's input files (never overwritten)."""
        return [p for p in (self.model_file, self.weights) if p]

    @property
    def is_onnx(self) -> bool:
        return bool(self.model_file) and str(self.model_file).lower().endswith(".onnx")

    def load(self) -> Source:
        """Build or load the model, with its weights, validated (``load_source``)."""
        return load_source(**asdict(self))


_DECORATORS = [
    click.argument("model_file", required=False, metavar="[MODEL_FILE]",
                   type=click.Path(exists=True, dir_okay=False)),
    click.option("--arch", metavar="NAME",
                 help="Architecture from repfuse.models (e.g. repvgg_a0, mobileone_s0)."),
    click.option("--factory", metavar="MODULE:CALLABLE",
                 help="Your own code: 'pkg.mod:build' or 'path/to/file.py:build', "
                      "called without arguments, returning an nn.Module."),
    click.option("--timm", "timm_name", metavar="NAME",
                 help="A timm model (pretrained=False; needs timm installed)."),
    click.option("--weights", "-w", metavar="CKPT",
                 type=click.Path(exists=True, dir_okay=False),
                 help="Checkpoint: .pth/.pt (read with weights_only=True) or .safetensors; "
                      "nested state_dict/model/ema keys and 'module.' prefixes handled."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow unpickling arbitrary objects (whole-model pickles, .pt2 files, "
                      "checkpoints with custom classes). Only for files you trust."),
    click.option("--input-shape", type=SHAPE, default=None, metavar="N,C,H,W",
                 help="Example input shape for tracing and checks "
                      "[default: from the file, else 1,3,224,224]."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed of the random weights (when no --weights) and example inputs."),
]
_FIELDS = ("model_file", "arch", "factory", "timm_name", "weights", "trust_pickle",
           "input_shape", "seed")


def model_options(fn):
    """Add the model options to a command; it receives them as ``model: ModelSpec``."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        spec = ModelSpec(**{k: kwargs.pop(k) for k in _FIELDS})
        return fn(*args, model=spec, **kwargs)

    for dec in reversed(_DECORATORS):
        command = dec(command)
    return command
