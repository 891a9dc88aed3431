"""The change sweep's items walked in C (``fs/_sweep.c``, the ``sweep`` accelerator) give what
the Python reference (``sweepref.inodes``) gives, on search results made here: inode items
written before, at and after the transid (with their sequence), file extent items written
before, at and after it (``written``), other item types, short items, and items that run
past the buffer."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct
from pathlib import Path

import pytest

from btrdelta import _native
from btrdelta.fs import btrfs, sweepref

pytestmark = pytest.mark.skipif(
    not _native.available("sweep") and os.environ.get("CI") != "true",
    reason="the sweep accelerator is not built",
)

_HDR = struct.Struct("<QQQII")  # transid, objectid, offset, type, len


def _results(rng: random.Random, n: int) -> tuple[bytearray, dict[int, tuple[int, int, int]]]:
    """``n`` search results after a 16-byte prefix, and (roughly: an objectid may come
    back) the inodes written after 50."""
    buf = bytearray(rng.randbytes(16))
    want: dict[int, tuple[int, int, int]] = {}
    for i in range(n):
        obj = rng.choice([256 + i, rng.randrange(2**64)])
        typ = rng.choice([1, 1, 1, 12, 84, 96, 108, 108, 255])
        gen, transid = rng.randrange(2**64), rng.choice([49, 50, 51, 2**64 - 1])
        seq = rng.randrange(2**64)
        if typ == 1:
            item = struct.pack("<QQ56xQ", gen, transid, seq) + rng.randbytes(rng.choice([0, 80]))
            if transid > 50:
                want[obj] = (gen, transid, seq)
        elif typ == 108:  # a file extent item: its generation first
            item = struct.pack("<Q", transid) + rng.randbytes(rng.choice([0, 13, 45]))
        else:
            item = rng.randbytes(rng.randrange(40))
        if rng.random() < 0.05:  # an inode item too short to hold its sequence: skipped
            typ, item = 1, item[:rng.randrange(80)]
            want.pop(obj, None)
        buf += _HDR.pack(rng.randrange(2**64), obj, rng.randrange(2**64), typ, len(item))
        buf += item
    return buf, want


def test_c_walks_the_items_as_the_reference_does() -> None:
    c = _native.live("sweep")
    assert c is not None
    for seed in range(40):
        rng = random.Random(seed)
        buf, _ = _results(rng, rng.randrange(1, 200))
        nr = rng.randrange(1, 200)
        nr = min(nr, _count(buf))
        for since in (0, 49, 50, 2**64 - 2):
            got_c: dict[int, tuple[int, int, int]] = {}
            got_py: dict[int, tuple[int, int, int]] = {}
            written_c: set[int] = set()
            written_py: set[int] = set()
            last_c = c.inodes(buf, 16, nr, 1, since, got_c, written_c)
            last_py = sweepref.inodes(buf, 16, nr, 1, since, got_py, written_py)
            assert last_c == last_py
            assert got_c == got_py
            assert list(got_c) == list(got_py)  # the same order: the kernel's key order
            assert written_c == written_py
            assert c.inodes(buf, 16, nr, 1, since, {}) == last_c  # (written: optional)


def test_the_inodes_written_after_since() -> None:
    rng = random.Random(7)
    buf, want = _results(rng, 300)
    for backend in ("c", "python"):
        with _native.use_backend(backend, "sweep"):  # type: ignore[arg-type]
            items = _native.live("sweep")
            got: dict[int, tuple[int, int, int]] = {}
            written: set[int] = set()
            walk = items.inodes if items is not None else sweepref.inodes
            walk(buf, 16, 300, 1, 50, got, written)
            # a later item of the same objectid wins in both (a dict); the model too
            assert (got, written) == _model(buf, 300)
            assert written  # the buffer holds some
    assert want  # the buffer holds some


def _model(buf: bytearray, nr: int) -> tuple[dict[int, tuple[int, int, int]], set[int]]:
    out: dict[int, tuple[int, int, int]] = {}
    written: set[int] = set()
    pos = 16
    for _ in range(nr):
        _t, obj, _off, typ, length = _HDR.unpack_from(buf, pos)
        if typ == 1 and length >= 80:
            gen, transid = struct.unpack_from("<QQ", buf, pos + 32)
            if transid > 50:
                out[obj] = (gen, transid, struct.unpack_from("<Q", buf, pos + 32 + 72)[0])
        elif typ == 108 and length >= 8 and struct.unpack_from("<Q", buf, pos + 32)[0] > 50:
            written.add(obj)
        pos += 32 + length
    return out, written


def _count(buf: bytearray) -> int:
    pos, n = 16, 0
    while pos + 32 <= len(buf):
        pos += 32 + _HDR.unpack_from(buf, pos)[4]
        n += 1
    return n


@pytest.mark.parametrize("cut", [1, 31, 32, 40])
def test_an_item_past_the_buffer_is_an_error_on_both(cut: int) -> None:
    buf = bytearray(16) + _HDR.pack(9, 300, 0, 1, 16) + struct.pack("<QQ", 3, 60)
    buf = buf[:len(buf) - 48 + cut] if cut < 48 else buf
    c = _native.live("sweep")
    assert c is not None
    for walk in (c.inodes, sweepref.inodes):
        with pytest.raises(ValueError, match="past the buffer"):
            walk(buf, 16, 1, 1, 50, {})
        with pytest.raises(ValueError, match="past the buffer"):
            walk(buf + bytes(48), 16 + 48 + 32, 1, 1, 50, {})  # a header at the end


def test_c_refuses_what_is_not_a_buffer_and_a_dict() -> None:
    c = _native.live("sweep")
    assert c is not None
    with pytest.raises(TypeError):
        c.inodes("text", 0, 0, 1, 0, {})
    with pytest.raises(TypeError):
        c.inodes(b"", 0, 0, 1, 0, [])
    with pytest.raises(TypeError):
        c.inodes(b"", 0, 0, 1, 0, {}, [])


def test_c_search_fails_as_fcntl_ioctl_does(tmp_path: Path) -> None:
    """The accelerator's ioctl (the GIL released) raises what ``fcntl.ioctl`` raises: an
    OSError with the errno (a file that is not on btrfs: ENOTTY, which makes the sweep fall
    back; a closed descriptor: EBADF), and takes only a writable buffer."""
    c = _native.live("sweep")
    assert c is not None
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        buf = bytearray(4096)
        for call in (c.search, fcntl.ioctl):
            with pytest.raises(OSError, match=r"Inappropriate ioctl|Invalid argument") as caught:
                call(fd, btrfs._TREE_SEARCH_V2, buf)
            assert caught.value.errno in (errno.ENOTTY, errno.EINVAL)
        with pytest.raises(TypeError):
            c.search(fd, btrfs._TREE_SEARCH_V2, bytes(4096))
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as caught:
        c.search(fd, btrfs._TREE_SEARCH_V2, bytearray(4096))
    assert caught.value.errno == errno.EBADF


def _extent_results(rng: random.Random, n: int, ino: int) -> bytearray:
    """``n`` search results after a 16-byte prefix: mostly file extent items of inode
    ``ino`` (regular, prealloc; now and then inline, encrypted, encoded, of an unknown type
    or short), some of other inodes and types."""
    buf = bytearray(rng.randbytes(16))
    off = 0
    for _ in range(n):
        obj = rng.choice([ino, ino, ino, ino + 1])
        typ = rng.choice([108, 108, 108, 108, 1, 12])
        kind = rng.choice([1, 2]) if rng.random() > 0.005 else rng.choice([0, 3])
        bad = rng.random() < 0.005
        head = struct.pack("<QQBBHB", rng.randrange(2**64), rng.randrange(2**64),
                           rng.randrange(4), int(bad and rng.random() < 0.5),
                           int(bad and rng.random() < 0.5), kind)
        body = struct.pack("<QQQQ", *(rng.randrange(2**64) for _ in range(4)))
        item = head + body + rng.randbytes(rng.choice([0, 0, 0, 7]))
        if rng.random() < 0.005:
            item = item[:rng.randrange(53)]
        off += rng.randrange(1, 1 << 20)
        buf += _HDR.pack(rng.randrange(2**64), obj, off, typ, len(item)) + item
    return buf


def test_c_reads_a_file_s_extent_items_as_the_reference_does() -> None:
    """A search buffer's file extent items (``file_extent_batches``), in C and in Python:
    the same packed items (or None at the first that cannot be compared), the same last key
    offset and end, over random results; and the same error for a result past the buffer."""
    c = _native.live("sweep")
    assert c is not None
    refused = 0
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randrange(0, 120)
        buf = _extent_results(rng, n, 257)
        got = c.extents(buf, 16, n, 257)
        assert got == sweepref.extents(buf, 16, n, 257), seed
        refused += got[0] is None
        if n:
            assert got[2] <= len(buf)
            cut = buf[:rng.randrange(16, len(buf))]
            try:
                want: object = sweepref.extents(cut, 16, n, 257)
            except ValueError:
                want = ValueError
            if want is ValueError:
                with pytest.raises(ValueError, match="past the buffer"):
                    c.extents(cut, 16, n, 257)
            else:
                assert c.extents(cut, 16, n, 257) == want
    assert 20 < refused < 280  # (both kinds of buffer were made)
    with pytest.raises(ValueError, match="past the buffer"):
        c.extents(bytearray(40), 16, 2, 257)
