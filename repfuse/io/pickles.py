"""Plain pickle files (``pickle.dump``, not ``torch.save``): recognised and described
without running them."""

from __future__ import annotations

import os
import pickletools
from pathlib import Path

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
            "BINSTRING", "SHORT_BINSTRING"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


def plain_pickle_globals(path: str | os.PathLike, limit: int = 1 << 20) -> list[str] | None:
    """The Python globals (``module.name``) a plain pickle stream imports, in order of first
    use, or None when ``path`` does not start with a pickle that imports any (a zip file,
    torch's legacy format, random bytes). The opcodes are read with ``pickletools``:
    nothing in the file is executed."""
    with open(Path(path), "rb") as f:
        if f.read(1) != b"\x80":          # PROTO: a pickle of protocol 2 or later
            return None
        f.seek(0)
        names: dict[str, None] = {}
        memo: dict = {}
        recent: list = []                 # values of the last two pushes (strings or None)
        try:
            for i, (op, arg, _) in enumerate(pickletools.genops(f)):
                if i >= limit or op.name == "STOP":
                    break
                value = None
                if op.name in _STRINGS:
                    value = arg
                elif op.name in _GETS:
                    value = memo.get(arg)
                elif op.name in _PUTS:
                    memo[arg] = recent[-1] if recent else None
                    continue
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                    continue
                elif op.name == "GLOBAL":
                    names.setdefault(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(recent) == 2 and None not in recent:
                    names.setdefault(".".join(recent))
                recent = (recent + [value])[-2:]
        except (ValueError, EOFError, UnicodeDecodeError):
            return None
    return list(names) or None
