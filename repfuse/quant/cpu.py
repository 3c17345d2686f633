"""Whether onnxruntime's uint8 x int8 kernels saturate on this CPU.

On x86-64 without VNNI instructions (AVX2 and AVX-512 machines without ``avx512_vnni`` or
``avx_vnni``), onnxruntime multiplies uint8 activations by int8 weights with an instruction
that adds two products in a signed 16-bit lane and clips the sum: weights that use the whole
int8 range (per output channel every channel reaches +-127) meet activations near 255 and
the result is clipped. onnxruntime's quantization guide advises ``reduce_range`` (7-bit
weights) on such machines. Measured on the test suite's digits RepVGG on an AMD EPYC with
AVX2 and no VNNI: per-channel INT8 output SQNR 11.0 dB with full-range weights, 26.2 dB
with ``reduce_range`` (accuracy 0.950 and 0.981; float 0.981).

Where the flags cannot be read (no ``/proc/cpuinfo``) or the machine is not x86-64, the
kernels are taken not to saturate.
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_flags", "u8s8_saturates"]

_X86 = ("x86_64", "amd64", "x64")
_VNNI = frozenset({"avx512_vnni", "avx_vnni"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first processor in ``cpuinfo`` (empty if unread)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def u8s8_saturates(machine: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """Whether uint8 x int8 products saturate in onnxruntime here: an x86-64 CPU whose
    flags are known and hold no VNNI extension."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in _X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and not (flags & _VNNI)
