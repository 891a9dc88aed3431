"""The malloc settings of ``btrdelta._malloc``, checked through glibc's own accounting
(``mallinfo2``: bytes held in mmapped chunks) in fresh interpreters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")

# frees a 16 MiB buffer (glibc then raises its mmap threshold to 16 MiB unless it is fixed),
# then holds a 1 MiB one: prints the bytes in mmapped chunks with and without it held
_PROBE = r"""
import ctypes, sys
from btrdelta import _malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
setting = sys.argv[1]
if setting != "none":
    assert getattr(_malloc, setting)()
big = bytearray(16 << 20)
del big
before = libc.mallinfo2().hblkhd
held = bytearray(1 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_growth(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, setting], capture_output=True,
                         text=True, check=True)
    return int(out.stdout)


def test_return_freed_memory_keeps_large_buffers_in_their_own_mmap() -> None:
    # glibc's default: after a 16 MiB free, a 1 MiB buffer comes from the heap, where a
    # fragmented heap keeps it after it is freed
    assert _mmapped_growth("none") == 0
    # fixed 256 KiB threshold: the 1 MiB buffer is an mmap of its own (returned on free)
    assert _mmapped_growth("return_freed_memory") >= 1 << 20


def test_keep_freed_memory_serves_large_buffers_from_the_heap() -> None:
    assert _mmapped_growth("keep_freed_memory") == 0
