"""Single commands on the directory backend: encoded writes (zlib, zstd, btrfs LZO framing),
fallocate, fileattr, enable_verity, special files (crafted streams, checked by reading back)."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import lzallright
import pytest
import zstandard

from btrdelta.errors import ApplyError, StreamFormatError
from btrdelta.fs.btrfs import get_fsflags, set_fsflags
from btrdelta.fs.content import data_segments
from btrdelta.receive import receive
from btrdelta.stream.records import (
    Chmod,
    Clone,
    EnableVerity,
    EncodedWrite,
    End,
    Fallocate,
    Fileattr,
    Mkdir,
    Mkfifo,
    Mkfile,
    Mknod,
    Mksock,
    Rename,
    Truncate,
    Utimes,
    Write,
)

from .conftest import Targets
from .helpers import UUID_A, events, subvol

# every test runs with the C fast path of the applier and with the Python handlers alone
pytestmark = pytest.mark.usefixtures("applier_impl")

TEXT = b"".join(b"line %d of some compressible text\n" % i for i in range(6000))[:131072]


def btrfs_lzo_frame(data: bytes, sector: int = 4096) -> bytes:
    """btrfs's LZO framing (independent encoder, per send-stream.md section 3.4)."""
    lzo = lzallright.LZOCompressor()
    out = bytearray(4)
    for i in range(0, len(data), sector):
        seg = lzo.compress(data[i : i + sector])
        room = sector - len(out) % sector
        if room < 4:
            out += bytes(room)
        out += struct.pack("<I", len(seg)) + seg
    struct.pack_into("<I", out, 0, len(out))
    return bytes(out) + bytes(-len(out) % sector)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


@pytest.mark.parametrize(("compression", "payload"), [
    (1, zlib.compress(TEXT) + bytes(100)),
    (2, zstandard.ZstdCompressor().compress(TEXT) + bytes(100)),
    (3, btrfs_lzo_frame(TEXT)),
    (5, btrfs_lzo_frame(TEXT, 16384)),
], ids=["zlib", "zstd", "lzo-4k", "lzo-16k"])
def test_encoded_write_decompressed(compression: int, payload: bytes, dest: Path) -> None:
    recs = [subvol(), Mkfile(path=b"f", ino=257),
            EncodedWrite(path=b"f", offset=8192, unencoded_file_len=50000, unencoded_len=131072,
                         unencoded_offset=1000, compression=compression, data=payload,
                         encryption=0),
            End()]
    receive(events(recs, version=2), dest)
    got = (dest / "sv" / "f").read_bytes()
    assert got == bytes(8192) + TEXT[1000:51000]


@pytest.mark.parametrize("rec", [
    EncodedWrite(path=b"f", offset=0, unencoded_file_len=10, unencoded_len=1 << 40,
                 unencoded_offset=0, compression=2, data=b"x", encryption=0),
    EncodedWrite(path=b"f", offset=0, unencoded_file_len=100, unencoded_len=50,
                 unencoded_offset=0, compression=2, data=b"x", encryption=0),
    EncodedWrite(path=b"f", offset=0, unencoded_file_len=10, unencoded_len=4096,
                 unencoded_offset=0, compression=2, data=b"garbage", encryption=0),
    EncodedWrite(path=b"f", offset=0, unencoded_file_len=10, unencoded_len=4096,
                 unencoded_offset=0, compression=3, data=b"\xff\xff\x00\x00" * 8, encryption=0),
    EncodedWrite(path=b"f", offset=0, unencoded_file_len=10, unencoded_len=4096,
                 unencoded_offset=0, compression=9, data=b"x", encryption=0),
    EncodedWrite(path=b"f", offset=0, unencoded_file_len=10, unencoded_len=4096,
                 unencoded_offset=0, compression=1, data=b"x", encryption=1),
], ids=["huge", "lengths", "bad-zstd", "bad-lzo", "unknown", "encrypted"])
def test_hostile_encoded_write(rec: EncodedWrite, dest: Path) -> None:
    with pytest.raises(StreamFormatError) as info:
        receive(events([subvol(), Mkfile(path=b"f", ino=257), rec, End()], version=2), dest)
    assert info.value.index == 2
    assert list(dest.iterdir()) == []


