"""Checkpoints: safe loading, unwrapping, validation, and loading into a model.

``.pth`` / ``.pt`` files are read with ``torch.load(weights_only=True)``: a pickle that needs
anything beyond tensors and plain containers is refused unless the caller explicitly trusts
the file. ``.safetensors`` files are read with safetensors (no code can run).
"""

from __future__ import annotations

import difflib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from repfuse.errors import InputError, UnsafeInputError, first_line
from repfuse.io.pickles import plain_pickle_globals

#: Keys under which training scripts nest the weights, best first (EMA weights preferred).
NESTED_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module", "net",
               "network", "params", "weights")
PREFIXES = ("module.", "_orig_mod.", "model.", "ema.")


def unsafe_global(exc: BaseException) -> str | None:
    """The Python global a refused pickle asks for (``"posix.system"``), or None when the
    refusal was not about a global (random or corrupt bytes)."""
    text = str(exc)
    i = text.find("GLOBAL ")
    if i < 0:
        return None
    return text[i + len("GLOBAL "):].split()[0].rstrip(".,:") if text[i + 7:].split() else "?"


def read_pickle_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False):
    """``torch.load`` with ``weights_only=True`` (``False`` only when ``trust_pickle``); a
    plain pickle (``pickle.dump``, not ``torch.save``) is named as such, and read with
    ``pickle.load`` only when ``trust_pickle``."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{os.fspath(path)!r} is empty (0 bytes); not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=False)
    except pickle.UnpicklingError as exc:
        name = None if trust_pickle else unsafe_global(exc)
        if name is None:
            return _plain_pickle(path, trust_pickle)
        raise UnsafeInputError(
            f"{os.fspath(path)!r}: refused to unpickle arbitrary objects (it references "
            f"{name}); "
            "loading it could run code from the file. Pass --trust-pickle only if you trust "
            "its source", imports=[name]) from None
    except (EOFError, zipfile.BadZipFile):
        raise InputError(f"{os.fspath(path)!r} is truncated or not a checkpoint; "
                         "re-download or re-save it") from None
    except (RuntimeError, ValueError, OSError, TypeError, KeyError, AttributeError,
            IndexError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        if plain_pickle_globals(path) is not None:
            return _plain_pickle(path, trust_pickle)
        raise InputError(f"{os.fspath(path)!r} is not a readable checkpoint, it is truncated or "
                         f"corrupt ({first_line(exc, 100)})") from None


def _plain_pickle(path: Path, trust_pickle: bool):
    """A file ``torch.load`` refused: a plain pickle is named with what it imports (and
    read when trusted); anything else is not a checkpoint."""
    names = plain_pickle_globals(path)
    if names is None:
        raise InputError(f"{os.fspath(path)!r} is not a readable checkpoint "
                         "(corrupt or not a torch/pickle file)")
    if not trust_pickle:
        own = [n for n in names if not n.startswith(("torch.", "collections.", "builtins."))]
        shown = ", ".join((own or names)[:3])
        raise UnsafeInputError(
            f"{os.fspath(path)!r} is a plain pickle (pickle.dump, not torch.save) that "
            f"imports {shown}; unpickling it could run code from the file. Pass "
            "--trust-pickle only if you trust its source", imports=own or names)
    with open(path, "rb") as f:
        return pickle.load(f)   # noqa: S301 - trusted by the caller (--trust-pickle)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (header and offsets validated by safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{os.fspath(path)!r} is empty (0 bytes); not a safetensors file")
    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as exc:   # safetensors raises its own SafetensorError and others
        raise InputError(f"{os.fspath(path)!r} is not a valid safetensors file: "
                         f"{first_line(exc)}") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(obj, *, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights in a loaded checkpoint: a flat tensor dict, or nested under a usual key
    (``state_dict_ema``, ``model_ema``, ``ema``, ``state_dict``, ``model``, ...; EMA weights
    first, as timm does). Returns ``(state_dict, where)`` with ``where`` like ``"['model']"``."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), ""
    if _is_tensor_dict(obj):
        return dict(obj), ""
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            inner = obj.get(key) if all(isinstance(k, str) for k in obj) else None
            if isinstance(inner, (nn.Module, Mapping)):
                try:
                    found, where = find_state_dict(inner, source=source)
                except InputError:
                    continue
                return found, f"[{key!r}]{where}"
        # A dict of tensors mixed with metadata (e.g. {"epoch": 3, "conv.weight": ...}).
        tensors = {k: v for k, v in obj.items() if isinstance(k, str)
                   and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, ""
        odd = next(((k, v) for k, v in obj.items() if isinstance(k, str) and "." in k
                    and not isinstance(v, (Mapping, nn.Module))), None)
        if odd is not None:
            raise InputError(f"{source}: entry {odd[0]!r} is a {type(odd[1]).__name__}, not a "
                             "tensor; give a state dict of tensors")
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise InputError(f"{source}: found no weights (top-level keys: {keys or 'none'}); "
                         f"expected tensors or one of the keys {', '.join(NESTED_KEYS[:5])}")
    raise InputError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")


def extract_state_dict(obj, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint (see ``find_state_dict``)."""
    return find_state_dict(obj, source=source)[0]


