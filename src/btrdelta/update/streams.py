"""Release streams of a versions repository, made and received the same way everywhere.

* :func:`write_release_stream`: the plain send stream of a release tree (full, or
  incremental from an older release), *normalized* so that it depends only on the tree's
  content: every subvolume UUID is the repository's UUID of the release
  (:func:`btrdelta.repo.model.stream_uuid` of its identity) and UTIMES carry the mtime as
  atime, ctime and otime (receivers cannot set ctime; atime changes by reading). A device
  that holds a release regenerates the publisher's full stream of it byte for byte: its
  chunks are seeds for a full download.
* :class:`ChunkConcat`: a readable file over chunks in order (a full rebuilt from a chunk
  store or from packs), checking the whole stream's BLAKE3 before its last byte is handed
  out, so a receive never finishes on bytes that do not check.
* :func:`receive_release`: receive a plain or delta stream as ``dest/NAME``, the parent of
  a delta being found by its UUID below ``dest``; the name is taken only once the tree's
  content identity checked. :func:`receive_version` does the same and returns the new
  tree's file digests; given its parent's (:class:`~btrdelta.tree.incremental.Digests`,
  hashed earlier by the caller), the identity of a delta's result is computed hashing only
  the files the stream may have changed (:class:`~btrdelta.tree.incremental.Changes`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID

import blake3

from ..errors import ChecksumError
from ..receive import ReceivedSubvol, receive
from ..receive.subvolumes import PendingSubvol
from ..repo.model import stream_uuid
from ..stream.reader import Event, StreamReader
from ..stream.records import Clone, Record, Snapshot, Subvol, Utimes
from ..stream.writer import StreamWriter
from ..tree.incremental import Changes, Digests, verified_digests

__all__ = ["STREAM_VERSION", "ChunkConcat", "receive_release", "receive_version",
           "write_release_stream"]

#: send-stream version of repository streams (128 KiB writes, what the kernel sends with
#: ``--proto 2``; btrfs-progs 6.0+ receives it)
STREAM_VERSION = 2


def normalize(records: Iterable[Record], identity: str,
              parent_identity: str | None = None) -> Iterator[Record]:
    """Rewrite UUIDs and times of a send stream's records (see the module docstring)."""
    new_uuid = stream_uuid(identity)
    old_uuid = stream_uuid(parent_identity) if parent_identity else None
    mapping: dict[Any, Any] = {}
    for rec in records:
        if isinstance(rec, Utimes):
            rec.atime = rec.ctime = rec.mtime
            if rec.otime is not None:
                rec.otime = rec.mtime
        elif isinstance(rec, Clone):
            rec.clone_uuid = mapping.get(rec.clone_uuid, rec.clone_uuid)
        elif isinstance(rec, Subvol):
            mapping[rec.uuid] = new_uuid
            rec.uuid = new_uuid
        elif isinstance(rec, Snapshot):
            if old_uuid is None:
                raise ValueError("an incremental stream needs the parent's identity")
            mapping[rec.uuid] = new_uuid
            mapping[rec.clone_uuid] = old_uuid
            rec.uuid = new_uuid
            rec.clone_uuid = old_uuid
        yield rec


def write_release_stream(
    write: Callable[[Any], object], tree: str | os.PathLike[str], name: str, identity: str,
    *, parent: str | os.PathLike[str] | None = None, parent_identity: str | None = None,
    workers: int | None = None,
) -> int:
    """Write the normalized stream of ``tree`` (incremental from ``parent``); returns its
    size in bytes."""
    from ..send import send_records

    size = 0

    def counted(data: Any) -> object:
        nonlocal size
        size += memoryview(data).nbytes
        return write(data)

    writer = StreamWriter(counted, STREAM_VERSION)
    records = send_records(tree, parent, version=STREAM_VERSION, name=name.encode(),
                           workers=workers)
    for rec in normalize(records, identity, parent_identity):
        writer.write(rec)
    return size


