"""A full send streamed while its tree is walked (send/walk.py ``ScanStream``,
``TreeScan(stream=...)``): the same stream and digests as a send that scanned and hashed the
whole tree first, records out before the walk ends, the walk's errors and stops."""

from __future__ import annotations

import io
import os
import random
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from btrdelta.errors import BtrdeltaError
from btrdelta.send import hashing, walk
from btrdelta.send.emit import Sender, StreamIds
from btrdelta.send.onepass import SentWhole
from btrdelta.send.scan import TreeScan
from btrdelta.stream.reader import StreamReader
from btrdelta.stream.records import Clone
from btrdelta.stream.writer import StreamWriter

MIB = 1 << 20


def _tree(root: Path) -> None:
    """Directories in several levels, hard links across them (the first name in an early
    directory, the others in later ones), a symlink, and files of 1 MiB or more: unique,
    copies (a CLONE of the first), and same size with the same first and last 4 KiB but
    another middle."""
    rng = random.Random(7)
    for d in range(3):
        for sub in ("", "/a", "/a/b", "/c"):
            p = root / f"d{d}{sub}"
            p.mkdir(parents=True, exist_ok=True)
            for i in range(12):
                (p / f"f{i:02}").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
    os.link(root / "d0" / "f00", root / "d2" / "c" / "zz-link")
    os.link(root / "d0" / "f00", root / "link")
    os.link(root / "d1" / "a" / "f03", root / "d1" / "a" / "b" / "again")
    os.symlink("d1/f01", root / "d0" / "sym")
    (root / "d0" / "unique").write_bytes(rng.randbytes(MIB + 5000))
    big = rng.randbytes(MIB + 100_000)
    (root / "d1" / "big").write_bytes(big)
    (root / "d2" / "a" / "big-copy").write_bytes(big)
    edge = rng.randbytes(4096)
    (root / "d1" / "same-edges").write_bytes(edge + rng.randbytes(MIB) + edge)
    (root / "d2" / "same-edges").write_bytes(edge + rng.randbytes(MIB) + edge)
    (root / "empty").mkdir()


def _send(root: Path, *, streamed: bool, workers: int) -> tuple[bytes, Sender]:
    if streamed:
        tscan = TreeScan(root, workers=workers, seed=3, stream=True,
                         hash_as_sent=SentWhole(os.fsencode(root)))
    else:  # every file hashed before the stream
        tscan = TreeScan(root, workers=workers, seed=3)
    sender = Sender(root, scan=tscan, version=2, ids=StreamIds(uuid=UUID(int=1), ctransid=9))
    assert sender.streaming == streamed
    out: list[bytes] = []
    writer = StreamWriter(lambda b: out.append(bytes(b)), 2)
    for rec in sender.records():
        writer.write(rec)
    return b"".join(out), sender


@pytest.mark.parametrize("workers", [1, 2])
def test_a_send_streamed_while_walking_is_the_send_of_the_whole_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """The same bytes (hard links, CLONE of a copy included), node numbering, digests and
    identity; of the large files only the later copy and the later one with the same size
    and edges are hashed ahead, the others as they are sent."""
    root = tmp_path / "t"
    _tree(root)
    _send(root, streamed=False, workers=workers)  # (relatime: directories read once)
    plain, before = _send(root, streamed=False, workers=workers)
    hashed: list[bytes] = []
    real = hashing._hash_file_blocks

    def spy(path: bytes, *args: Any, **kwargs: Any) -> Any:
        hashed.append(path[len(os.fsencode(root)) + 1:])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "_hash_file_blocks", spy)
    streamed, after = _send(root, streamed=True, workers=workers)
    assert streamed == plain
    assert b"d2/a/big-copy" in hashed
    assert b"d2/same-edges" in hashed
    for name in (b"d0/unique", b"d1/big", b"d1/same-edges"):
        assert name not in hashed
    clones = [r for r in StreamReader(io.BytesIO(streamed)) if isinstance(r, Clone)]
    assert [(r.path, r.clone_path) for r in clones] == [(b"d2/a/big-copy", b"d1/big")]
    assert after.estimate == before.estimate == sum(
        n.size for n in before.new.nodes.values() if n.is_reg)
    assert after.new.files == before.new.files
    assert after.new.data_bytes == before.new.data_bytes
    for a, b in zip(before.new.nodes.values(), after.new.nodes.values(), strict=True):
        assert (a.id, a.path, a.dentries, a.digest, a.blocks, a.bdigest, a.segments,
                a.flags) == (b.id, b.path, b.dentries, b.digest, b.blocks, b.bdigest,
                             b.segments, b.flags)
    assert after.new.identity() == before.new.identity()


