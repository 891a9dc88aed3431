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


_SETTING = (
    "import sys\nfrom btrdelta import _malloc\nfrom btrdelta.stream import _speedups\n"
    "print(_malloc.keep_freed_memory({args}), 'ctypes' in sys.modules)"
)


def test_the_settings_are_made_without_ctypes_with_the_accelerator_s_mallopt() -> None:
    """Importing ctypes to call mallopt cost a short command ~1.4 ms of CPU: the stream
    accelerator's ``mallopt`` is called where it is given; else ctypes' (the same)."""
    pytest.importorskip("btrdelta.stream._speedups")
    for args, want in (("mallopt=_speedups.mallopt", "True False"), ("", "True True")):
        out = subprocess.run([sys.executable, "-c", _SETTING.format(args=args)],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == want
    # the accelerator's setting is glibc's: a fixed 256 KiB threshold (the default would
    # have risen to 16 MiB with the free) makes the 1 MiB buffer an mmap of its own
    probe = _PROBE.replace("assert getattr(_malloc, setting)()",
                           "from btrdelta.stream._speedups import mallopt\n"
                           "assert mallopt(-3, 256 << 10)")
    out = subprocess.run([sys.executable, "-c", probe, "accelerator"], capture_output=True,
                         text=True, check=True)
    assert int(out.stdout) >= 1 << 20


def test_a_send_keeps_its_freed_buffers(tmp_path: object,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``btrdelta send`` serves its buffers from the heap and keeps 8 MiB of freed ones:
    a small --from-sendshot read, decompressed and patched its base record in fresh
    mmaps (~500 page faults of its ~2,500 after the imports)."""
    from pathlib import Path

    from btrdelta.cli import main, send_cmd

    pytest.importorskip("btrdelta.stream._speedups")
    calls: list[int] = []
    monkeypatch.setattr(send_cmd, "keep_freed_memory",
                        lambda trim, mallopt: calls.append(trim) or mallopt is not None)
    src = Path(str(tmp_path)) / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    assert main(["send", str(src), "-o", str(Path(str(tmp_path)) / "s"), "-q"]) == 0
    assert calls == [8 << 20]


def _thp_mode() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``); skips
    where the kernel has none (``madvise(MADV_HUGEPAGE)`` is refused there)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except FileNotFoundError:
        pytest.skip("no transparent huge pages in this kernel")
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "never"


# a probe's first lines: the process's huge pages; whether the mapping holding an address
# is advised MADV_HUGEPAGE (``hg`` among its VmFlags, or ``nh``: MADV_NOHUGEPAGE; what the
# advice leaves, whatever the kernel then gives); and the huge pages the kernel gives,
# now, to a region of 6 MiB (two aligned 2 MiB pages at least) advised so and written
# whole without btrdelta: fewer than
# two where memory is too fragmented and the defrag setting does not compact in the fault,
# or where THP is disabled for the process (prctl, a container's policy)
_PRELUDE = r"""
import mmap

def huge():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")) << 10

def advised(flag="hg"):
    ranges = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
            elif head == "VmFlags:" and flag in line.split()[1:]:
                ranges.append((lo, hi))
    return ranges

def inside(addrs, flag="hg"):
    ranges = advised(flag)
    return sum(any(lo <= a < hi for lo, hi in ranges) for a in addrs)

def control():
    region = mmap.mmap(-1, 6 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    at = huge()
    region.write(bytes(6 << 20))
    got = huge() - at
    region.close()
    return got
"""


def _huge_pages_given(control: int) -> bool:
    """Whether the kernel gave the control regions (one before, one after the probe's
    own) their huge pages: else a probe's growth in huge pages says nothing of btrdelta."""
    return control >= 4 << 20


# the arenas from a region of 4 MiB (4 of pymalloc's 1 MiB arenas), then ~35 MiB of small
# objects (the others from mmap, as before), all freed (the region's given back, the others
# unmapped) and made again (the region's cut again): prints the huge pages' growth while the
# first objects lived, whether every object made again holds what it was made with, how
# many of the first objects lay in an advised mapping, and the controls' huge pages
_ARENAS = _PRELUDE + r"""
import sys
from btrdelta import _hugepages

first = control()
before = huge()
assert _hugepages.arenas(4 << 20, 10**15, 0)  # (none slow; whatever memory is free)
assert not _hugepages.arenas(4 << 20, 10**15, 0)  # once
keep = [(i, str(i)) for i in range(300_000)]
grew = huge() - before
held = inside([id(o) for pair in keep for o in pair])
del keep
keep = [(i, str(i)) for i in range(300_000)]
print(grew, all(int(s) == i for i, s in keep), len(keep), held, min(first, control()))
sys._debugmallocstats()
"""


def test_huge_pages_arenas_cut_given_back_and_cut_again() -> None:
    pytest.importorskip("btrdelta._hugepages")
    mode = _thp_mode()
    proc = subprocess.run([sys.executable, "-c", _ARENAS], capture_output=True, text=True,
                          check=True)
    grew, intact, n, held, control = proc.stdout.split()
    assert intact == "True"
    assert n == "300000"
    # the region's arenas (4 MiB: ~70,000 of the objects) were cut and used (~52,000 here)
    assert int(held) >= 35_000
    stats = {k.strip("# "): int(v) for k, v in (line.rsplit("=", 1) for line in
             proc.stderr.splitlines() if line.startswith("# arenas"))}
    assert stats["arenas reclaimed"] >= 30  # the first objects' arenas were freed (both kinds)
    if mode != "never" and _huge_pages_given(int(control)):
        assert int(grew) >= 2 << 20, control  # the region's arenas in huge pages


# a 3 MiB block freed first raises glibc's trim threshold to 6 MiB (its dynamic mmap
# threshold), so the ~5 MiB freed next stay at the heap's top: heap() must grow the heap
# all the same (it gave 0 there, once in CI). Prints too whether brk moves at all here
# (sbrk(0) before and after 64 MiB of 64 KiB blocks): where it does not, glibc maps its
# memory and nothing can be advised; how many of two addresses in the 8 MiB buffer's second
# half lie in an advised mapping; the controls' huge pages.
_HEAP = _PRELUDE + r"""
import ctypes
from btrdelta import _hugepages, _malloc

first = control()
block = bytearray(3 << 20)
del block
blocks = [bytearray(100 << 10) for _ in range(50)]
del blocks
advised_bytes = _hugepages.heap(32 << 20)
_malloc.keep_freed_memory()  # (buffers up to 32 MiB from the heap, as a send has them)
before = huge()
buf = bytearray(8 << 20)  # written whole (zeros)
grew = huge() - before
at = ctypes.addressof((ctypes.c_char * 1).from_buffer(buf))
held = inside([at + (4 << 20), at + (8 << 20) - 1])  # (its start: maybe below the aligned part)
sbrk = ctypes.CDLL(None).sbrk
sbrk.restype = ctypes.c_void_p
top = sbrk(0)
more = [bytearray(64 << 10) for _ in range(1024)]
print(advised_bytes, grew, sbrk(0) != top, held, min(first, control()))
"""


def test_huge_pages_heap_grows_ahead_in_huge_pages() -> None:
    pytest.importorskip("btrdelta._hugepages")
    mode = _thp_mode()
    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True,
                         check=True).stdout.split()
    advised, grew, brk_moves, held = int(out[0]), int(out[1]), out[2] == "True", int(out[3])
    if not advised and not brk_moves:
        pytest.skip("brk does not grow the heap here: glibc maps its memory instead")
    assert 28 << 20 <= advised <= 32 << 20  # the next 32 MiB, but the unaligned ends
    assert held == 2  # the buffer's second half is cut from the advised part
    if mode != "never" and _huge_pages_given(int(out[4])):
        assert grew >= 6 << 20, out


# the arenas' region taken (none slow), then the heap advised: prints the huge pages its
# advice faulted in at once, the bytes advised, and the controls' huge pages
_HEAP_FAULTED = _PRELUDE + r"""
from btrdelta import _hugepages

first = control()
assert _hugepages.arenas(8 << 20, 10**15, 0)
before = huge()
advised_bytes = _hugepages.heap(32 << 20)
print(huge() - before, advised_bytes, min(first, control()))
"""


def test_huge_pages_heap_faults_only_what_every_send_writes() -> None:
    """``heap`` faults in (and times) the first 4 MiB of the heap's advised part, two huge
    pages, not more: a small ``send --from-sendshot`` round writes 4-8 MiB of its heap,
    and the 16 MiB faulted before zeroed 4-6 huge pages it never used (~0.1 ms each, ~0.65
    ms on a VM whose free blocks went back to its host)."""
    pytest.importorskip("btrdelta._hugepages")
    mode = _thp_mode()
    faulted, advised_bytes, control = (int(x) for x in subprocess.run(
        [sys.executable, "-c", _HEAP_FAULTED], capture_output=True, text=True,
        check=True).stdout.split())
    if not advised_bytes:
        pytest.skip("brk does not grow the heap here: glibc maps its memory instead")
    # (with THP "always" the heap's growth itself may take one huge page where glibc
    # writes a chunk's header)
    assert faulted <= (6 << 20 if mode == "always" else 4 << 20), faulted
    if mode != "never" and _huge_pages_given(control):
        assert faulted >= 2 << 20, (faulted, control)


# the arenas from a region of 8 MiB whose huge pages count as slow past SLOW_NS of CPU time
# to fault, and the heap advised, then ~20 MiB of small objects and an 8 MiB buffer: prints
# whether it declined, how many objects lie in mappings advised MADV_HUGEPAGE and
# MADV_NOHUGEPAGE (``nh``), the same for two addresses in the buffer's second half, and
# whether every object holds what it was made with
_DECLINE = _PRELUDE + r"""
import ctypes, sys
from btrdelta import _hugepages, _malloc

first = control()
assert _hugepages.arenas(8 << 20, int(sys.argv[1]), 0)
at_heap = huge()
advised_bytes = _hugepages.heap(32 << 20) if sys.argv[2] == "heap" else 0
heap_grew = huge() - at_heap  # (faulted in by heap() itself, after arenas())
_malloc.keep_freed_memory()
keep = [(i, str(i)) for i in range(200_000)]
addrs = [id(o) for pair in keep for o in pair]
buf = bytearray(8 << 20)
at = ctypes.addressof((ctypes.c_char * 1).from_buffer(buf))
ends = [at + (4 << 20), at + (8 << 20) - 1]
print(_hugepages.declined(), inside(addrs, "hg"), inside(addrs, "nh"),
      advised_bytes > 0, inside(ends, "hg"), inside(ends, "nh"),
      heap_grew >= min(advised_bytes, 2 << 20), min(first, control()),
      all(int(s) == i for i, s in keep))
"""


def test_huge_pages_declined_after_a_slow_one() -> None:
    """Once a huge page of the arenas' region, or of the heap's advised part (faulted in as
    it is advised), takes more than ``slow_ns`` of CPU time to fault (0 here: every one; a
    huge page cut where memory is short compacts first, ~2-4 ms, or on a VM whose free
    blocks went back to the host pays its faults, ~5 ms), the rest of the region and the
    heap's advised part are advised MADV_NOHUGEPAGE: the objects made after that page and
    the heap's buffer lie in 4 KiB-page mappings; with no page slow, none."""
    pytest.importorskip("btrdelta._hugepages")

    def run(slow: int, heap: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _DECLINE, str(slow), heap],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[-1] == "True"  # the objects intact
        return out[:8]

    # the arenas alone: the region (8 MiB) holds ~105,000 of these 400,000 objects; those of
    # its first huge page (two 1 MiB arenas, ~26,000) stay in an advised mapping, the
    # others (~78,000) not
    mode = _thp_mode()
    declined, hg, nh = run(0, "noheap")[:3]
    assert declined == "True"
    assert 0 < int(hg) <= 40_000
    assert int(nh) >= 60_000
    # with the heap: its first huge page, faulted as it is advised (before any arena of the
    # region is cut), was slow: the whole region and the heap's part in 4 KiB pages
    declined, hg, nh, heap, heap_hg, heap_nh = run(0, "heap")[:6]
    assert (declined, hg, heap, heap_hg) == ("True", "0", "False", "0")
    assert int(nh) >= 90_000
    brk_moves = heap_nh == "2"  # (else glibc maps its memory: nothing advised)
    # none slow: every object of the region and the heap's buffer in advised mappings
    declined, hg, nh, heap, heap_hg, heap_nh, heap_faulted, control = run(10**15, "heap")
    if mode != "never" and _huge_pages_given(int(control)):
        # its first 4 MiB faulted in huge pages as it was advised: at least one of them
        # (under load once fewer than its pages, while the controls had their huge pages)
        assert heap_faulted == "True"
    assert declined == "False"
    assert int(hg) >= 90_000
    assert int(nh) == 0
    assert (heap, heap_hg, heap_nh) == (("True", "2", "0") if brk_moves else
                                        (heap, heap_hg, "0"))


def test_huge_pages_declined_where_no_free_block_holds_one() -> None:
    """Where the kernel has fewer free blocks of 2 MiB than ``min_free`` (/proc/buddyinfo),
    every huge-page fault would compact memory first: ``arenas`` takes none and changes
    nothing (a later call can still take them)."""
    pytest.importorskip("btrdelta._hugepages")
    _thp_mode()
    if not os.path.exists("/proc/buddyinfo"):
        pytest.skip("no /proc/buddyinfo")
    code = ("from btrdelta import _hugepages\n"
            "print(_hugepages.arenas(8 << 20, 10**15, 1 << 40), "
            "_hugepages.arenas(8 << 20, 10**15, 0), _hugepages.declined())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True", "False"]


def test_a_send_takes_huge_pages_before_the_cli_s_imports() -> None:
    """The console entry puts a ``send``'s memory in huge pages (``_HUGE_PAGES``), before
    the CLI's modules are imported; another command's, or a library caller's, stays as it
    is."""
    pytest.importorskip("btrdelta._hugepages")
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith("
            "('btrdelta._hugepages', 'btrdelta.cli'))), file=sys.stderr))\n"
            "from btrdelta import _malloc\n"
            "took = _malloc.huge_pages\n"
            "_malloc.huge_pages = lambda: print('cli' in sys.modules, 'btrdelta.cli' in "
            "sys.modules, isinstance(took(), bool)) or True\n"
            "sys.argv = ['btrdelta', *sys.argv[1:]]\n"
            "from btrdelta.__main__ import entry\n"
            "entry()")
    for argv, want in ((["--debug", "send", "--help"], "False False True"),
                       (["dump", "--help"], "")):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == want if want else \
            not proc.stdout.startswith(("True", "False"))
        assert ("btrdelta._hugepages" in proc.stderr) == bool(want)


def test_delta_make_fixes_the_mmap_threshold_before_the_cli_s_imports() -> None:
    """The console entry gives ``delta make`` its fixed mmap threshold before the CLI's
    modules are imported (``_RETURN_FREED``): set after them, glibc's moving threshold had
    left a heap whose peak was ~10 MiB higher where the byte code came from ``.pyc`` files
    (tests/delta/test_make_memory.py: 107 MiB of its goal's 112, 97 now); another command's
    stays as it is."""
    code = ("import sys\n"
            "from btrdelta import _malloc\n"
            "took = _malloc.return_freed_memory\n"
            "_malloc.return_freed_memory = lambda *a: print('early', 'btrdelta.cli' in "
            "sys.modules) or took(*a)\n"
            "sys.argv = ['btrdelta', *sys.argv[1:]]\n"
            "from btrdelta.__main__ import entry\n"
            "entry()")
    for argv, want in ((["delta", "make", "--help"], "early False"),
                       (["--debug", "delta", "make", "--help"], "early False"),
                       (["delta", "expand", "--help"], "")):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        first = proc.stdout.splitlines()[0]
        assert first == want if want else not first.startswith("early"), (argv, first)
