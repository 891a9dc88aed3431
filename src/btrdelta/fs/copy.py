"""Copies that keep holes, in the kernel (no Python byte loops).

``copy_range`` copies a byte range between two files
with ``copy_file_range`` one data segment at a time and punches holes where the source has
them, so a CLONE that cannot be a reflink still gives the same hole layout.
``copy_tree`` copies a received directory for an incremental stream with
``cp -a --reflink=auto`` (reflinks where the filesystem can, ``copy_file_range`` otherwise;
hard links, xattrs, owners, ns mtimes and holes kept): the directory backend of receive.
``cp``'s ``--sparse=auto`` guesses: it takes a sparse file whose block count reaches its size
(e.g. an ext4 file with an xattr block of its own) for a dense one and writes its holes as
zeros, and in a file it takes for sparse it makes holes of written zero blocks; the copy is
then given the source's layout again (holes punched, zero blocks written), as ``btrfs
receive`` has it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .. import TYPE_CHECKING
from ..errors import ApplyError
from .btrfs import fallocate
from .content import data_segments
from .remove import remove_tree

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["copy_range", "copy_tree", "within_source", "write_zeros"]

_FALLOC_PUNCH = 0x02 | 0x01  # PUNCH_HOLE | KEEP_SIZE
_ZEROS = bytes(1 << 20)


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` (where holes cannot be punched)."""
    while length > 0:
        n = os.pwrite(fd, memoryview(_ZEROS)[: min(length, len(_ZEROS))], offset)
        offset += n
        length -= n


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy a byte range between files in the kernel, keeping holes of the source."""
    end = src_off + length
    pos = src_off
    while pos < end:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to EOF
                raise
            data = end
        data = min(data, end)
        if data > pos:  # a hole in the source: make the destination range a hole too
            hole_dst = dst_off + (pos - src_off)
            st = os.fstat(dst)
            size = st.st_size
            try:
                if hole_dst < size:
                    stop = hole_dst + data - pos
                    if stop >= size:  # to the end of the last block (see _punch_like)
                        stop = _block_end(size, st.st_blksize)
                    fallocate(dst, _FALLOC_PUNCH, hole_dst, stop - hole_dst)
            except OSError:
                write_zeros(dst, hole_dst, min(data - pos, size - hole_dst))
            if dst_off + (data - src_off) > size:
                os.ftruncate(dst, dst_off + (data - src_off))
            pos = data
            if pos >= end:
                break
        hole = min(os.lseek(src, pos, os.SEEK_HOLE), end)
        while pos < hole:
            n = os.copy_file_range(src, dst, hole - pos, pos, dst_off + (pos - src_off))
            if n == 0:
                return
            pos += n


def within_source(src: int, offset: int, length: int, name: bytes) -> None:
    """Refuse, before :func:`copy_range` stands in for a reflink, a clone whose source range
    runs past the source file's end: the clone ioctl refuses it (EINVAL: it would be cut
    short), and so does btrfs receive, where the copy reads the missing bytes as a hole and
    makes them up (a ``--no-data`` stream's CLONE of a file whose data it never wrote:
    btrfs-progs issue 787). A length of 0 (to the source's end) is left to the copy."""
    size = os.fstat(src).st_size
    if length and offset + length > size:
        shown = name.decode("utf-8", "backslashreplace")
        raise OSError(errno.EINVAL, f"the clone source {shown!r} has {size} bytes, the range "
                      f"ends at {offset + length}")


def _block_end(size: int, block: int) -> int:
    """``size`` rounded up to a multiple of ``block``: a hole punched up to a size inside a
    block zeroes the block's bytes but keeps the block (ext4, btrfs); one punched past the
    end (``KEEP_SIZE``) frees it, as a clone of a hole or btrfs receive's copy has it."""
    return -(-size // block) * block if block > 0 else size


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a received directory for an incremental stream (reflinks where possible)."""
    import subprocess  # an incremental receive into a directory only

    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(src), str(dst)],
        capture_output=True, check=False,
    )
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            pfd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                remove_tree(pfd, dst.name)
            finally:
                os.close(pfd)
        # one line: cp says it once a file (a full disk: hundreds of lines)
        said = proc.stderr.decode(errors="replace").strip().splitlines() or [
            f"cp exited {proc.returncode}"]
        more = f" (and {len(said) - 1} more errors)" if len(said) > 1 else ""
        raise ApplyError(f"copying parent {src} failed: {said[0]}{more}", op="snapshot")
    with contextlib.suppress(OSError):  # the layout only: the content is copied already
        _keep_holes(os.fsencode(src), os.fsencode(dst))


def _keep_holes(src: bytes, dst: bytes) -> None:
    """Give the copy ``dst`` of each of ``src``'s regular files the source's holes and data
    ranges (punch the holes it lacks, write zeros where it made holes of data; then put back
    the mtime this moved). A file without holes costs an open, an fstat and
    one ``SEEK_HOLE``; a hard-linked inode is looked at once."""
    seen: set[tuple[int, int]] = set()
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(src, rel) if rel else src) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                       for e in it]
        for name, is_dir, is_file in entries:
            path = os.path.join(rel, name) if rel else name
            if is_dir:
                stack.append(path)
            elif is_file:
                _punch_like(os.path.join(src, path), os.path.join(dst, path), seen)


def _open_file(path: bytes, flags: int) -> tuple[int, os.stat_result] | None:
    """``path`` opened with ``flags`` (never following a symlink or blocking) and its
    stat, if it is a regular file that is not empty; else None."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size:
        return fd, st
    os.close(fd)
    return None


def _punch_like(src: bytes, dst: bytes, seen: set[tuple[int, int]]) -> None:
    opened = _open_file(src, os.O_RDONLY)
    if opened is None:
        return
    fd, st = opened
    try:
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
        try:
            if os.lseek(fd, 0, os.SEEK_HOLE) >= st.st_size:
                return
        except OSError:  # no SEEK_HOLE here: no holes to keep
            return
        segs = data_segments(fd, st.st_size)
    finally:
        os.close(fd)
    opened = _open_file(dst, os.O_WRONLY)
    if opened is None:
        return
    out, got = opened
    try:
        if got.st_size != st.st_size:
            return
        have = data_segments(out, got.st_size)
        if have == segs:
            return
        with contextlib.suppress(OSError):  # a filesystem without PUNCH_HOLE: zeros stay
            pos = 0
            # a hole up to the end is punched to the end of its block (_block_end): cp
            # writes the block of a file smaller than a block that has no data
            for off, length in [*segs, (_block_end(st.st_size, got.st_blksize), 0)]:
                if off > pos:
                    fallocate(out, _FALLOC_PUNCH, pos, off - pos)
                pos = off + length
        # and the source's data that the copy made holes of (cp makes holes of zero blocks
        # in a file it takes for sparse): written zeros again, as the source has them
        pos = 0
        for off, length in [*have, (got.st_size, 0)]:
            for a, n in segs:
                lo, hi = max(a, pos), min(a + n, off)
                if lo < hi:
                    write_zeros(out, lo, hi - lo)
            pos = off + length
        os.utime(out, ns=(got.st_atime_ns, got.st_mtime_ns))
    finally:
        os.close(out)
