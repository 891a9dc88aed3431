"""Files of any apparent size, up to btrfs's largest (2^63 - 1): data at 2^62, at
2^63 - 8 KiB, a file of size 2^63 - 1. Every send (full, incremental from a snapshot,
``--record`` and ``--from-sendshot``) and ``tree-sum`` take time in proportion to the
data, not the size: a file past :data:`~btrdelta.send.onepass.DENSE_MAX` bytes has the
sparse form of the XXH3-128 content digest, one past
:data:`~btrdelta.tree.content.WHOLE_MAX` tree-sum-3's content digest in tree-sum-2
(docs/formats/sendshot.md, docs/formats/tree-sum.md). A smaller file keeps the digests
every earlier btrdelta gave it.

Oracles: the kernel's ``btrfs send``/``btrfs receive`` (each of our streams received by
``btrfs receive``, on top of its base: sizes, data maps by ``SEEK_DATA``, bytes, tree-sum
format 3 equal to the source's and to the kernel's receive), the digests' definitions
written out here from the docs (runs of zero blocks counted by hand), and for a file under
the bound XXH3-128 and BLAKE3 of its whole content fed as bytes (the route of every earlier
btrdelta)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest
import xxhash

from btrdelta.fs.content import data_segments
from btrdelta.send.compare import compare_files
from btrdelta.send.store import SendshotStore
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Clone
from btrdelta.tree.treesum import tree_manifest, tree_sum

from .conftest import Workspace

B = 4096
E61, E62, E63 = 1 << 61, 1 << 62, 1 << 63
#: what each of our commands may take here (2 shared cores): the old digests of these
#: files took years
SECONDS = 30
MID = 16 << 30  # a file under both bounds: its digests are today's


def _c3(size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """The tree-sum-3 content digest by its definition (docs/formats/tree-sum.md §2) of a
    file of ``size`` bytes holding ``pieces`` (block-aligned offsets, in order, apart by
    at least a block, no block of zeros in them) and zeros elsewhere."""
    out, pos = b"tree-sum-3 content\0", 0
    for off, data in pieces:
        seg = (data + bytes(-len(data) % B))[:size - off]  # the zeros of its last block
        if off > pos:
            out += b"\0" + struct.pack("<Q", (off - pos) // B)
        out += b"\1" + struct.pack("<Q", len(seg)) + blake3.blake3(seg).digest()
        pos = off + len(seg)
    if size > pos:
        out += b"\0" + struct.pack("<Q", -(-(size - pos) // B))
    return blake3.blake3(out + struct.pack("<Q", size)).digest()


def _sparse(c3: bytes) -> bytes:
    """The sparse form of the XXH3-128 content digest (docs/formats/sendshot.md)."""
    return xxhash.xxh3_128_digest(b"btrdelta sparse content\0" + c3,
                                  int.from_bytes(b"sparse\0\0", "little"))


def _old_route(size: int, pieces: list[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """XXH3-128 and BLAKE3-256 of the whole content, its zeros fed as bytes: the content
    digest and tree-sum-2's of every btrdelta before this bound."""
    x3, b3, pos, zeros = xxhash.xxh3_128(), blake3.blake3(), 0, memoryview(bytes(1 << 20))
    for off, data in [*pieces, (size, b"")]:
        while pos < off:
            n = min(len(zeros), off - pos)
            x3.update(zeros[:n])
            b3.update(zeros[:n])
            pos += n
        x3.update(data)
        b3.update(data)
        pos += len(data)
    return x3.digest(), b3.digest()