def strip_prefixes(state_dict: dict[str, torch.Tensor],
                   model_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.`` from DataParallel, ``_orig_mod.`` from compile, ...)
    shared by every key, as long as that makes more keys match ``model_keys`` (when given)."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                stripped = {k[len(prefix):]: v for k, v in state_dict.items()}
                if model_keys is not None and (len(set(stripped) & model_keys)
                                               < len(set(state_dict) & model_keys)):
                    continue
                state_dict, changed = stripped, True
                break
    return state_dict


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                    notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (CPU); where the weights
    were nested is appended to ``notes`` when given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {os.fspath(path)!r} does not exist or is not a file")
    if path.suffix.lower() == ".safetensors":
        obj = read_safetensors(path)
    else:
        obj = read_pickle_checkpoint(path, trust_pickle=trust_pickle)
    state_dict, where = find_state_dict(obj, source=os.fspath(path))
    if where and notes is not None:
        notes.append(f"{os.fspath(path)}: using the weights under {where}")
    return state_dict


def check_finite(state_dict: Mapping[str, torch.Tensor], *, source: str = "weights") -> None:
    """Refuse NaN or infinite values in floating-point tensors, naming the first bad one."""
    for name, t in state_dict.items():
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                n = int(bad.sum())
                kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
                raise InputError(f"{source}: {name} has {n} {kind} value(s) of {t.numel()}; "
                                 "the checkpoint is corrupt or diverged, fuse a healthy one")


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_batchnorm(model: nn.Module) -> list[str]:
    """Refuse batch norms with a negative running variance, or one where ``var + eps <= 0``
    (the fused scale would be NaN or infinite); return notes on zero variances.

    A variance of exactly zero is legitimate: the statistics of a dead channel decay
    geometrically and underflow to 0 in a long training run (and calibration on data gives 0
    for a constant channel); ``var + eps`` is then still positive and the fold is exact.
    """
    notes = []
    for name, m in model.named_modules():
        if isinstance(m, _NORMS) and m.track_running_stats and m.running_var is not None:
            var = m.running_var.detach()
            where = name or "(model)"
            negative = var < 0
            if bool(negative.any()):
                raise InputError(
                    f"BatchNorm {where}: running_var is negative in {int(negative.sum())} of "
                    f"{var.numel()} channels (min {float(var.min()):g}); a variance cannot be "
                    "negative, the checkpoint is corrupt")
            if bool((var.double() + m.eps <= 0).any()):
                raise InputError(
                    f"BatchNorm {where}: running_var + eps is 0 in "
                    f"{int((var.double() + m.eps <= 0).sum())} channels (eps={m.eps:g}); "
                    "folding it would divide by zero, check the checkpoint")
            zero = int((var == 0).sum())
            if zero:
                notes.append(f"BatchNorm {where}: running_var is 0 in {zero} of {var.numel()} "
                             f"channel(s) (dead channels); folded exactly with eps={m.eps:g}")
    return notes


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _listing(label: str, items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
    return f"{len(items)} {label} ({shown})"


def match_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]
                     ) -> tuple[list[str], list[str], list[str]]:
    """Keys missing from ``state_dict``, keys unexpected by ``model``, and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected
                  and not k.endswith("num_batches_tracked")]
    misshaped = [f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(expected[k])}"
                 for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    return missing, unexpected, misshaped


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                 source: str = "checkpoint", model_name: str = "the model") -> list[str]:
    """Load ``state_dict`` into ``model`` strictly; return notes (e.g. dtype conversions).

    Mismatches raise ``InputError`` listing a few missing / unexpected / mis-shaped keys and
    their counts. Tensors are cast to the model's dtypes (float16 / bfloat16 checkpoints load
    into a float32 model; the note says so).
    """
    state_dict = strip_prefixes(dict(state_dict), set(model.state_dict()))
    missing, unexpected, misshaped = match_state_dict(model, state_dict)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(_listing("missing", missing))
        if unexpected:
            parts.append(_listing("unexpected", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped", misshaped, limit=2))
        raise InputError(f"{source} does not match {model_name}: " + "; ".join(parts)
                         + "; check the architecture or the checkpoint")
    check_finite(state_dict, source=source)
    expected = model.state_dict()
    dtypes = sorted({str(v.dtype).replace("torch.", "") for k, v in state_dict.items()
                     if k in expected and v.is_floating_point()
                     and v.dtype != expected[k].dtype})
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    notes = []
    if dtypes:
        target = next(v.dtype for v in expected.values() if v.is_floating_point())
        notes.append(f"{source}: {'/'.join(dtypes)} tensors converted to "
                     f"{str(target).replace('torch.', '')} (the model's dtype)")
    return notes


def load_checkpoint(model: nn.Module, checkpoint, *, name: str | None = None,
                    trust_pickle: bool = False, notes: list[str] | None = None) -> nn.Module:
    """Load ``checkpoint`` into ``model`` and return ``model``: the one checkpoint loader
    behind the API, the CLI and ``repfuse.models``.

    ``checkpoint``: a path to a ``.pth`` / ``.pt`` file (read with ``weights_only=True``
    unless ``trust_pickle``) or ``.safetensors`` file, a state dict, a dict holding one under
    a usual key (EMA weights first, see ``find_state_dict``), or a module. Wrapper prefixes
    (``module.``, ``_orig_mod.``, ...) are removed. Any missing, unexpected or mis-shaped key
    raises ``InputError`` naming a few of each with their counts, before anything is
    copied; notes (where the weights were nested, dtype conversions) go to ``notes``."""
    what = name or type(model).__name__
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        state_dict = read_checkpoint(checkpoint, trust_pickle=trust_pickle, notes=notes)
    else:
        source = "checkpoint"
        state_dict, where = find_state_dict(checkpoint, source=source)
        if where and notes is not None:
            notes.append(f"{source}: using the weights under {where}")
    found = load_weights(model, state_dict, source=source, model_name=what)
    if notes is not None:
        notes.extend(found)
    return model


def check_model(model: nn.Module, *, source: str = "model") -> list[str]:
    """Validate a model's own tensors: finite parameters/buffers, sane BN statistics.
    Returns notes (e.g. zero BN variances)."""
    check_finite(model.state_dict(), source=source)
    return check_batchnorm(model)


def close_matches(name: str, names: list[str], n: int = 4) -> str:
    """``" (did you mean a, b?)"`` or an empty string."""
    found = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return f" (did you mean {', '.join(found)}?)" if found else ""
