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


def _placed(path: str | os.PathLike[str], end: int) -> int:
    import fcntl
    import struct

    head, ext = struct.Struct("=QQIIII"), struct.Struct("=QQQQQIIII")
    count = 512
    buf = bytearray(head.pack(0, end, 0, 0, count, 0) + bytes(ext.size * count))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), 0xC020660B, buf)  # FS_IOC_FIEMAP
    placed = 0
    for i in range(head.unpack_from(buf)[3]):
        logical, _phys, length, _r1, _r2, flags, *_ = ext.unpack_from(
            buf, head.size + i * ext.size)
        if not flags & 0x4:  # FIEMAP_EXTENT_DELALLOC
            placed += max(0, min(logical + length, end) - logical)
    return placed
