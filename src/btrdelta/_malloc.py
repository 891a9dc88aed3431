"""Process-wide memory settings: freed buffers kept or given back, huge pages (floor 0).

glibc's malloc serves a request of 128 KiB or more (the threshold moves up with use) with a
fresh ``mmap`` and returns it with ``munmap`` when freed, and gives the top of its heap back
to the kernel once more than twice that is free. Every such buffer then costs a page fault
per 4 KiB page when it is first written: on a virtual machine that is about 10 µs a page,
so a loop that makes one 128 KiB ``bytes`` per read (a send's WRITE records, a pipe's
``read``) runs at ~400 MiB/s whatever it does with the bytes. :func:`keep_freed_memory`
raises both limits once, for processes that stream data through Python objects
(``replicate`` and its ``--serve`` side): buffers up to 32 MiB come from the heap and freed
ones are reused without a fault. The peak memory is the same; memory freed after it stays
with the process (up to ``trim`` bytes) until it exits. ``btrdelta send`` takes it too, with
8 MiB kept, through the stream accelerator's ``mallopt``: a small ``--from-sendshot`` reads,
decompresses and patches its base record in buffers of 0.1-1.4 MiB, each a fresh ``mmap``
with glibc's threshold (~500 page faults of ~2,500 after its imports; measured in
docs/performance.md, session 19).

:func:`return_freed_memory` is the opposite choice, for processes whose peak memory is the
goal (``delta make``, the delta jobs of ``repo add``): glibc raises its mmap threshold each
time a large buffer is freed (up to 32 MiB), after which whole files read for diffing come
from the heap, and a heap fragmented by them is not given back; a fixed threshold of 256 KiB
keeps every large buffer an ``mmap`` of its own that goes back to the kernel when freed.
Measured on the Debian upgrade pair (``delta make``, largest file 3.8 MB): peak RSS 106 ->
77 MB, CPU time unchanged.

Beside either, :func:`huge_pages` is for a short process that is mostly its start-up:
a fresh anonymous page costs a page fault when first written (~1.2 us here, against ~0.06 us
a 4 KiB page in a 2 MiB transparent huge page). ``btrdelta send`` takes it first thing
(``btrdelta.__main__``, before the CLI's imports): pymalloc's arenas and the top of glibc's
heap come from regions advised ``MADV_HUGEPAGE`` (the C module ``btrdelta._hugepages``;
where it is not built, nothing changes). Measured on the small in-place round of
``benchmarks sendshot`` (read-only ``send --from-sendshot latest --record``, 20 alternated
runs, load ~0.7): 3,676 -> 1,714 page faults, CPU 47.6 -> 44.1 ms, wall 44.8 -> 41.8 ms,
peak RSS 21.8 -> 25.7 MB (memory is taken 2 MiB at a time where touched).

Owns only these settings. On a C library other than glibc they do nothing (but for
:func:`huge_pages`' arenas, which are Python's).
"""

from __future__ import annotations

import os

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["give_back_freed_memory", "huge_pages", "keep_freed_memory", "return_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc's largest allowed mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_MMAP_MAX = 32 << 20


def _mallopt(settings: tuple[tuple[int, int], ...],
             call: Callable[[int, int], bool] | None = None) -> bool:
    try:  # (not platform.libc_ver and ctypes.util: their imports cost 30 ms of CPU)
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (OSError, ValueError):
        return False
    if call is not None:  # (a C module's: importing ctypes costs ~1.4 ms of CPU, 86 faults)
        return all(call(param, value) for param, value in settings)
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) for param, value in settings)


def keep_freed_memory(trim: int = 256 << 20, *,
                      mallopt: Callable[[int, int], bool] | None = None) -> bool:
    """Serve buffers up to 32 MiB from the heap and keep up to ``trim`` freed bytes there.
    ``mallopt``: glibc's, as a C module gives it (``btrdelta.stream._speedups.mallopt``),
    else ``ctypes``' is used.

    Returns whether the C library took the setting (False off glibc).
    """
    return _mallopt(((_M_MMAP_THRESHOLD, _MMAP_MAX), (_M_TRIM_THRESHOLD, trim)), mallopt)


def give_back_freed_memory() -> bool:
    """Give the memory freed in every arena back to the kernel now (glibc's
    ``malloc_trim(0)``): a process that keeps freed memory (:func:`keep_freed_memory`) and
    then waits, as ``replicate --every`` between its rounds (else each new thread's arena
    keeps what its round freed: 25 MB after the first round, 88 MB after the 40th, then no
    more, on a 40-file tree).

    Returns whether the C library had it (False off glibc).
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (OSError, ValueError):
        return False
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def one_arena(mallopt: Callable[[int, int], bool]) -> bool:
    """Have every thread allocate from the heap's one arena (``M_ARENA_MAX`` 1), not one of
    its own: memory in huge pages (:func:`huge_pages`) rather than in fresh 4 KiB pages
    (a thread of its own that inflated a 10 MB record: ~2,500 page faults more). Set it
    before the threads allocate; glibc does not go back on it.

    Returns whether the C library took the setting (False off glibc).
    """
    return _mallopt(((_M_ARENA_MAX, 1),), mallopt)


def return_freed_memory(threshold: int = 256 << 10) -> bool:
    """Serve every buffer of ``threshold`` bytes or more with an ``mmap`` of its own (a
    fixed threshold: glibc no longer raises it), so freeing it returns it to the kernel.

    Returns whether the C library took the setting (False off glibc).
    """
    return _mallopt(((_M_MMAP_THRESHOLD, threshold),))


def huge_pages(arenas: int = 64 << 20, heap: int = 32 << 20) -> bool:
    """Put pymalloc's next arenas (up to ``arenas`` bytes of them) and the next ``heap``
    bytes of glibc's heap in transparent huge pages (``btrdelta._hugepages``: the regions
    advised ``MADV_HUGEPAGE``; the heap grows ``heap`` bytes ahead, ``M_TOP_PAD``). Call it
    once, before the imports: arenas made before stay as they are.

    Huge pages only where they are cheap (``_hugepages``' notes): none where the kernel has
    no free block of 2 MiB (each fault would compact memory first), and 4 KiB pages for the
    rest once a huge page took more than 1 ms of CPU time to fault (compaction, or a virtual
    machine's free blocks handed back to its host); the heap's first 4 MiB are faulted in
    at once (the rest as it is used).

    Returns whether the arenas took it (False: the module is not built, the kernel has no
    transparent huge pages or too few free blocks of one, or it was called already).
    """
    try:
        from . import _hugepages
    except ImportError:
        return False
    took: bool = _hugepages.arenas(arenas)
    if took:
        _hugepages.heap(heap)
    return took
