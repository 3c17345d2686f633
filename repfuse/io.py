"""Output files: path checks, atomic writes, and the writers for each output format.

Every output is written to a temporary file in the destination's directory and moved into
place with ``os.replace``, so a reader never sees a half-written file and a failure leaves
nothing behind. An input file is never an output, even when overwriting is allowed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from repfuse.errors import InputError

OUTPUT_FORMATS = {
    ".onnx": "ONNX model",
    ".pt2": "torch.export program",
    ".safetensors": "state dict (safetensors)",
    ".pt": "state dict (torch.save)",
    ".pth": "state dict (torch.save)",
}


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (same path, link, or hard link)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def output_format(path: str | os.PathLike, allowed: Iterable[str] | None = None) -> str:
    """The output format picked by ``path``'s suffix (``".onnx"``, ``".pt2"``, ...)."""
    suffix = Path(path).suffix.lower()
    allowed = list(allowed) if allowed is not None else list(OUTPUT_FORMATS)
    if suffix not in allowed:
        raise InputError(
            f"output {os.fspath(path)!r}: unknown format {suffix or '(no suffix)'}; "
            f"use one of {', '.join(allowed)}")
    return suffix


def check_output_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      force: bool = False) -> Path:
    """Refuse an output that is one of ``inputs``, a directory, or exists without ``force``."""
    out = Path(path)
    for item in inputs:
        if item is not None and same_file(out, item):
            raise InputError(
                f"output {os.fspath(out)!r} is the input file {os.fspath(item)!r}; "
                "repfuse never overwrites its input, choose another output path")
    if out.is_dir():
        raise InputError(f"output {os.fspath(out)!r} is a directory; give a file name")
    if (out.exists() or out.is_symlink()) and not force:
        raise InputError(f"output {os.fspath(out)!r} already exists; pass --force to replace it")
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"output {os.fspath(out)!r}: {os.fspath(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"output {os.fspath(out)!r}: cannot write in {os.fspath(ancestor)!r}")
    return out


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent directories of ``path``; return those created (deepest last)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(f"cannot create directory {os.fspath(d)!r}: {exc.strerror}") from exc
        created.append(d)
    return created


def _file_mode(path: Path) -> int:
    """The mode a new file gets (0o666 minus the umask), or the replaced file's mode."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *,
                 force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    The temporary file keeps ``path``'s suffix (writers that look at it still work). On any
    failure the temporary file, and the directories this call created, are removed.
    """
    inputs = list(inputs)
    out = check_output_path(path, inputs=inputs, force=force)
    created = _make_parents(out)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{out.suffix}",
                                    dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(out))
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise InputError(f"writing {os.fspath(out)!r} produced no data")
        check_output_path(out, inputs=inputs, force=force)   # nothing appeared meanwhile
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return out


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as independent, contiguous CPU tensors (no shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def write_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict to ``path`` (not atomic: pass this to ``atomic_write``)."""
    path = Path(path)
    fmt = path.name.rsplit(".", 1)[-1].lower()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, os.fspath(path), metadata={"format": "pt", "producer": "repfuse"})
    else:
        torch.save(state_dict, path)


def export_program(module: torch.nn.Module, example_inputs: tuple, *,
                   dynamic_batch: bool = True):
    """``torch.export`` the module; with ``dynamic_batch`` the first dimension of every input
    is symbolic (traced on a batch of at least 2: torch specialises sizes 0 and 1)."""
    if dynamic_batch:
        args = tuple(a.repeat(2, *([1] * (a.dim() - 1))) if isinstance(a, torch.Tensor)
                     and a.dim() > 0 and a.shape[0] == 1 else a for a in example_inputs)
        dims = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0
                     else None for a in args)
        try:
            return torch.export.export(module, args, dynamic_shapes=dims)
        except Exception:
            pass
    return torch.export.export(module, tuple(example_inputs))


def write_exported_program(module: torch.nn.Module, example_inputs: tuple,
                           path: str | os.PathLike, *, dynamic_batch: bool = True) -> None:
    """``torch.export`` the module on ``example_inputs`` and save the program to ``path``."""
    program = export_program(module, example_inputs, dynamic_batch=dynamic_batch)
    torch.export.save(program, os.fspath(path))


def write_onnx_proto(model, path: str | os.PathLike) -> None:
    """Save an ``onnx.ModelProto`` to ``path`` as one self-contained file."""
    import onnx

    onnx.save_model(model, os.fspath(path))