class ChunkConcat(io.RawIOBase):
    """The bytes of chunks ``get(0)``, ``get(1)``, … (``count`` of them), checked against
    ``digest`` (BLAKE3-256 of all of them) before the last byte is returned."""

    def __init__(self, count: int, get: Callable[[int], bytes], digest: bytes,
                 *, source: str, on_close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._on_close = on_close
        self._count = count
        self._get = get
        self._digest = digest
        self._source = source
        self._pos = 0
        self._buf = memoryview(b"")
        self._hasher = blake3.blake3()
        self.size = 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        super().close()

    def readinto(self, b: Any) -> int:
        while not self._buf:
            if self._pos >= self._count:
                return 0
            data = self._get(self._pos)
            self._pos += 1
            self._hasher.update(data)
            self.size += len(data)
            if self._pos == self._count and self._hasher.digest() != self._digest:
                raise ChecksumError("rebuilt stream does not match its BLAKE3 digest",
                                    source=self._source, offset=self.size)
            self._buf = memoryview(data)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _Renamed:
    """Events of a stream whose subvolume gets a local staging name (and each of them fed
    to ``changes``)."""

    def __init__(self, events: Any, name: bytes, changes: Changes | None = None,
                 warm: bool = False) -> None:
        self._events = events
        self._name = name
        self._changes = changes
        self._warm = warm

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> Generator[list[Event], None, None]:
        if self._changes is not None and self._warm:
            self._changes.warm()  # its threads start while the first records are expanded
        feed = self._changes.feed if self._changes is not None else None
        for batch in self._events.batches():
            for ev in batch:
                if isinstance(ev, (Subvol, Snapshot)):
                    ev.path = self._name
                if feed is not None:
                    feed(ev)
            yield batch


def receive_release(
    stream: BinaryIO, dest: Path, name: str, *, source: str, delta: bool,
    identity: str | None = None, on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> ReceivedSubvol:
    """Receive one release stream (plain, or a delta against its parent below ``dest``) as
    ``dest/name``; returns it. The subvolume is made under a temporary name and gets
    ``name`` only when complete and, with ``identity``, when its tree-sum is that identity
    (:meth:`btrdelta.receive.subvolumes.Subvolumes.finish`'s pre-commit check). A failure
    leaves nothing under ``name``. ``on_warning``: the receive's (a skipped extended
    attribute; default :func:`btrdelta.errors.warn`)."""
    return _receive(stream, dest, name, source=source, delta=delta, identity=identity,
                    parent=None, on_progress=on_progress, on_warning=on_warning)[0]


def receive_version(
    stream: BinaryIO, dest: Path, name: str, *, source: str, delta: bool, identity: str,
    parent: Digests | None = None, parent_at: tuple[UUID, Path] | None = None,
    verified: bool = False, register: bool = True,
) -> tuple[ReceivedSubvol, Digests]:
    """:func:`receive_release` checking ``identity``; returns the version and its file
    digests. With ``parent`` (the digests of the tree a delta applies to, hashed by the
    caller in this process), files the stream did not change are not read again: see
    :mod:`btrdelta.tree.incremental`. When the parent the receive used is not
    ``parent.root``, every file is read. ``parent_at``: the (received) UUID of the
    parent and its directory, as the caller found it (the receive does not look it up
    again). ``verified``: the caller checked the stream's bytes (``update``: against the
    signed index's BLAKE3), so a delta's expansion is not hashed again for its DEND digest
    (count and size are still checked; the tree is checked against ``identity``). Not
    ``register``: no entry in the directory backend's registry (a version the caller
    finds again by its content and gives as ``parent_at``: ``update``'s intermediates)."""
    return _receive(stream, dest, name, source=source, delta=delta, identity=identity,
                    parent=parent, on_progress=None, parent_at=parent_at,
                    verified=verified, register=register)


def _receive(
    stream: BinaryIO, dest: Path, name: str, *, source: str, delta: bool,
    identity: str | None, parent: Digests | None,
    on_progress: Callable[[int, int], None] | None,
    parent_at: tuple[UUID, Path] | None = None, verified: bool = False,
    register: bool = True, on_warning: Callable[[str], None] | None = None,
) -> tuple[ReceivedSubvol, Digests]:
    from ..update.receive import open_events

    # the parent is looked up once (by the caller, or by the expansion or the applier)
    parents: dict[UUID, Path] = dict([parent_at]) if parent_at is not None else {}
    events: Any = open_events(stream, dest, source=source, parents=parents,
                              check_digest=not (verified and identity is not None))
    is_delta = not isinstance(events, StreamReader)
    if is_delta != delta:
        raise ChecksumError(f"expected a {'delta' if delta else 'plain'} stream",
                            source=source, offset=0)
    changes = Changes() if parent is not None and is_delta else None
    digests: list[Digests] = []
    registered = register  # (`register = register` in a class body reads the module's)

    def incremental(pending: PendingSubvol) -> bool:
        return changes is not None and parent is not None and parent.same_root(
            pending.parent_path)

    class Check:
        """The pre-commit check: the content identity of the sealed subvolume; a delta's
        overlay digests start before the seal (:meth:`Changes.start`). It writes nothing, so
        it runs while the read-only flag commits (``while_sealing``); ``register``: see
        :meth:`~btrdelta.receive.subvolumes.Subvolumes.finish`, which writes the entry
        while the check runs (``register_ahead``: its two ``fsync``s off the path)."""

        while_sealing = True
        register = registered
        register_ahead = True

        def before_seal(self, pending: PendingSubvol) -> None:
            if identity is not None and changes is not None and parent is not None \
                    and incremental(pending):
                changes.start(pending.path, parent)

        def __call__(self, pending: PendingSubvol) -> None:
            if identity is None:
                return
            if changes is not None and parent is not None and incremental(pending):
                got = changes.tree_sum(pending.path, parent)
            else:
                got = verified_digests(pending.path)
            if got.identity != identity:
                raise ChecksumError(f"received {name} does not have its content identity "
                                    f"{identity}", source=source)
            digests.append(got)

    try:
        # a release's delta starts with the SNAPSHOT of its normalized stream (the UUIDs
        # of both identities): the snapshot is made while the first records are expanded
        ahead = (name.encode(), stream_uuid(identity), parent_at[0]) \
            if is_delta and identity is not None and parent_at is not None else None
        warm = changes is not None and identity is not None
        done = receive(_Renamed(events, name.encode(), changes, warm), dest, stop_at_end=True,
                       read_ahead=is_delta, on_progress=on_progress, pre_commit=Check(),
                       parents=parents, snapshot_ahead=ahead, on_warning=on_warning)
    finally:
        if changes is not None:
            changes.close()
    if len(done) != 1:
        raise ChecksumError(f"{len(done)} subvolumes in one release stream", source=source)
    if digests:
        digests[0].root = done[0].path
    return done[0], (digests[0] if digests else Digests(done[0].path, "", {}))
