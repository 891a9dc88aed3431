"""Expansion of compressed extents (PENC) in worker threads: stream order, errors, clean-up.

The streams are synthetic ``--compressed-data`` streams: their ENCODED_WRITEs are made by
:func:`compress_extent` the way btrfs makes them, so ``delta make`` replaces every one of
them by a PENC record (the kernel-made streams are in ``test_encoded.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import random
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from btrdelta.delta import (
    MakeOptions,
    expand_events,
    expand_to,
    make_delta,
    oldfiles,
    open_delta,
    patching,
)
from btrdelta.delta import events as events_mod
from btrdelta.delta.expand import WRITE, expand_items
from btrdelta.delta.format import NO_DIGEST, BtrfsCommand, HashAlgo, Patch, PEncoded
from btrdelta.delta.recompress import ZLIB, ZSTD, compress_extent
from btrdelta.delta.stats import collect_delta_stats
from btrdelta.delta.writer import DeltaWriter
from btrdelta.errors import ChecksumError, StreamFormatError
from btrdelta.stream import StreamReader, StreamWriter
from btrdelta.stream import records as R

from .conftest import delta_items

#: extent sizes cycled through: pooled (>= 8 KiB) and recompressed at once (small)
_SIZES = [128 << 10, 128 << 10, 4096, 20_000, 128 << 10, 1000, 64 << 10]


def _text(rnd: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"extent", b"zstd", b"btrfs", b"\n", b"42"]
    return b" ".join(rnd.choice(words) for _ in range(n // 4))[:n]


@dataclasses.dataclass
class _Case:
    old: Path
    stream: bytes
    delta: bytes
    pencs: int


def _case(tmp: Path, compression: int) -> _Case:
    """Three files rewritten with small changes, sent as compressed extents, and their
    delta (every extent a PENC), with a plain WRITE and other commands in between."""
    rnd = random.Random(compression)
    old = tmp / "old"
    old.mkdir()
    out: list[bytes] = []
    w = StreamWriter(out.append, 2)
    w.write(R.Snapshot(b"B", uuid.uuid4(), 9, uuid.uuid4(), 8))
    for i in range(3):
        name = b"f%d" % i
        base = _text(rnd, 1_500_000 + i * 300_000)
        (old / name.decode()).write_bytes(base)
        new = base[:50_000 * (i + 1)] + b"CHANGED" + base[50_000 * (i + 1) :]
        w.write(R.Mkfile(b"o%d-1-0" % (300 + i), 300 + i))
        w.write(R.Rename(b"o%d-1-0" % (300 + i), name))
        off = 0
        for k in range(len(new)):
            if off >= len(new):
                break
            raw = new[off : off + _SIZES[k % len(_SIZES)]]
            packed = compress_extent(raw, compression, 3)
            packed += bytes(-len(packed) % 4096)
            w.write(R.EncodedWrite(name, off, len(raw), -(-len(raw) // 4096) * 4096, 0,
                                   compression, packed, 0))
            off += len(raw)
        w.write(R.Truncate(name, len(new)))
        w.write(R.Utimes(name, 1, 2, 3))
    w.write(R.Mkfile(b"o400-1-0", 400))
    w.write(R.Write(b"o400-1-0", 0, b"plain data " * 100))
    w.write(R.End())
    stream = b"".join(bytes(p) for p in out)
    d: list[bytes] = []
    make_delta(io.BufferedReader(io.BytesIO(stream)), old, d.append,  # type: ignore[arg-type]
               MakeOptions(jobs=1, level=0))
    delta = b"".join(bytes(p) for p in d)
    pencs = collect_delta_stats(open_delta(io.BytesIO(delta))).regenerated_encoded
    return _Case(old, stream, delta, pencs)


@pytest.fixture(scope="module", params=[ZSTD, ZLIB], ids=["zstd", "zlib"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> _Case:
    return _case(tmp_path_factory.mktemp("penc"), request.param)


def _threads() -> int:
    return sum(t.name.startswith("btrdelta-penc") for t in threading.enumerate())


def test_extents_recompressed_in_threads_come_out_in_order(
    case: _Case, penc_pool: list[str]
) -> None:
    assert case.pencs >= 60  # every extent became a PENC
    before = threading.active_count()
    out: list[bytes] = []
    assert expand_to(open_delta(io.BytesIO(case.delta)), case.old, out.append) == len(
        case.stream
    )
    assert b"".join(bytes(p) for p in out) == case.stream
    workers = [n for n in penc_pool if n.startswith("btrdelta-penc")]
    assert len(workers) >= case.pencs // 2, penc_pool  # the large ones went to the pool
    assert len(set(workers)) > 1
    assert threading.active_count() == before
    # receive's consumer: the same records as the stream, in the same order
    events = list(expand_events(io.BytesIO(case.delta), case.old))
    plain = list(StreamReader(io.BytesIO(case.stream)).events())
    assert [type(e) for e in events] == [type(e) for e in plain]
    enc = [(e.path, e.offset, bytes(e.data)) for e in events if type(e) is R.EncodedWrite]
    assert enc == [(e.path, e.offset, bytes(e.data)) for e in plain if type(e) is R.EncodedWrite]
    assert threading.active_count() == before


def _rewrite(items: list[object]) -> bytes:
    out: list[bytes] = []
    w = DeltaWriter(out.append, level=0)
    for item in items:
        if isinstance(item, BtrfsCommand):
            w.command(item.raw)
        else:
            w.item(item)  # type: ignore[arg-type]
    return b"".join(bytes(x) for x in out)


def _collect(delta: bytes, old: Path, got: list[tuple[int, bytes, object]]) -> None:
    """Append the outputs of ``delta``'s expansion to ``got`` as they come."""
    for kind, pieces, rec in expand_items(open_delta(io.BytesIO(delta)), old):
        got.append((kind, b"".join(bytes(p) for p in pieces), rec))