def _gate(monkeypatch: pytest.MonkeyPatch, where: bytes, *,
          fail: bool = False) -> threading.Event:
    """Hold (or fail) the walk where it reads directory ``where``, until the event."""
    gate = threading.Event()
    real = walk._Scanner.scan_dir

    def held(self: Any, dir_id: int, absdir: bytes, reldir: bytes) -> Any:
        if reldir == where:
            assert gate.wait(20)
            if fail:
                raise BtrdeltaError("cannot read directory: Permission denied", path=absdir)
        return real(self, dir_id, absdir, reldir)

    monkeypatch.setattr(walk._Scanner, "scan_dir", held)
    return gate


def test_records_come_before_the_walk_reaches_a_later_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "t"
    _tree(root)
    gate = _gate(monkeypatch, b"d2")
    tscan = TreeScan(root, workers=2, seed=3, stream=True,
                     hash_as_sent=SentWhole(os.fsencode(root)))
    seen: list[int] = []  # the progress's files, so far
    sender = Sender(root, scan=tscan, version=2, ids=StreamIds(uuid=UUID(int=1), ctransid=9),
                    on_progress=lambda st: seen.append(st.files_scanned))
    records = sender.records()
    paths = []
    for rec in records:
        paths.append(getattr(rec, "path", b""))
        if paths[-1] == b"d1/c/f11":  # the last file before d2
            break
    assert tscan.stream is not None
    assert tscan.stream.walking
    assert b"d2" in paths
    assert not any(p.startswith(b"d2/") for p in paths)
    assert 0 < seen[-1] <= 163 - 53  # (not yet d2's 53 inodes below it)
    gate.set()
    rest = [getattr(rec, "path", b"") for rec in records]
    assert b"d2/c/zz-link" in rest
    assert not tscan.stream.walking
    assert seen[-1] == tscan.new.files == 163


def test_an_error_of_the_walk_ends_the_stream_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that cannot be read: the send fails with the walk's one-line error
    where the stream gets there, and no thread is left running."""
    root = tmp_path / "t"
    _tree(root)
    gate = _gate(monkeypatch, b"d1/a", fail=True)
    gate.set()
    tscan = TreeScan(root, workers=2, seed=3, stream=True)
    sender = Sender(root, scan=tscan, version=2, ids=StreamIds(uuid=UUID(int=1), ctransid=9))
    seen: list[bytes] = []
    records = sender.records()
    with pytest.raises(BtrdeltaError, match="cannot read directory: Permission denied"):
        seen.extend(getattr(rec, "path", b"") for rec in records)
    assert b"d0/f00" in seen  # (what came before was sent)
    assert tscan.stream is not None
    assert not tscan.stream._thread.is_alive()
    assert not any(t.name.startswith(("btrdelta-hash", "btrdelta-scan"))
                   for t in threading.enumerate())


def test_a_stream_given_up_stops_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "t"
    _tree(root)
    gate = _gate(monkeypatch, b"d1")
    tscan = TreeScan(root, workers=2, seed=3, stream=True)
    sender = Sender(root, scan=tscan, version=2, ids=StreamIds(uuid=UUID(int=1), ctransid=9))
    records = sender.records()
    next(records)
    threading.Timer(0.2, gate.set).start()  # (close() waits for the walk's directory)
    records.close()
    assert tscan.stream is not None
    assert not tscan.stream._thread.is_alive()
    with pytest.raises(BtrdeltaError, match="scan stopped"):
        tscan.stream.join()
