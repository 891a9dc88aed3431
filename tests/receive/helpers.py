"""Crafting streams with the codec and snapshotting a directory tree for before/after checks."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from btrdelta.stream import StreamReader, write_stream
from btrdelta.stream.reader import Event
from btrdelta.stream.records import Record, Subvol

UUID_A = uuid.UUID("11111111-2222-3333-4444-555555555555")
UUID_B = uuid.UUID("66666666-7777-8888-9999-aaaaaaaaaaaa")


def stream_bytes(records: Iterable[Record], version: int = 1) -> bytes:
    out = io.BytesIO()
    write_stream(records, out.write, version)
    return out.getvalue()


def events(records: Iterable[Record], version: int = 1) -> list[Event]:
    """Records encoded and decoded again (what a receiver really sees)."""
    return list(StreamReader(io.BytesIO(stream_bytes(records, version))).events())


def subvol(name: bytes = b"sv", u: uuid.UUID = UUID_A, ctransid: int = 7) -> Subvol:
    return Subvol(path=name, uuid=u, ctransid=ctransid)


def snapshot_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` with type, mode, size, mtime, content/target (lstat)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            extra: object = None
            if os.path.islink(p):
                extra = os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    extra = f.read()
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                             st.st_uid, st.st_nlink, extra)
    return out


def written_out_bytes(path: str | os.PathLike[str], end: int, wait: float = 10.0) -> int:
    """Bytes of ``path`` below offset ``end`` whose data is on the disk (FIEMAP extents not
    flagged ``DELALLOC``: btrfs flags data still only in the page cache, and data whose
    write-out is under way, until its file extent item is in), waiting up to ``wait``
    seconds for all of it (a write-out started lands in milliseconds; dirty data the
    kernel's flusher would write only after 30 s, unless something syncs meanwhile)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        placed = _placed(path, end)
        if placed >= end or time.monotonic() > deadline:
            return placed
        time.sleep(0.02)


def fiemap(path: str | os.PathLike[str], end: int = 1 << 62,
           sync: bool = False) -> list[tuple[int, int, int, int]]:
    """``path``'s extents below ``end`` (FS_IOC_FIEMAP): (logical, physical, length,
    flags); ``sync`` writes the file's dirty data out first (FIEMAP_FLAG_SYNC)."""
    import fcntl
    import struct

    head, ext = struct.Struct("=QQIIII"), struct.Struct("=QQQQQIIII")
    count = 512
    out: list[tuple[int, int, int, int]] = []
    start = 0
    with open(path, "rb") as f:
        while start < end:
            buf = bytearray(head.pack(start, end - start, int(sync), 0, count, 0)
                            + bytes(ext.size * count))
            fcntl.ioctl(f.fileno(), 0xC020660B, buf)  # FS_IOC_FIEMAP
            mapped = head.unpack_from(buf)[3]
            for i in range(mapped):
                logical, phys, length, _r1, _r2, flags, *_ = ext.unpack_from(
                    buf, head.size + i * ext.size)
                out.append((logical, phys, length, flags))
            if mapped < count or out[-1][3] & 0x1:  # FIEMAP_EXTENT_LAST
                return out
            start = out[-1][0] + out[-1][2]
    return out


#: FIEMAP flags a receiver's extents must have as the kernel's: UNWRITTEN (preallocated),
#: ENCODED (compressed)
_LAYOUT_FLAGS = 0x800 | 0x8


def extent_sharing(root: Path, ids: dict[tuple[object, ...], int] | None = None
                   ) -> dict[str, list[tuple[int, int, int]]]:
    """Which 4 KiB blocks of the regular files below ``root`` share their data on disk,
    independent of where it lies: each file's mapped blocks as (block, id, flags), where
    ``id`` numbers the distinct disk blocks in the order of the walk (files by path, blocks
    by offset), so two trees given the same clones (and nothing else shared) get the same
    map whatever the addresses. Compressed and inline blocks are each their own (their
    flags still compared): FIEMAP gives a compressed extent's start on disk, not which part
    a file refers to, and btrfs (6.18) merges two of them into one record where the second
    starts on disk at the first's start plus its length in the file, as it may by chance
    (seen: 109's B received on another filesystem). ``ids`` carries the numbering over
    from the trees walked before (what a snapshot shares with its parent)."""
    ids = {} if ids is None else ids
    out: dict[str, list[tuple[int, int, int]]] = {}
    for p in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        blocks = []
        for logical, phys, length, flags in fiemap(p, sync=True):
            for blk in range(logical // 4096, -(-(logical + length) // 4096)):
                key: tuple[object, ...]
                if flags & (0x200 | 0x8):  # DATA_INLINE, ENCODED
                    key = ("own", str(p), blk)
                else:
                    key = ("raw", phys + blk * 4096 - logical)
                blocks.append((blk, ids.setdefault(key, len(ids)), flags & _LAYOUT_FLAGS))
        out[str(p.relative_to(root))] = blocks
    return out


def _placed(path: str | os.PathLike[str], end: int) -> int:
    placed = 0
    for logical, _phys, length, flags in fiemap(path, end):
        if not flags & 0x4:  # FIEMAP_EXTENT_DELALLOC
            placed += max(0, min(logical + length, end) - logical)
    return placed