def test_wrong_recompression_fails_at_its_record(case: _Case, penc_pool: list[str]) -> None:
    """A PENC whose recorded CRC does not match what recompression gives: ChecksumError
    naming the path and the record, raised after every output before it, none after."""
    items = delta_items(case.delta)
    indexes = [i for i, it in enumerate(items)
               if isinstance(it, PEncoded) and it.length >= 64 << 10]
    bad_at = indexes[len(indexes) // 2]
    bad = items[bad_at]
    assert isinstance(bad, PEncoded)
    bad = copy.copy(bad)
    bad.crc ^= 1
    items[bad_at] = bad
    expected: list[tuple[int, bytes, object]] = []
    _collect(case.delta, case.old, expected)
    before = threading.active_count()
    got: list[tuple[int, bytes, object]] = []
    with pytest.raises(ChecksumError, match="recompressed extent differs") as info:
        _collect(_rewrite(items), case.old, got)
    # the outputs before the bad extent, exactly; its own output never came
    n = len(got)
    assert got == expected[:n]
    rec = expected[n][2]
    assert expected[n][0] == WRITE
    assert type(rec) is R.EncodedWrite
    assert rec.offset == bad.offset
    assert info.value.path == rec.path
    assert info.value.index == bad_at + 1
    assert threading.active_count() == before
    # an error after pending extents (no DEND) comes after their outputs
    got = []
    with pytest.raises(StreamFormatError, match="no DEND"):
        _collect(_rewrite(delta_items(case.delta)[:-1]), case.old, got)
    assert got == expected
    assert threading.active_count() == before


def test_closing_early_stops_the_threads(
    case: _Case, penc_pool: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = threading.active_count()
    gen = expand_items(open_delta(io.BytesIO(case.delta)), case.old)
    for n, _ in enumerate(gen):
        if _threads() and n > 3:
            break
    assert _threads()
    gen.close()
    assert threading.active_count() == before

    # an error in expand_to's writer
    def write(piece: object) -> None:
        if _threads():
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        expand_to(open_delta(io.BytesIO(case.delta)), case.old, write)
    assert threading.active_count() == before

    # receive's batches, abandoned after the first one made while the threads run
    monkeypatch.setattr(events_mod, "_EVENTS_BATCH", 2)
    batches = expand_events(io.BytesIO(case.delta), case.old).batches()
    while not _threads():
        next(batches)
    batches.close()
    assert threading.active_count() == before


def _patched_case(tmp: Path, codec: str) -> tuple[Path, bytes, bytes]:
    """An old file and the delta (patch ``codec``) of a stream writing it with an edit."""
    rnd = random.Random(7)
    old = tmp / "old"
    old.mkdir()
    base = _text(rnd, 300_000)
    (old / "f").write_bytes(base)
    new = base[:1000] + b"EDITED" + base[1000:]
    return old, *_rewrite_delta(old, new, codec, uuid.uuid4(), 8)


def _rewrite_delta(old: Path, new: bytes, codec: str, parent: uuid.UUID,
                   ctransid: int) -> tuple[bytes, bytes]:
    """A stream writing file ``f`` whole as ``new`` (parent ``parent``/``ctransid``), and its
    delta (patch ``codec``) against ``old``."""
    out: list[bytes] = []
    w = StreamWriter(out.append, 2)
    w.write(R.Snapshot(b"B", uuid.uuid4(), 9, parent, ctransid))
    for off in range(0, len(new), 128 << 10):
        w.write(R.Write(b"f", off, new[off : off + (128 << 10)]))
    w.write(R.Truncate(b"f", len(new)))
    w.write(R.End())
    stream = b"".join(bytes(p) for p in out)
    d: list[bytes] = []
    make_delta(io.BufferedReader(io.BytesIO(stream)), old, d.append,  # type: ignore[arg-type]
               MakeOptions(jobs=1, codec=codec))
    return stream, b"".join(bytes(p) for p in d)


@pytest.mark.parametrize("codec", ["hdiff", "bsdiff", "zstd", "edits"])
def test_wrong_old_file_named_when_its_patch_fails(
    tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A patch whose new content has a digest does not hash its old file when it applies
    (the new digest and DEND cover it): the expansion is the stream, byte for byte; an old
    file of the right size with one byte changed is still named as the cause."""
    old, stream, delta = _patched_case(tmp_path, codec)
    patches: list[Patch] = []
    sizes: list[int] = []
    real, start = oldfiles.digest, patching.Patcher.start

    def counted(algo: int, data: bytes) -> bytes:
        sizes.append(len(data))
        return real(algo, data)

    def seen(self: patching.Patcher, p: Patch) -> None:
        patches.append(p)
        start(self, p)

    monkeypatch.setattr(oldfiles, "digest", counted)
    monkeypatch.setattr(patching, "digest", counted)
    monkeypatch.setattr(patching.Patcher, "start", seen)
    got: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), old, lambda p: got.append(bytes(p)))
    assert b"".join(got) == stream
    assert [p.path for p in patches] == [b"f"]  # the file is patched, not carried
    # its old file hashed only where the new content has no digest (format 7's edits)
    assert (300_000 in sizes) == (patches[0].new_algo == NO_DIGEST)
    data = bytearray((old / "f").read_bytes())
    data[150_000] ^= 0xFF
    (old / "f").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="old file differs") as info:
        expand_to(open_delta(io.BytesIO(delta)), old, lambda p: None)
    assert info.value.path == b"f"


@pytest.mark.parametrize("codec", ["hdiff", "bsdiff", "zstd", "edits"])
def test_without_check_digest_no_file_is_hashed(
    tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``check_digest=False`` (``update``: the tree received is checked against the
    release's content identity, which reads every file a patch wrote from the tree itself):
    neither the patched content nor its old file is hashed, so a wrong old file of the
    right size expands to other bytes without an error here; the default names it."""
    old, stream, delta = _patched_case(tmp_path, codec)
    sizes: list[int] = []
    real = oldfiles.digest

    def counted(algo: int, data: bytes) -> bytes:
        sizes.append(len(data))
        return real(algo, data)

    monkeypatch.setattr(oldfiles, "digest", counted)
    monkeypatch.setattr(patching, "digest", counted)

    def expand(check_digest: bool) -> bytes:
        got: list[bytes] = []
        for _kind, pieces, _rec in expand_items(open_delta(io.BytesIO(delta)), old,
                                                check_digest=check_digest):
            got += [bytes(p) for p in pieces]
        return b"".join(got)

    assert expand(check_digest=False) == stream
    assert sizes == []
    data = bytearray((old / "f").read_bytes())
    data[150_000] ^= 0xFF
    (old / "f").write_bytes(bytes(data))
    assert expand(check_digest=False) != stream
    assert sizes == []
    with pytest.raises(ChecksumError, match="differs"):
        expand(check_digest=True)


def test_without_check_digest_nothing_is_hashed_but_count_and_size_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``check_digest=False`` (``update``, whose delta was checked against the signed index
    and whose tree is checked against the release's identity): the expanded stream is not
    hashed, so a wrong DEND digest passes; a wrong count or size still fails; the default
    refuses the wrong digest."""
    from btrdelta.delta import expand as expand_mod
    from btrdelta.delta.encoding import encode_item
    from btrdelta.delta.format import DeltaEnd

    old, stream, delta = _patched_case(tmp_path, "hdiff")
    end = delta_items(delta)[-1]
    assert type(end) is DeltaEnd
    tail = b"".join(bytes(p) for p in encode_item(end))
    assert delta.endswith(tail)

    def with_end(**change: object) -> bytes:
        fields: dict[str, object] = {"count": end.count, "size": end.size,
                                     "hash_algo": end.hash_algo, "digest": bytes(end.digest),
                                     **change}
        return delta[: -len(tail)] + b"".join(
            bytes(p) for p in encode_item(DeltaEnd(**fields)))  # type: ignore[arg-type]

    def expand(data: bytes, check_digest: bool) -> bytes:
        got: list[bytes] = []
        for _kind, pieces, _rec in expand_items(open_delta(io.BytesIO(data)), old,
                                                check_digest=check_digest):
            got += [bytes(p) for p in pieces]
        return b"".join(got)

    hashers: list[int] = []
    real = expand_mod.hasher
    monkeypatch.setattr(expand_mod, "hasher", lambda algo: hashers.append(algo) or real(algo))
    wrong = with_end(digest=bytes(32))
    assert expand(wrong, check_digest=False) == stream
    assert hashers == []  # the expanded stream was not hashed
    with pytest.raises(ChecksumError, match="digest mismatch"):
        expand(wrong, check_digest=True)
    for change in ({"count": end.count + 1}, {"size": end.size - 1}):
        with pytest.raises(ChecksumError, match="DEND says"):
            expand(with_end(**change), check_digest=False)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_write_counted_not_made_has_the_size_of_its_bytes(version: int) -> None:
    """The records-only expansion of an unhashed stream counts a regenerated WRITE by its
    size: the size of its bytes, for every version and length (a PATH too long for the
    format still fails as when it is made)."""
    from btrdelta.delta.expand import _encode_write, _write_size
    from btrdelta.errors import BtrdeltaError

    for path, n in [(b"f", 0), (b"d/" * 100 + b"x", 1), (b"p", 4096), (b"q", 0xFFFF),
                    (b"r", 128 << 10)]:
        rec = R.Write(path, 12345, bytes(n))
        try:
            made = sum(len(p) for p in _encode_write(rec, version))
        except BtrdeltaError as exc:  # (v1: 64 KiB of data does not fit)
            with pytest.raises(type(exc)):
                _write_size(rec, version)
            continue
        assert [len(p) for p in _write_size(rec, version)] == [made]
    with pytest.raises(BtrdeltaError):
        _write_size(R.Write(b"x" * 0x10000, 0, b"a"), version)


def test_the_records_of_an_unhashed_expansion_are_the_streams_and_its_size_is_checked(
        tmp_path: Path) -> None:
    """``expand_events(..., check_digest=False)`` (``update``'s hop, WRITEs counted, not
    made): the records are the plain stream's, and a DEND whose size is one byte off is
    still refused."""
    from btrdelta.delta.encoding import encode_item
    from btrdelta.delta.events import expand_events
    from btrdelta.delta.format import DeltaEnd

    old, stream, delta = _patched_case(tmp_path, "hdiff")
    want = [ev for ev in StreamReader(io.BytesIO(stream)).events()
            if type(ev).__name__ != "StreamHeader"]

    def records(data: bytes) -> list[object]:
        return [ev for ev in expand_events(io.BytesIO(data), old, check_digest=False)
                if type(ev).__name__ != "StreamHeader"]

    assert records(delta) == want
    end = delta_items(delta)[-1]
    assert type(end) is DeltaEnd
    tail = b"".join(bytes(p) for p in encode_item(end))
    wrong = delta[: -len(tail)] + b"".join(bytes(p) for p in encode_item(
        DeltaEnd(end.count, end.size + 1, end.hash_algo, bytes(end.digest))))
    with pytest.raises(ChecksumError, match="DEND says"):
        records(wrong)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_old_file_checks_close_the_files_handed_over(tmp_path: Path) -> None:
    """Old files handed to :class:`~btrdelta.delta.oldfiles.OldFileChecks` open (as
    ``receive`` does with the unchanged files it clones) are checked from offset 0 and
    closed: checked, failed (the first failure is raised, with its record index), behind a
    failure in the same batch, or dropped by ``close``; a file looked up by path is
    checked as before."""
    algo = HashAlgo.BLAKE3_128
    files = []
    for i in range(8):
        data = bytes([i]) * (1000 + i)
        (tmp_path / f"f{i}").write_bytes(data)
        files.append((f"f{i}".encode(), data))

    def handed(checks: oldfiles.OldFileChecks, bad: int | None) -> list[int]:
        fds = []
        for i, (name, data) in enumerate(files):
            fd = os.open(tmp_path / name.decode(), os.O_RDONLY)
            os.lseek(fd, 7, os.SEEK_SET)  # moved by the caller's lseeks: read from 0
            want = oldfiles.digest(algo, data if i != bad else b"other")
            checks.add(tmp_path, name, len(data), algo, want, 100 + i, fd)
            fds.append(fd)
        return fds

    checks = oldfiles.OldFileChecks(2)
    fds = handed(checks, None)
    checks.add(tmp_path, b"f0", 1000, algo, oldfiles.digest(algo, files[0][1]), 99)
    checks.wait()
    checks.close()
    assert not any(_fd_open(fd) for fd in fds)

    checks = oldfiles.OldFileChecks(2)
    fds = handed(checks, 3)
    with pytest.raises(ChecksumError, match="old file differs") as info:
        checks.wait()
    assert info.value.index == 103
    assert info.value.path == b"f3"
    checks.close()
    assert not any(_fd_open(fd) for fd in fds)

    checks = oldfiles.OldFileChecks(2)
    fds = handed(checks, None)  # fewer than a batch: never submitted
    checks.close()
    assert not any(_fd_open(fd) for fd in fds)

    checks = oldfiles.OldFileChecks(2)
    checks.add(tmp_path, b"f1", 5, algo, bytes(16), 7)
    with pytest.raises(ChecksumError, match="the patch expects"):
        checks.wait()
    checks.close()


def test_old_file_checks_hold_at_most_max_fds_open(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_MAX_FDS`` files held open, a file handed over is closed at once and checked
    by its path (the caller never waits for a batch to give fds back); it is checked all
    the same: a wrong one fails with its record index."""
    monkeypatch.setattr(oldfiles.OldFileChecks, "_MAX_FDS", 2)
    monkeypatch.setattr(oldfiles.OldFileChecks, "_BATCH_FILES", 100)  # one batch, at wait()
    algo = HashAlgo.BLAKE3_128
    for bad in (None, 4):
        checks = oldfiles.OldFileChecks(2)
        fds = []
        for i in range(6):
            data = bytes([i]) * (500 + i)
            (tmp_path / f"g{i}").write_bytes(data)
            fd = os.open(tmp_path / f"g{i}", os.O_RDONLY)
            want = oldfiles.digest(algo, data if i != bad else b"other")
            checks.add(tmp_path, f"g{i}".encode(), len(data), algo, want, 200 + i, fd)
            fds.append(fd)
        assert [_fd_open(fd) for fd in fds] == [True, True, False, False, False, False]
        if bad is None:
            checks.wait()
        else:
            with pytest.raises(ChecksumError, match="old file differs") as info:
                checks.wait()
            assert (info.value.index, info.value.path) == (204, b"g4")
        checks.close()
        assert not any(_fd_open(fd) for fd in fds[:2])


def test_old_file_checks_read_through_one_buffer_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check thread reads every file of every batch through one buffer of its own
    (``_CHUNK`` bytes): files shorter, as long as and longer than it, one batch after
    another, are checked with nothing of the last file read left in the hash; a byte
    changed past the first buffer's worth is still refused, with its record index."""
    monkeypatch.setattr(oldfiles.OldFileChecks, "_BATCH_FILES", 2)
    chunk = oldfiles._CHUNK
    algo = HashAlgo.BLAKE3_128
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 17, 5, 2 * chunk]
    rng = random.Random(3)
    files = []
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        (tmp_path / f"h{i}").write_bytes(data)
        files.append((f"h{i}".encode(), data))
    for bad in (None, 5):
        checks = oldfiles.OldFileChecks(2)
        buffers: set[int] = set()
        check = checks._check

        def spy(batch: list[object], check: Callable[[list[object]], None] = check,
                seen: set[int] = buffers) -> None:
            check(batch)
            seen.add(id(oldfiles._local.buf))

        monkeypatch.setattr(checks, "_check", spy)

        def check_all(checks: oldfiles.OldFileChecks = checks, bad: int | None = bad) -> None:
            for i, (name, data) in enumerate(files):
                want = oldfiles.digest(algo, data)
                if i == bad:
                    changed = bytearray(data)
                    changed[2 * chunk + 5] ^= 1
                    (tmp_path / name.decode()).write_bytes(changed)
                checks.add(tmp_path, name, len(data), algo, want, 300 + i)
            checks.wait()

        if bad is None:
            check_all()
        else:  # (raised by a later add() once its batch is done, else by wait())
            with pytest.raises(ChecksumError, match="old file differs") as info:
                check_all()
            assert (info.value.index, info.value.path) == (305, b"h5")
        checks.close()
        assert 1 <= len(buffers) <= 2  # one per thread, whatever the batches


def _snapshots_with(mnt: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """A read-only and a writable snapshot of a subvolume of ``mnt`` holding ``files``."""
    import subprocess

    vol = mnt / "vol"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(vol)], check=True)
    for name, data in files.items():
        (vol / name).write_bytes(data)
    ro, rw = mnt / "ro", mnt / "rw"
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(ro)],
                   check=True)
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", str(vol), str(rw)], check=True)
    return ro, rw


