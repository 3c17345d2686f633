"""Where a model comes from: a file (.onnx, .pt2, pickle), --arch, --factory or --timm."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from torch import nn

from repfuse.cli.options import DEFAULT_SHAPE
from repfuse.errors import InputError, first_line
from repfuse.fx.aten import program_module
from repfuse.io.checkpoint import check_model, close_matches, load_checkpoint
from repfuse.io.modelfile import load_exported_program, load_pickled_module, program_input_shape
from repfuse.onnx.io import load_onnx, onnx_input_shape


@dataclass
class Source:
    """A loaded model and what the command needs to know about it."""

    kind: str                       # "torch" | "onnx"
    label: str                      # e.g. "repvgg_a0 (repfuse.models)"
    model: object                   # nn.Module or onnx.ModelProto
    input_shape: tuple[int, ...]
    files: list[Path] = field(default_factory=list)   # input files (never overwritten)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None        # the model file, when there is one

    @property
    def dtype(self) -> torch.dtype:
        if self.kind == "torch":
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if t.is_floating_point():
                    return t.dtype
        return torch.float32

    def example_input(self, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape, generator=gen).to(self.dtype)


def check_runnable(proto, source: str) -> None:
    """onnxruntime (when installed) must accept the model: it runs every check."""
    try:
        from repfuse.onnx.runtime import ort_reason, ort_session
    except ImportError:
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    try:
        ort_session(proto)
    except Exception as exc:
        text = ort_reason(exc)
        raise InputError(f"{source}: onnxruntime cannot load it ({text}); re-export it with "
                         "an opset, IR version and ops this onnxruntime supports") from None


def _pick_one(model_file, arch, factory, timm_name) -> str:
    given = [n for n, v in (("MODEL_FILE", model_file), ("--arch", arch),
                            ("--factory", factory), ("--timm", timm_name)) if v]
    if not given:
        raise click.UsageError("give a model: MODEL_FILE, --arch NAME, --factory MODULE:CALLABLE "
                               "or --timm NAME")
    if len(given) > 1:
        raise click.UsageError(f"give only one model source, not {' and '.join(given)}")
    return given[0]


def from_arch(name: str, seed: int, random_init: bool) -> nn.Module:
    from repfuse import models

    return models.create(name, seed=seed, realistic_bn=random_init)


def _import_factory(spec: str):
    if ":" not in spec:
        raise InputError(f"--factory {spec!r}: write it as MODULE:CALLABLE "
                         "(e.g. mypkg.nets:build or path/to/file.py:build)")
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise InputError(f"--factory {spec!r}: write it as MODULE:CALLABLE")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise InputError(f"--factory {spec!r}: file {target!r} does not exist")
        mod_name = f"repfuse_factory_{abs(hash(path.resolve()))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputError(f"--factory {spec!r}: cannot import {target!r} as Python code")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise InputError(f"--factory {spec!r}: importing {target!r} raised "
                             f"{type(exc).__name__}: {first_line(exc)}") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise InputError(f"--factory {spec!r}: no module named {exc.name!r}; check the name "
                             "or run from the directory that contains it") from None
        except Exception as exc:
            raise InputError(f"--factory {spec!r}: importing {target!r} raised "
                             f"{type(exc).__name__}: {first_line(exc)}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise InputError(f"--factory {spec!r}: {target!r} has no attribute {part!r}"
                             f"{close_matches(part, names)}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise InputError(f"--factory {spec!r}: {attr!r} is not callable")
    return fn


def from_factory(spec: str) -> nn.Module:
    fn = _import_factory(spec)
    try:
        model = fn()
    except Exception as exc:
        raise InputError(f"--factory {spec!r}: calling it raised {type(exc).__name__}: "
                         f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--factory {spec!r} returned a {type(model).__name__}, "
                         "not an nn.Module")
    return model


def from_timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise InputError("--timm needs timm, which is not installed; "
                         "pip install 'repfuse[timm]'") from None
    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r}{close_matches(name, timm.list_models())}")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise InputError(f"timm could not create {name!r}: {first_line(exc)}") from None


def _seeded(build, seed: int) -> nn.Module:
    """``build()`` under torch's global generator seeded with ``seed`` (its state restored
    afterwards): the initial weights of a timm or factory model are the same on every run,
    so two commands without --weights see the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _randomize(model: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    from repfuse.models.init import init_model

    calibration = (max(2, shape[0]), *shape[1:])
    try:
        init_model(lambda: model, seed=seed, realistic_bn=True, calibration_shape=calibration)
    except Exception as exc:
        text = f"{type(exc).__name__}: {first_line(exc)[:160]}"
        if _runs_in_eval_mode(model, calibration):
            raise InputError(f"the model runs in eval mode but fails with its batch norms in "
                             f"training mode ({text}), which the random weights' BatchNorm "
                             "calibration needs; pass --weights") from None
        raise InputError(f"the model does not run on an input of shape "
                         f"{','.join(map(str, shape))} ({text}); pass the right "
                         "--input-shape") from None


@torch.no_grad()
def _runs_in_eval_mode(model: nn.Module, shape: tuple[int, ...]) -> bool:
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        ref = next((t for t in model.parameters() if t.is_floating_point()), None)
        model(torch.zeros(shape, dtype=ref.dtype if ref is not None else torch.float32))
        return True
    except Exception:  # noqa: BLE001 - any failure: it does not
        return False
    finally:
        for m, flag in training:
            m.training = flag


def load_source(*, model_file=None, arch=None, factory=None, timm_name=None, weights=None,
                input_shape=None, trust_pickle=False, seed=0) -> Source:
    """Build or load the model the options name, with its weights, validated."""
    which = _pick_one(model_file, arch, factory, timm_name)
    files = [Path(p) for p in (model_file, weights) if p]
    if which == "MODEL_FILE":
        path = Path(model_file)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            if weights:
                raise click.UsageError("--weights cannot be used with an ONNX model file: "
                                       "its weights are inside it")
            proto, _ = load_onnx(path)
            check_runnable(proto, model_file)
            shape = onnx_input_shape(proto) or input_shape or DEFAULT_SHAPE
            source = Source("onnx", f"{path.name} (ONNX)", proto, tuple(shape), files, path=path)
            if input_shape and tuple(input_shape) != tuple(shape):
                source.notes.append("--input-shape is not used for an ONNX model: its checks "
                                    "use the shapes the file declares")
            return source
        if suffix == ".safetensors":
            raise InputError(f"{model_file} is a weights file, not a model; pass it as --weights "
                             "together with --arch, --factory or --timm")
        if suffix == ".pt2":
            program = load_exported_program(path, trust_pickle=trust_pickle)
            shape = input_shape or program_input_shape(program) or DEFAULT_SHAPE
            example = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
            model, label = program_module(program, example), f"{path.name} (torch.export)"
        else:
            model = load_pickled_module(path, trust_pickle=trust_pickle)
            shape = input_shape or DEFAULT_SHAPE
            label = f"{path.name} ({type(model).__name__}, pickled)"
        source = Source("torch", label, model, tuple(shape), files, path=path)
    else:
        shape = tuple(input_shape or DEFAULT_SHAPE)
        if which == "--arch":
            model = from_arch(arch, seed, random_init=weights is None)
            label = f"{arch} (repfuse.models)"
        elif which == "--factory":
            model = _seeded(lambda: from_factory(factory), seed)
            label = f"{factory} (factory)"
        else:
            model = _seeded(lambda: from_timm(timm_name), seed)
            label = f"{timm_name} (timm)"
        source = Source("torch", label, model, shape, files)
        if weights is None:
            if which != "--arch":
                _randomize(model, shape, seed)
            source.notes.append(f"no --weights given: seeded random weights (seed {seed}) with "
                                "realistic BatchNorm statistics")
    if weights is not None:
        load_checkpoint(source.model, weights, name=source.label, trust_pickle=trust_pickle,
                        notes=source.notes)
    set_eval(source.model)
    source.notes += check_model(source.model, source=source.label)
    if source.kind == "torch":
        probe(source, seed)
    return source


def set_eval(model: nn.Module) -> None:
    """Eval mode; modules unlifted from a ``torch.export`` program refuse ``.eval()`` (they
    keep the mode they were exported in), which is fine."""
    try:
        model.eval()
    except NotImplementedError:
        pass


@torch.no_grad()
def probe(source: Source, seed: int = 0) -> None:
    """Run the model once on the example input: a wrong --input-shape is an input error."""
    try:
        out = source.model(source.example_input(seed))
    except Exception as exc:
        shape = ",".join(map(str, source.input_shape))
        raise InputError(f"{source.label} does not run on an input of shape {shape} "
                         f"({type(exc).__name__}: {first_line(exc)[:160]}); "
                         "pass the right --input-shape") from None
    outs = out if isinstance(out, (tuple, list)) else [out]
    for t in outs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(
                torch.isfinite(t).all()):
            raise InputError(f"{source.label} gives non-finite outputs on a random input of "
                             "shape " + ",".join(map(str, source.input_shape))
                             + "; check the weights")
