"""The console script's allocator setting: freed large buffers stay in the process
(glibc), and ``REPFUSE_SYSTEM_MALLOC=1`` keeps glibc's defaults. Run in subprocesses so
the test process keeps its own allocator."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the setting exists only for glibc")

PROBE = """
import resource, sys
from repfuse.cli.allocator import keep_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

took = keep_freed_memory()
before = rss_mib()
block = bytearray(256 * 2**20)   # touched (zero-filled) memory
del block
print(took, round(rss_mib() - before))
"""


def run_probe(**env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_stays_in_the_process():
    took, kept = run_probe()
    assert took
    assert kept >= 200, f"only {kept} MiB of a freed 256 MiB block stayed resident"


def test_system_malloc_opt_out_returns_memory():
    took, kept = run_probe(REPFUSE_SYSTEM_MALLOC="1")
    assert not took
    assert kept < 64, f"{kept} MiB stayed resident with glibc's defaults"
