"""``btrdelta receive`` of a delta of a kernel ``--compressed-data`` stream on btrfs: the
extents of unchanged files are left to their CLONEs from the parent (never recompressed),
the changed files' extents are written compressed as the kernel writes them; the tree is
``btrfs receive``'s."""

from __future__ import annotations

import fcntl
import io
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from btrdelta import _native, receive_any
from btrdelta.delta import diffing, expand_events, expand_to, open_delta, patching
from btrdelta.delta import events as events_mod
from btrdelta.delta.encoding import encode_item
from btrdelta.delta.format import DeltaEnd
from btrdelta.delta.recompress import compress_extent
from btrdelta.errors import ChecksumError
from btrdelta.stream import records as R
from btrdelta.stream.reader import iter_records
from btrdelta.testing.loopfs import run
from btrdelta.testing.scenarios import kernel_receive as btrfs_receive
from btrdelta.testing.scenarios import send
from btrdelta.tree.treesum import tree_sum

from .conftest import Pair, delta_items
from .test_delta_kernel import make

pytestmark = pytest.mark.btrfs

_FIEMAP = 0xC020660B  # FS_IOC_FIEMAP
_HEAD = struct.Struct("=QQIIII")
_EXT = struct.Struct("=QQQQQIIII")
_ENCODED = 0x8  # FIEMAP_EXTENT_ENCODED: the extent is compressed
_SHARED = 0x2000  # FIEMAP_EXTENT_SHARED: the extent is shared (with the parent here)


def _encoded_layout(path: Path, flag: int = _ENCODED) -> list[tuple[int, int]]:
    """(logical offset, length) of ``path``'s compressed extents (FIEMAP), or of those
    with ``flag``."""
    count = 512
    buf = bytearray(_HEAD.pack(0, 1 << 62, 1, 0, count, 0) + bytes(_EXT.size * count))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), _FIEMAP, buf)
    out = []
    for i in range(_HEAD.unpack_from(buf)[3]):
        logical, _phys, length, _r1, _r2, flags, *_ = _EXT.unpack_from(
            buf, _HEAD.size + i * _EXT.size)
        if flags & flag:
            out.append((logical, length))
    return out


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the extents recompressed from now on (appended by worker threads)."""
    calls: list[int] = []

    def counted(raw: Any, compression: int, level: int) -> bytes:
        calls.append(len(raw))
        return compress_extent(raw, compression, level)

    monkeypatch.setattr(patching, "compress_extent", counted)
    return calls


def _dests(pair: Pair, tmp_path: Path, *names: str) -> list[Path]:
    """Fresh directories on the pair's btrfs holding the parent A (received by the kernel)."""
    full_a = send(pair.a, tmp_path / "A.full")
    dests = []
    for name in names:
        d = pair.mnt / f"ev-{tmp_path.name}-{name}"
        d.mkdir()
        btrfs_receive(full_a, d)
        dests.append(d)
    return dests


@pytest.mark.parametrize("short", [False, True], ids=["now", "short-edits"])
def test_receive_leaves_unchanged_extents_to_clones(
    delta_pairs: dict[str, Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    short: bool,
) -> None:
    """A release rebuilt with most files unchanged (new inodes), sent by the kernel with
    ``--compressed-data`` from a compress=zstd file system: ``receive`` recompresses no
    extent of an unchanged file and gives ``btrfs receive``'s tree; ``delta expand`` still
    regenerates every extent, bit for bit. The changed files get ``edits2`` patches: as
    ``delta make`` writes them now, with their new content's digest (format 10), whose
    extents are written as data (nothing recompressed); as it wrote them before format 10
    (``short``: the short CPATCH with the old file's digest, no new digest), whose extents
    are recompressed for their CRC (as many as the kernel sent for them) and written
    compressed where the kernel's receive has them compressed."""
    pair = delta_pairs["rebuilt-same"]
    stream = pair.streams["v2"]
    if short:
        monkeypatch.setattr(diffing, "new_digest_only", lambda res: False)
    delta, stats = make(stream, pair.a)
    monkeypatch.undo()
    assert stats.files_by_codec["edits2"] > 0, stats.files_by_codec  # type: ignore[attr-defined]
    kernel_dest, ours_dest = _dests(pair, tmp_path, "k", "o")
    btrfs_receive(stream, kernel_dest)
    kernel, ours = kernel_dest / pair.b.name, ours_dest / pair.b.name

    with open(stream, "rb") as f:
        sent = [r for r in iter_records(f) if type(r) is R.EncodedWrite]
    def same(path: bytes) -> bool:
        old, new = pair.a / path.decode(), pair.b / path.decode()
        return old.is_file() and old.read_bytes() == new.read_bytes()

    changed = {r.path for r in sent if not same(r.path)}
    expected = sum(r.path in changed for r in sent)
    assert 0 < expected < len(sent) // 4, (expected, len(sent))  # mostly unchanged files

    calls = _counting(monkeypatch)
    receive_any(io.BytesIO(delta), ours_dest)
    assert len(calls) == (expected if short else 0)
    assert tree_sum(ours, ignore_root_mtime=True, holes=True) == tree_sum(
        kernel, ignore_root_mtime=True, holes=True)
    for path in sorted(changed) if short else ():
        assert _encoded_layout(ours / path.decode()) == _encoded_layout(kernel / path.decode())
        assert _encoded_layout(kernel / path.decode())  # the kernel's are compressed

    calls.clear()
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), pair.a, out.append)
    assert b"".join(bytes(p) for p in out) == stream.read_bytes()
    assert len(calls) == len(sent)