def test_fallocate_punch_hole_and_truncate(dest: Path) -> None:
    data = b"\xaa" * (1 << 20)
    recs = [subvol(), Mkfile(path=b"f", ino=257),
            *(Write(path=b"f", offset=o, data=data[o : o + 131072])
              for o in range(0, len(data), 131072)),
            Fallocate(path=b"f", mode=3, offset=256 << 10, size=256 << 10),
            Truncate(path=b"f", size=2 << 20), End()]
    receive(events(recs, version=2), dest)
    p = dest / "sv" / "f"
    got = p.read_bytes()
    assert got == data[: 256 << 10] + bytes(256 << 10) + data[512 << 10 :] + bytes(1 << 20)
    with open(p, "rb") as f:
        assert os.lseek(f.fileno(), 256 << 10, os.SEEK_HOLE) == 256 << 10
        assert os.lseek(f.fileno(), 256 << 10, os.SEEK_DATA) == 512 << 10


def test_clones_within_the_subvolume(dest: Path, applier_impl: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """CLONE (copied where the file system has no reflinks); after the first one the C
    path takes them: ranges, tails, offsets and holes land where the Python handler puts
    them."""
    from btrdelta.receive.applier import Applier

    by_python: list[Clone] = []
    python_clone = Applier.clone

    def spy(self: Applier, rec: Clone) -> None:
        by_python.append(rec)
        python_clone(self, rec)

    monkeypatch.setattr(Applier, "clone", spy)
    data = os.urandom(3 * 4096 + 100)
    recs = [subvol(), Mkfile(path=b"g", ino=257), Write(path=b"g", offset=0, data=data),
            Mkfile(path=b"f", ino=258)]
    # aligned; the source's unaligned tail; an unaligned destination (never a reflink)
    for off, length, src in ((0, 4096, 4096), (4096, 4196, 8192), (8292, 4096, 0)):
        recs.append(Clone(offset=off, length=length, path=b"f", clone_uuid=UUID_A,
                          clone_ctransid=1, clone_path=b"g", clone_offset=src))
    # a source with a hole: copied, the hole is kept
    recs += [Mkfile(path=b"s", ino=259), Write(path=b"s", offset=0, data=data[:4096]),
             Write(path=b"s", offset=3 << 16, data=data[:100]), Mkfile(path=b"h", ino=260),
             Clone(offset=0, length=(3 << 16) + 100, path=b"h", clone_uuid=UUID_A,
                   clone_ctransid=1, clone_path=b"s", clone_offset=0)]
    receive(events([*recs, End()]), dest)
    assert (dest / "sv" / "f").read_bytes() == data[4096:8192] + data[8192:] + data[:4096]
    h = dest / "sv" / "h"
    assert h.read_bytes() == data[:4096] + bytes((3 << 16) - 4096) + data[:100]
    with open(h, "rb") as fh:
        assert os.lseek(fh.fileno(), 0, os.SEEK_HOLE) == 4096
        assert os.lseek(fh.fileno(), 4096, os.SEEK_DATA) == 3 << 16
    assert len(by_python) == (4 if applier_impl == "python" else 1)


def test_a_cloned_hole_over_the_end_of_a_file_leaves_no_block(dest: Path,
                                                             applier_impl: str) -> None:
    """A CLONE of a hole range over a file's end inside a block, copied (no reflinks here):
    the block that held the end is a hole afterwards, as a reflink leaves it (the punch
    stopped at the size and kept it: `make randwork` seed 118, the ext4 receive of v2 B
    had a data block btrfs receive has not; by Python's copy and by the C path's)."""
    recs = [subvol(), Mkfile(path=b"s", ino=257), Write(path=b"s", offset=0, data=b"a" * 4096),
            Truncate(path=b"s", size=400_000)]
    for name, ino in ((b"f", 258), (b"g", 259)):  # the first by Python, the second by C
        recs += [Mkfile(path=name, ino=ino), Write(path=name, offset=0, data=b"z" * 30_000),
                 Clone(offset=0, length=147_456, path=name, clone_uuid=UUID_A,
                       clone_ctransid=1, clone_path=b"s", clone_offset=192_512)]
    receive(events([*recs, End()]), dest)
    for name in ("f", "g"):
        p = dest / "sv" / name
        assert p.read_bytes() == bytes(147_456), name
        with open(p, "rb") as fh:
            assert data_segments(fh.fileno(), 147_456) == [], name


def test_a_copied_clone_leaves_its_source_atime(dest: Path, applier_impl: str) -> None:
    """A CLONE copied (no reflinks here) reads its source without moving its atime, as the
    clone ioctl of btrfs receive leaves it: an ext4 receive of upstream's clone scenarios
    (btrfs/108, 109, 189, 283, ...) had their sources' atimes of the time of receive, which
    the kernel's had from the stream. By Python's copy and by the C path's."""
    atime, mtime = 1_000_000_000 * 10**9 + 5, 1_500_000_000 * 10**9 + 7  # relatime updates
    recs = [subvol()]
    for name, ino in ((b"s", 257), (b"t", 258)):
        recs += [Mkfile(path=name, ino=ino), Write(path=name, offset=0, data=b"a" * 10_000),
                 Utimes(path=name, atime=atime, mtime=mtime, ctime=mtime)]
    for src, name, ino in ((b"s", b"f", 259), (b"t", b"g", 260)):  # by Python, then by C
        recs += [Mkfile(path=name, ino=ino),
                 Clone(offset=0, length=10_000, path=name, clone_uuid=UUID_A, clone_ctransid=1,
                       clone_path=src, clone_offset=0)]
    receive(events([*recs, End()]), dest)
    for name in ("s", "t"):
        st = os.lstat(dest / "sv" / name)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime), name
    assert (dest / "sv" / "g").read_bytes() == b"a" * 10_000