@pytest.mark.btrfs
def test_a_large_old_file_of_a_read_only_snapshot_is_mapped(tmp_path: Path) -> None:
    """``map_old_file``: a file of ``MAP_MIN`` bytes or more in a read-only subvolume comes
    as a read-only mapping (it cannot shrink under it); a smaller one, one in a writable
    subvolume or on another filesystem is read; the content and its checks are the same."""
    import mmap

    from tests.conftest import btrfs_loop

    big = _text(random.Random(3), oldfiles.MAP_MIN + 12345)
    algo = HashAlgo.BLAKE3
    with btrfs_loop() as mnt:
        ro, rw = _snapshots_with(mnt, {"big": big, "small": big[:5000]})
        (tmp_path / "big").write_bytes(big)
        got = oldfiles.map_old_file(ro, b"big", expected_size=len(big), algo=algo,
                                    expected_digest=oldfiles.digest(algo, big))
        assert isinstance(got, mmap.mmap)
        assert got[:] == big
        for root, name in ((ro, b"small"), (rw, b"big"), (tmp_path, b"big")):
            assert type(oldfiles.map_old_file(root, name)) is bytes
        assert type(oldfiles.read_old_file(ro, b"big")) is bytes
        with pytest.raises(ChecksumError, match="old file differs"):
            oldfiles.map_old_file(ro, b"big", algo=algo, expected_digest=bytes(32))