def _with_end(delta: bytes, **change: Any) -> bytes:
    """``delta`` with its DEND record's fields changed."""
    end = delta_items(delta)[-1]
    assert type(end) is DeltaEnd
    old = b"".join(bytes(p) for p in encode_item(end))
    assert delta.endswith(old)
    fields = {"count": end.count, "size": end.size, "hash_algo": end.hash_algo,
              "digest": bytes(end.digest), **change}
    return delta[: -len(old)] + b"".join(bytes(p) for p in encode_item(DeltaEnd(**fields)))


def test_receive_with_clones_checks_count_and_size(
    delta_pairs: dict[str, Pair], tmp_path: Path
) -> None:
    """With extents left to their clones the DEND digest cannot be computed; the command
    count and byte size still are (a wrong one leaves no subvolume, exit code of a checksum
    error), and the full check (``expand_events``' default, what a signed receive uses)
    still refuses a wrong digest."""
    pair = delta_pairs["rebuilt-same"]
    delta = make(pair.streams["v2"], pair.a)[0]
    end = delta_items(delta)[-1]
    assert type(end) is DeltaEnd
    for n, change in enumerate(({"count": end.count + 1}, {"size": end.size - 1})):
        (dest,) = _dests(pair, tmp_path, f"bad{n}")
        bad = tmp_path / f"bad{n}.delta"
        bad.write_bytes(_with_end(delta, **change))
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-f", str(bad),
                               str(dest)], capture_output=True, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == ChecksumError.exit_code, err
        assert "DEND says" in err, err
        assert "Traceback" not in err, err
        assert not (dest / pair.b.name).exists()
    wrong = _with_end(delta, digest=bytes(32))
    with pytest.raises(ChecksumError, match="digest mismatch"):
        list(expand_events(io.BytesIO(wrong), lambda _s: pair.a))