@pytest.mark.parametrize("first", [True, False], ids=["python", "after-a-clone"])
def test_a_clone_past_the_source_end_is_refused(dest: Path, applier_impl: str,
                                               first: bool) -> None:
    """A CLONE whose source range runs past the source's end is refused, as the clone
    ioctl and btrfs receive refuse it: the copy that stands in for a reflink read the
    missing bytes as a hole and made the file up (btrfs-progs issue 787: a --no-data
    stream clones files it never wrote). Applied by Python, and by the C path after a
    first clone from the subvolume."""
    data = os.urandom(4096 + 100)

    def clone(path: bytes, length: int, src_off: int = 0) -> Clone:
        return Clone(offset=0, length=length, path=path, clone_uuid=UUID_A, clone_ctransid=1,
                     clone_path=b"g", clone_offset=src_off)

    recs = [subvol(), Mkfile(path=b"g", ino=257), Write(path=b"g", offset=0, data=data)]
    if not first:
        recs += [Mkfile(path=b"f", ino=258), clone(b"f", 4196)]  # to the source's end: fine
    recs += [Mkfile(path=b"p", ino=259), clone(b"p", 4096, 4096)]
    with pytest.raises(ApplyError, match=r"clone source 'g' has 4196 bytes, the range ends "
                                         r"at 8192") as info:
        receive(events([*recs, End()]), dest)
    assert info.value.path == b"p"
    assert not (dest / "sv").exists()  # nothing under the final name