@pytest.mark.btrfs
@pytest.mark.parametrize("codec", ["hdiff", "edits", "zstd"])
def test_a_patch_of_a_mapped_old_file_expands_to_the_stream(
    tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old file of a patch in a read-only parent snapshot, 1 MiB or more, is mapped for
    the codecs that take any buffer (hdiff, edits), read for the others (zstd): the
    expansion is the stream either way."""
    from btrdelta.fs.btrfs import subvol_info
    from tests.conftest import btrfs_loop

    base = _text(random.Random(5), oldfiles.MAP_MIN + 300_000)
    new = base[:1000] + b"EDITED" + base[1000:-7]
    mapped: list[bool] = []
    real = oldfiles._frozen
    monkeypatch.setattr(oldfiles, "_frozen", lambda fd: mapped.append(real(fd)) or mapped[-1])
    with btrfs_loop() as mnt:
        ro, _rw = _snapshots_with(mnt, {"f": base})
        fd = os.open(ro, os.O_RDONLY | os.O_DIRECTORY)
        try:
            parent = subvol_info(fd)
        finally:
            os.close(fd)
        stream, delta = _rewrite_delta(ro, new, codec, parent.uuid, parent.ctransid)
        mapped.clear()
        got: list[bytes] = []
        expand_to(open_delta(io.BytesIO(delta)), ro, lambda p: got.append(bytes(p)))
        assert b"".join(got) == stream
    assert mapped == ([True] if codec != "zstd" else [])
