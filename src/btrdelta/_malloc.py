"""Keep freed buffers in the process instead of giving them back to the kernel (floor 0).

glibc's malloc serves a request of 128 KiB or more (the threshold moves up with use) with a
fresh ``mmap`` and returns it with ``munmap`` when freed, and gives the top of its heap back
to the kernel once more than twice that is free. Every such buffer then costs a page fault
per 4 KiB page when it is first written: on a virtual machine that is about 10 µs a page,
so a loop that makes one 128 KiB ``bytes`` per read (a send's WRITE records, a pipe's
``read``) runs at ~400 MiB/s whatever it does with the bytes. :func:`keep_freed_memory`
raises both limits once, for processes that stream data through Python objects
(``replicate`` and its ``--serve`` side): buffers up to 32 MiB come from the heap and freed
ones are reused without a fault. The peak memory is the same; memory freed after it stays
with the process (up to ``trim`` bytes) until it exits.

Owns only this setting. On a C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_MMAP_MAX = 32 << 20


def keep_freed_memory(trim: int = 256 << 20) -> bool:
    """Serve buffers up to 32 MiB from the heap and keep up to ``trim`` freed bytes there.

    Returns whether the C library took the setting (False off glibc).
    """
    try:  # (not platform.libc_ver and ctypes.util: their imports cost 30 ms of CPU)
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, ValueError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) and mallopt(_M_TRIM_THRESHOLD, trim))