def _write(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for off, data in pieces:
            os.pwrite(fd, data, off)
        if size is not None:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _layout(path: Path) -> tuple[int, list[tuple[int, int]], bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        segs = data_segments(fd, size)
        return size, segs, b"".join(os.pread(fd, n, off) for off, n in segs)
    finally:
        os.close(fd)


def _same(a: Path, b: Path, zeros: int = 0) -> None:
    """The same names, sizes, data maps and bytes (every file's data read: not its holes),
    and the same tree-sum format 3 (``zeros``: ``b`` may have so many more bytes of
    data, zeros where ``a`` has a hole: a v1 stream has no punch)."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        (sa, da, xa), (sb, db, xb) = _layout(a / name), _layout(b / name)
        assert sa == sb, b / name
        if zeros:
            assert sum(n for _o, n in da) <= sum(n for _o, n in db) <= \
                sum(n for _o, n in da) + zeros, b / name
        else:
            assert (da, xa) == (db, xb), b / name
    assert tree_sum(a, version=3) == tree_sum(b, version=3)


def _run(*args: str) -> None:
    """A btrdelta command in a child, given :data:`SECONDS` (the digests of old: years)."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "btrdelta", *args, "-q"], check=True,
                   timeout=3 * SECONDS)
    assert time.monotonic() - t < SECONDS, args


def _receive(stream: Path, into: Path) -> None:
    into.mkdir(exist_ok=True)
    subprocess.run(["btrfs", "receive", "-f", str(stream), str(into)], check=True,
                   capture_output=True)


def _clones(stream: Path) -> list[tuple[bytes, bytes, int, int, int]]:
    with open(stream, "rb") as f:
        return [(r.path, r.clone_path, r.offset, r.length, r.clone_offset)
                for r in StreamReader(f) if isinstance(r, Clone)]


def _record_digests(store: Path, tree: Path) -> dict[str, tuple[bytes, bytes]]:
    """(XXH3-128, content digest) of each regular file by name in the store's newest
    record (of ``tree``)."""
    st = SendshotStore(store)
    names = {os.lstat(p).st_ino: p.name for p in tree.iterdir() if p.is_file()}
    return {names[i.ino]: (i.digest, i.bdigest)
            for i in st.view(st.records_list()[-1]).rows() if i.ino in names}


@pytest.mark.btrfs
def test_files_to_2_63_sent_every_way_as_the_kernel_sends_them(btrfs_ws: Workspace,
                                                               tmp_path: Path) -> None:
    base = btrfs_ws.fresh("far")
    sv, s1, s2 = base / "sv", base / "s1", base / "s2"
    btrfs = ["btrfs", "-q", "subvolume"]
    subprocess.run([*btrfs, "create", str(sv)], check=True)
    a, b, c, d, m = (os.urandom(n) for n in (B, B, B, 3 * B, 5000))
    far = [(0, a), (E62, b)]
    top = [(E63 - 2 * B, c)]
    most = [(1 << 40, d)]
    mid = [(B, m), (MID // 2, a)]
    _write(sv / "far", far)
    _write(sv / "top", top)
    _write(sv / "max", most, E63 - 1)
    _write(sv / "mid", mid, MID)
    (sv / "small").write_bytes(b"small\n")
    subprocess.run([*btrfs, "snapshot", "-r", str(sv), str(s1)], check=True)
    # the kernel's streams and receives: the oracle
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    subprocess.run(["btrfs", "send", "-q", "-f", str(k1), str(s1)], check=True, timeout=SECONDS)
    _receive(k1, base / "k")

    store = tmp_path / "store"
    o1, r1 = tmp_path / "o1", tmp_path / "r1"
    _run("send", str(s1), "-o", str(o1))
    _run("send", str(s1), "-o", str(r1), "--record", "--store", str(store), "--name", "s1")
    _receive(o1, base / "o")
    _receive(r1, base / "r")
    for got in (base / "k" / "s1", base / "o" / "s1", base / "r" / "s1"):
        _same(s1, got)
    digests = _record_digests(store, s1)
    expect = {"far": _c3(E62 + B, far), "top": _c3(E63 - B, top),
              "max": _c3(E63 - 1, most)}
    for name, c3 in expect.items():
        assert digests[name] == (_sparse(c3), c3), name
    # tree-sum format 2 of a file past 1 TiB: its tree-sum-3 content digest
    two = {e.path: e.digest for e in tree_manifest(s1)}
    assert {n: two[n.encode()] for n in expect} == {n: c.hex() for n, c in expect.items()}
    # under the bounds: the digests of old, by the route of old
    x3, whole = _old_route(MID, mid)
    assert digests["mid"] == (x3, _c3(MID, mid))
    assert two[b"mid"] == whole.hex()

    # a block written far out, a block punched at the end, a reflink copy, a size cut
    e = os.urandom(2 * B)
    far2 = [(0, a), (E61, e), (E62, b)]
    _write(sv / "far", [(E61, e)])
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(E63 - 2 * B), "--length",
                    str(B), str(sv / "top")], check=True)
    subprocess.run(["cp", "--reflink=always", str(sv / "far"), str(sv / "far.copy")],
                   check=True)
    os.truncate(sv / "max", E62)
    subprocess.run([*btrfs, "snapshot", "-r", str(sv), str(s2)], check=True)
    # (v2: the kernel's v1 writes the zeros of every byte the punch made a hole, from the
    # previous extent's end: 2^63 bytes; ours writes the block's 4 KiB)
    subprocess.run(["btrfs", "send", "-q", "--proto", "2", "-f", str(k2), "-p", str(s1),
                    str(s2)], check=True, timeout=SECONDS)
    _receive(k2, base / "k")
    o2, r2, f2 = tmp_path / "o2", tmp_path / "r2", tmp_path / "f2"
    _run("send", "-p", str(s1), str(s2), "-o", str(o2))
    _run("send", str(s2), "-o", str(r2), "--from-sendshot", "latest", "--record", "--store",
         str(store), "--name", "s2", "--proto", "2")
    _run("send", str(s2), "-o", str(f2))
    _receive(o2, base / "o")
    _receive(r2, base / "r")
    _receive(f2, base / "f")
    for got in (base / "k" / "s2", base / "r" / "s2", base / "f" / "s2"):
        _same(s2, got)
    _same(s2, base / "o" / "s2", zeros=B)  # (v1: the punched block's zeros written)
    # the copy found by its digest (then its data compared): a CLONE of each data range
    # (btrfs receive takes a CLONE's length modulo 2^32)
    size = E62 + B
    pieces = [(b"far.copy", b"far", off, len(x), off) for off, x in far2]
    for stream in (o2, f2):
        assert _clones(stream) == pieces, stream
    # a changed file read side by side with its old version (a send between plain trees)
    got = compare_files(os.fsencode(s1 / "far"), os.fsencode(s2 / "far"), size, size)
    assert (got.old_digest, got.new_digest, got.writes) == \
        (_sparse(_c3(size, far)), _sparse(_c3(size, far2)), [(E61, 2 * B)])
    # the new file and the one punched hashed whole (far and max, changed in place where
    # their extents changed, have the digests of a file hashed in parts)
    digests = _record_digests(store, s2)
    for name, c3 in (("far.copy", _c3(size, far2)), ("top", _c3(E63 - B, []))):
        assert digests[name] == (_sparse(c3), c3), name
    for n in ("k", "o", "r", "f"):
        for s in ("s1", "s2"):
            if (base / n / s).exists():
                subprocess.run([*btrfs, "delete", str(base / n / s)], check=True)
    for s in (s1, s2, sv):
        subprocess.run([*btrfs, "delete", str(s)], check=True)


@pytest.mark.btrfs
def test_a_copy_past_4_gib_is_received_whole_by_btrfs_receive(btrfs_ws: Workspace,
                                                              tmp_path: Path) -> None:
    """A reflink copy of a 5 GiB sparse file, in a full send and as a new file of an
    incremental one: ``btrfs receive`` (btrfs-progs 6.2 keeps a CLONE's length modulo
    2^32) made a copy of 1 GiB and 4 KiB from our one whole-file CLONE, without an error.
    Now each CLONE is shorter than 4 GiB and the copy is the file's size."""
    base = btrfs_ws.fresh("clone4g")
    sv, s1, s2 = base / "sv", base / "s1", base / "s2"
    btrfs = ["btrfs", "-q", "subvolume"]
    subprocess.run([*btrfs, "create", str(sv)], check=True)
    big = [(0, os.urandom(B)), (5 << 30, os.urandom(B)), ((5 << 30) + 2 * B, b"tail")]
    _write(sv / "a", big)
    subprocess.run([*btrfs, "snapshot", "-r", str(sv), str(s1)], check=True)
    subprocess.run(["cp", "--reflink=always", str(sv / "a"), str(sv / "b")], check=True)
    subprocess.run([*btrfs, "snapshot", "-r", str(sv), str(s2)], check=True)
    full, inc = tmp_path / "full", tmp_path / "inc"
    _run("send", str(s2), "-o", str(full))
    _run("send", "-p", str(s1), str(s2), "-o", str(inc))
    _receive(full, base / "f")
    _same(s2, base / "f" / "s2")
    _receive(_full_of(s1, tmp_path), base / "i")
    _receive(inc, base / "i")
    _same(s2, base / "i" / "s2")
    for stream in (full, inc):  # (a copy: cloned, not written)
        assert _clones(stream) == [(b"b", b"a", off, len(x), off) for off, x in big], stream
    for d in (base / "f" / "s2", base / "i" / "s1", base / "i" / "s2", s1, s2, sv):
        subprocess.run([*btrfs, "delete", str(d)], check=True)


def _full_of(snap: Path, tmp_path: Path) -> Path:
    """Our full stream of ``snap``."""
    out = tmp_path / f"{snap.name}.full"
    _run("send", str(snap), "-o", str(out))
    return out


@pytest.mark.btrfs
def test_image_compress_of_a_file_of_2_62_bytes_is_one_line(btrfs_ws: Workspace,
                                                           tmp_path: Path) -> None:
    """``image compress`` chunks an image whole (holes included) through one mapping of
    it: a file of 2^62 bytes cannot be mapped, said in one line naming the file and its
    size ("error: Cannot allocate memory" before), exit 1, no archive left."""
    base = btrfs_ws.fresh("image")
    _write(base / "far", [(0, os.urandom(B)), (E62, os.urandom(B))])
    out = tmp_path / "far.bdar"
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "image", "compress", "-i",
                           str(base / "far"), "-o", str(out)], capture_output=True,
                          text=True, timeout=SECONDS, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert str(base / "far") in proc.stderr
    assert f"cannot map its {E62 + B} bytes" in proc.stderr
    assert not out.exists()
    assert os.listdir(tmp_path) == []