@pytest.mark.btrfs
def test_clone_source_follows_renames_on_btrfs(targets: Targets, applier_impl: str,
                                               tmp_path: Path) -> None:
    """Reflinks (btrfs): a clone source in the subvolume being received is looked up by its
    path at the time of the clone, also after its directory was renamed away."""
    dest = targets.scratch_btrfs / f"clone-rename-{applier_impl}-{tmp_path.name}"
    dest.mkdir()
    old, new = os.urandom(8192), os.urandom(8192)

    def clone(path: bytes) -> Clone:
        return Clone(offset=0, length=8192, path=path, clone_uuid=UUID_A, clone_ctransid=1,
                     clone_path=b"d/g", clone_offset=0)

    recs = [subvol(), Mkdir(path=b"d", ino=256), Mkfile(path=b"d/g", ino=257),
            Write(path=b"d/g", offset=0, data=old), Mkfile(path=b"f", ino=258), clone(b"f"),
            Mkfile(path=b"f2", ino=262), clone(b"f2"),  # the C path, after Python's first
            Rename(path=b"d", path_to=b"e"), Mkdir(path=b"d", ino=259),
            Mkfile(path=b"d/g", ino=260), Write(path=b"d/g", offset=0, data=new),
            Mkfile(path=b"h", ino=261), clone(b"h"), End()]
    receive(events(recs), dest)
    assert (dest / "sv" / "f").read_bytes() == old
    assert (dest / "sv" / "f2").read_bytes() == old
    assert (dest / "sv" / "h").read_bytes() == new


def test_fileattr_ignored_by_default_applied_on_request(dest: Path) -> None:
    recs = [subvol(), Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x"),
            Fileattr(path=b"f", fileattr=0x80 | 0x200),  # APPEND | NOATIME
            Utimes(path=b"f", atime=10**18, mtime=10**18, ctime=10**18, otime=10**18), End()]
    receive(events(recs, version=2), dest)
    fd = os.open(dest / "sv" / "f", os.O_RDONLY)
    try:
        assert get_fsflags(fd) & 0xA0 == 0
    finally:
        os.close(fd)
    dest2 = dest.parent / "dest2"
    dest2.mkdir()
    receive(events(recs, version=2), dest2, apply_fileattr=True)
    fd = os.open(dest2 / "sv" / "f", os.O_RDONLY)
    try:
        flags = get_fsflags(fd)
        assert flags & 0x20  # FS_APPEND_FL, set after the stream's own UTIMES
        assert flags & 0x80  # FS_NOATIME_FL
        set_fsflags(fd, flags & ~0x20)
    finally:
        os.close(fd)
    assert os.stat(dest2 / "sv" / "f").st_mtime_ns == 10**18


def test_enable_verity_warns_where_unsupported(dest: Path) -> None:
    warnings: list[str] = []
    recs = [subvol(), Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"v" * 9000),
            EnableVerity(path=b"f", algorithm=1, block_size=4096, salt=b"", sig=b""), End()]
    receive(events(recs, version=3), dest, on_warning=warnings.append)
    assert (dest / "sv" / "f").read_bytes() == b"v" * 9000
    assert any("verity" in w for w in warnings)


def test_special_files(dest: Path) -> None:
    recs = [subvol(), Mknod(path=b"c", ino=257, rdev=os.makedev(1, 3), mode=0o20644),
            Mknod(path=b"b", ino=258, rdev=os.makedev(7, 200), mode=0o60600),
            Mkfifo(path=b"p", ino=259, rdev=0, mode=0o10600),
            Mksock(path=b"s", ino=260, rdev=0, mode=0o140600),
            Chmod(path=b"c", mode=0o640), End()]
    receive(events(recs), dest)
    root = dest / "sv"
    st = os.lstat(root / "c")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_ISBLK(os.lstat(root / "b").st_mode)
    assert stat.S_ISFIFO(os.lstat(root / "p").st_mode)
    assert stat.S_ISSOCK(os.lstat(root / "s").st_mode)
