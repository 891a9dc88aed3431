"""A base record read ahead by a thread (btrdelta/tree/early.py): the reader takes what the
thread read only for the file it read, and a damaged record is the same located error with
the read-ahead as without it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import blake3
import pytest
import zstandard

from btrdelta.errors import StreamFormatError
from btrdelta.send.store import SendshotStore, StoredSendshot
from btrdelta.tree import early
from btrdelta.tree.chain import View
from btrdelta.tree.sendshot import RecordInode, SendshotHead

from .test_sendshot_format import HEAD, _inodes


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts its own read-ahead (once a process otherwise), of records of any
    size (these are ~1 MB)."""
    monkeypatch.setattr(early, "_busy", None)
    monkeypatch.setattr(early, "_got", {})
    monkeypatch.setattr(early, "LEAST", 0)


def _save(store: SendshotStore, i: int, size: int) -> StoredSendshot:
    """A record whose head is the ``i``-th's and whose small file has ``size`` bytes."""
    head = SendshotHead(**{**{f: getattr(HEAD, f) for f in HEAD.__match_args__},
                           "created_ns": HEAD.created_ns + i, "generation": 42 + i})
    inodes = _inodes()
    inodes[5] = RecordInode(261, 0o100644, 0, 0, size, 1, 2, 3, [(259, b"small")],
                            segments=[(0, size)], digest=b"s" * 16, bdigest=b"S" * 32)
    rec = store.save(head, iter(inodes), durable=False)
    os.utime(rec.path, ns=(10**18 + i, 10**18 + i))  # (the newest last)
    return rec


def _store(tmp_path: Path) -> tuple[SendshotStore, list[StoredSendshot]]:
    store = SendshotStore(tmp_path / "store")
    return store, [_save(store, i, 100 + i) for i in range(2)]


def _columns(view: View) -> dict[str, object]:
    return {k: bytes(v) if isinstance(v, (bytes, memoryview)) else v
            for k, v in vars(view.base).items() if not k.startswith("_")}


def test_the_newest_record_is_read_ahead_and_taken_by_its_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread reads the newest record; the store's reader of that file takes its body
    and digest (the columns and the digest are the ones read without it), once; the reader
    of another record reads its own file."""
    store, (old, new) = _store(tmp_path)
    want_new, want_old = _columns(store.view(new)), _columns(store.view(old))
    early.start(store.records)
    with open(new.path, "rb") as f:
        data = f.read()
    with open(new.path, "rb", buffering=0) as f:
        got = early.take(f, data[:22])
    assert got is not None
    body = zstandard.ZstdDecompressor().decompress(data[22:])
    assert blake3.blake3(data[:22] + body).hexdigest() == new.digest
    assert got == (body, new.digest)
    with open(new.path, "rb", buffering=0) as f:
        assert early.take(f, data[:22]) is None  # (given once)

    early._busy = None
    early.start(store.records)
    with open(old.path, "rb", buffering=0) as f:
        assert early.take(f, f.read(22)) is None  # not the record read ahead

    early._busy = None
    early.start(store.records)
    taken = _spy(monkeypatch)
    assert _columns(store.view(new)) == want_new
    assert _columns(store.view(old)) == want_old
    assert taken == [True, False]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each reader of a whole record took what the thread read."""
    import btrdelta.tree.sendshot as sendshot

    taken: list[bool] = []

    def take(file: BinaryIO, header: bytes) -> tuple[bytes, str] | None:
        got = early.take(file, header)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(sendshot, "take", take)
    return taken


def test_a_patch_record_is_not_read_ahead(tmp_path: Path) -> None:
    """A newer patch record (version 5, read with its base) is passed over for the record
    every chain ends in."""
    store, (_old, new) = _store(tmp_path)
    data = Path(new.path).read_bytes()
    patch = Path(store.records) / ("f" * 64 + ".sendshot")
    patch.write_bytes(data[:18] + early.PATCH.to_bytes(4, "little") + data[22:])
    os.utime(patch, ns=(2 * 10**18, 2 * 10**18))
    early.start(store.records)
    with open(new.path, "rb", buffering=0) as f:
        assert early.take(f, data[:22]) is not None


def test_a_small_record_is_left_to_its_reader(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose body is below :data:`~btrdelta.tree.early.LEAST` is not read ahead:
    the size its zstd frame declares (what inflating and hashing it cost), not its file's
    (a record written with a wide window is far smaller than its body: session 31)."""
    store, (_old, new) = _store(tmp_path)
    data = Path(new.path).read_bytes()
    size = zstandard.frame_content_size(data[22:])
    assert size > 2 * len(data)  # (its block digests repeat: a test record)
    for least, ahead in ((size + 1, False), (size, True)):
        early._busy = None
        monkeypatch.setattr(early, "LEAST", least)
        early.start(store.records)
        with open(new.path, "rb", buffering=0) as f:
            assert (early.take(f, f.read(22)) is not None) == ahead
    # a record whose frame does not declare its size (an older writer's): decoded as a
    # stream by its reader, never read ahead
    older = Path(store.records) / ("e" * 64 + ".sendshot")
    older.write_bytes(data[:22] + zstandard.ZstdCompressor(write_content_size=False)
                      .compress(zstandard.ZstdDecompressor().decompress(data[22:])))
    os.utime(older, ns=(2 * 10**18, 2 * 10**18))
    early._busy = None
    monkeypatch.setattr(early, "LEAST", 0)
    early.start(store.records)
    with open(older, "rb", buffering=0) as f:
        assert early.take(f, f.read(22)) is None


def _damage(rec: StoredSendshot, how: str, tmp_path: Path) -> None:
    data = Path(rec.path).read_bytes()
    if how == "a byte of a column":  # (its frame's CRC32C)
        body = bytearray(zstandard.ZstdDecompressor().decompress(data[22:]))
        body[len(body) // 2] ^= 1
        data = data[:22] + zstandard.ZstdCompressor().compress(bytes(body))
    elif how == "truncated":
        data = data[:-1]
    else:  # a valid record of the same head, another content, under this one's name
        data = Path(_save(SendshotStore(tmp_path / "other"), 1, 7).path).read_bytes()
    Path(rec.path).write_bytes(data)
    os.utime(rec.path, ns=(10**18 + 1, 10**18 + 1))


@pytest.mark.parametrize("how", ["a byte of a column", "truncated", "another content"])
def test_a_damaged_record_is_the_same_error_read_ahead(
        tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage in the newest record is reported by the store's reader with the same one-line
    error, whether the thread read it ahead or not."""
    store, (_old, new) = _store(tmp_path)
    _damage(new, how, tmp_path)
    # (a body of repeated block digests, recompressed at level 3: ~1,050 times smaller)
    monkeypatch.setattr(early, "MAX_RATIO", 4096)
    taken = _spy(monkeypatch)
    errors = []
    for ahead in (False, True):
        early._busy = None
        if ahead:
            early.start(store.records)
        with pytest.raises(StreamFormatError) as exc:
            store.view(new)
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith(new.path)
    assert {"a byte of a column": "CRC", "truncated": "truncated record",
            "another content": "not the one its name says"}[how] in errors[0]
    # (taken where the thread could inflate it: the reader's checks found the damage)
    assert taken == [False, how != "truncated"]