def test_receive_writes_verified_patched_extents_as_data(
    delta_pairs: dict[str, Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changed file's extents, patched with a codec whose new content has a digest
    (checked before any of it goes out), are written as data by ``receive``: nothing is
    recompressed, the tree is ``btrfs receive``'s; ``delta expand`` of the same delta
    still regenerates every extent bit for bit."""
    pair = delta_pairs["rebuilt-same"]
    stream = pair.streams["v2"]
    delta = make(stream, pair.a, codec="hdiff")[0]
    with open(stream, "rb") as f:
        sent = [r for r in iter_records(f) if type(r) is R.EncodedWrite]
    kernel_dest, ours_dest = _dests(pair, tmp_path, "k", "o")
    btrfs_receive(stream, kernel_dest)
    calls = _counting(monkeypatch)
    receive_any(io.BytesIO(delta), ours_dest)
    assert calls == []
    kernel, ours = kernel_dest / pair.b.name, ours_dest / pair.b.name
    assert tree_sum(ours, ignore_root_mtime=True, holes=True) == tree_sum(
        kernel, ignore_root_mtime=True, holes=True)
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), pair.a, out.append)
    assert b"".join(bytes(p) for p in out) == stream.read_bytes()
    assert len(calls) == len(sent)


def _patched_pair(mnt: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Snapshots A and B (and B's ``--compressed-data`` stream) on the compress=zstd btrfs
    at ``mnt``: a 3 MiB library (compressible text around 256 KiB of random bytes)
    rewritten as a new file with a few bytes changed in two places, and a 1.5 MiB old
    file with a hole rewritten with zeros in its place and a byte changed."""
    rnd = random.Random(5)
    vol = mnt / f"vol-{tmp_path.name}"
    run("btrfs", "-q", "subvolume", "create", vol)
    text = b"".join(b"symbol %d at %s\n" % (i, rnd.randbytes(6).hex().encode())
                    for i in range(120_000))
    lib = text[: 1 << 20] + rnd.randbytes(1 << 18) + text[1 << 20:]
    lib = lib[: 3 << 20]
    (vol / "lib.so").write_bytes(lib)
    with open(vol / "sparse", "wb") as f:
        f.write(text[: 1 << 20])
        f.seek(3 << 19)
        f.write(b"end")
    run("sync")
    a, b = mnt / f"{tmp_path.name}-A", mnt / f"{tmp_path.name}-B"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
    new = bytearray(lib)
    new[(1 << 20) + 5000 : (1 << 20) + 5100] = bytes(100)
    new[2 << 20 : (2 << 20) + 10] = b"0123456789"
    for name, data in (("lib.so", bytes(new)),
                       ("sparse", b"X" + text[1 : 1 << 20] + bytes(1 << 19) + b"end")):
        (vol / name).unlink()
        (vol / name).write_bytes(data)  # a new file: the stream writes all of it
    run("sync")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    return a, b, send(b, tmp_path / "AB.v2", parent=a, proto=2, compressed=True)


def test_receive_clones_a_patched_file_s_unchanged_ranges(
    delta_pairs: dict[str, Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A patched file's verified new content is written as data except where it equals
    its old file at the same offsets: those ranges are cloned from the parent (FIEMAP:
    they share its extents, the changed ones do not), written data and clones both from
    a file's compressed extents and its plain ones. The tree is ``btrfs receive``'s,
    holes included: an old file with a hole is not cloned from (its hole would stand
    where the stream writes zeros). The 3 MiB library's new content is mapped over its
    old file in the read-only parent (``_hpatch.Output``, where the C applier is built);
    the sparse file's old file is read, not mapped, and its content is fresh memory."""
    mnt = delta_pairs["rebuilt-same"].mnt
    a, b, stream = _patched_pair(mnt, tmp_path)
    delta = make(stream, a, codec="hdiff")[0]
    contents: dict[bytes, str] = {}
    apply = patching.Patcher._apply

    def recorded(self: patching.Patcher, root: Any, p: Any, old: Any, patch: bytes) -> Any:
        new = apply(self, root, p, old, patch)
        contents[p.path] = type(new).__name__
        return new

    monkeypatch.setattr(patching.Patcher, "_apply", recorded)
    dests = []
    for name in ("k", "o"):
        d = mnt / f"ev-{tmp_path.name}-{name}"
        d.mkdir()
        btrfs_receive(send(a, tmp_path / "A.full"), d)
        dests.append(d)
    btrfs_receive(stream, dests[0])
    receive_any(io.BytesIO(delta), dests[1])
    kernel, ours = dests[0] / b.name, dests[1] / b.name
    assert tree_sum(ours, ignore_root_mtime=True, holes=True) == tree_sum(
        kernel, ignore_root_mtime=True, holes=True)
    with open(stream, "rb") as f:
        kinds = {type(r) for r in iter_records(f) if getattr(r, "path", b"") == b"lib.so"}
    assert {R.Write, R.EncodedWrite} <= kinds  # the random bytes are sent plain
    shared = _encoded_layout(ours / "lib.so", _SHARED)
    assert sum(n for _, n in shared) >= (5 << 20) // 2
    for start in ((1 << 20) + 5000, 2 << 20):  # the changed bytes are written
        assert not any(off <= start < off + n for off, n in shared)
    assert _encoded_layout(kernel / "lib.so", _SHARED) == []
    assert _encoded_layout(ours / "sparse", _SHARED) == []
    mapped = "Output" if _native.live("hpatch") is not None else "bytes"
    assert contents == {b"lib.so": mapped, b"sparse": "bytes"}


def test_the_records_before_a_long_patch_go_out_before_it_is_applied(
    delta_pairs: dict[str, Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records gathered before a patch of 1 MiB or more of new content go out to the
    receiver before the patch is applied (it may take tens of milliseconds: the
    receiving thread applies them meanwhile), even where a batch would hold far more;
    the events are the same."""
    mnt = delta_pairs["rebuilt-same"].mnt
    a, _b, stream = _patched_pair(mnt, tmp_path)
    delta = make(stream, a, codec="hdiff")[0]
    whole = [e for batch in expand_events(io.BytesIO(delta), a).batches() for e in batch]
    for name, value in (("_EVENTS_BATCH", 1 << 30), ("_EVENTS_BYTES", 1 << 40),
                        ("_FIRST_BATCH", 1 << 30)):
        monkeypatch.setattr(events_mod, name, value)
    received: list[Any] = []
    applied: list[tuple[int, int]] = []  # (new size, events received by then)
    finish = patching.Patcher._finish

    def recorded(self: patching.Patcher, p: Any, patch: bytes) -> None:
        applied.append((p.new_size, len(received)))
        finish(self, p, patch)

    monkeypatch.setattr(patching.Patcher, "_finish", recorded)
    for batch in expand_events(io.BytesIO(delta), a).batches():
        received += batch
    assert received == whole
    big = [(size, got) for size, got in applied if size >= 1 << 20]
    assert len(big) == 2  # lib.so and sparse, both hdiff-patched
    for _size, got in big:
        assert 0 < got < len(received)
        assert type(received[got - 1]) is not R.Write  # not the patched data


def test_receive_joins_the_clones_of_a_file_s_extents(
    delta_pairs: dict[str, Pair], tmp_path: Path
) -> None:
    """An unchanged file of several compressed extents is one CLONE from the parent (one
    FICLONERANGE, one open of its old file), not one per extent; the tree is ``btrfs
    receive``'s (a receive of the same delta: see the tests above)."""
    pair = delta_pairs["rebuilt-same"]
    stream = pair.streams["v2"]
    delta = make(stream, pair.a)[0]
    with open(stream, "rb") as f:
        extents = Counter(r.path for r in iter_records(f) if type(r) is R.EncodedWrite)
    batches = expand_events(io.BytesIO(delta), lambda _s: pair.a, clone_same=True,
                            hash_clones=False).batches()
    events = [e for batch in batches for e in batch]
    clones = [e for e in events if type(e) is R.Clone]
    per_file = Counter(c.path for c in clones)
    several = [p for p, n in extents.items() if n > 1 and p in per_file]
    assert several  # files of several extents, unchanged: left to clones
    assert all(per_file[p] == 1 for p in several)
    for p in several:
        (clone,) = (c for c in clones if c.path == p)
        assert clone.offset == clone.clone_offset == 0
        assert clone.length == (pair.b / p.decode()).stat().st_size
    for a, b in pairwise(events):
        assert not (type(a) is type(b) is R.Clone and events_mod._joined(a, b))  # type: ignore[arg-type]


def test_receive_checks_cloned_files_before_the_subvolume_is_named(
    delta_pairs: dict[str, Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unchanged files are cloned from the parent while their old files are checked in
    the background: a parent file changed after it was received (made writable and back)
    fails the receive with the old-file error (exit code 5, one line), the parent is left
    as it was and no subvolume gets the new name, in process and from the CLI."""
    from btrdelta.delta import oldfiles
    from btrdelta.fs.btrfs import set_readonly

    pair = delta_pairs["rebuilt-same"]
    delta = make(pair.streams["v2"], pair.a)[0]
    (dest,) = _dests(pair, tmp_path, "corrupt")
    parent = dest / pair.a.name
    same = [p for p in sorted(pair.a.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.stat().st_size > 8192
            and p.name != "sparse"
            and (pair.b / p.relative_to(pair.a)).read_bytes() == p.read_bytes()]
    victim = parent / same[-1].relative_to(pair.a)  # late in the stream: checked deferred
    fd = os.open(parent, os.O_RDONLY)
    try:
        set_readonly(fd, False)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        set_readonly(fd, True)
    finally:
        os.close(fd)
    before = tree_sum(parent)

    deferred: list[bytes] = []
    add = oldfiles.OldFileChecks.add

    def counted(self: Any, root: Any, path: bytes, *args: Any) -> None:
        deferred.append(path)
        add(self, root, path, *args)

    monkeypatch.setattr(oldfiles.OldFileChecks, "add", counted)
    with pytest.raises(ChecksumError, match="old file differs") as info:
        receive_any(io.BytesIO(delta), dest)
    assert str(victim.relative_to(parent)).encode() in deferred
    assert info.value.path == str(victim.relative_to(parent)).encode()
    assert info.value.index is not None
    assert not (dest / pair.b.name).exists()
    assert sorted(p.name for p in dest.iterdir()) == [pair.a.name]
    assert tree_sum(parent) == before

    bad = tmp_path / "AB.delta"
    bad.write_bytes(delta)
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-f", str(bad),
                           str(dest)], capture_output=True, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == ChecksumError.exit_code, err
    assert "old file differs" in err, err
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in dest.iterdir()) == [pair.a.name]

    # a shorter old file fails before its CLONE is made (which would fail otherwise, with
    # another error): its size is looked up when it is met
    fd = os.open(parent, os.O_RDONLY)
    try:
        set_readonly(fd, False)
        os.truncate(victim, len(data) // 2)
        set_readonly(fd, True)
    finally:
        os.close(fd)
    with pytest.raises(ChecksumError, match="the patch expects") as info:
        receive_any(io.BytesIO(delta), dest)
    assert info.value.path == str(victim.relative_to(parent)).encode()
    assert sorted(p.name for p in dest.iterdir()) == [pair.a.name]
