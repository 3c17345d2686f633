"""The only atomic writer: output path checks and atomic writes.

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

from repfuse.errors import InputError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (same path, link, or hard link)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


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
