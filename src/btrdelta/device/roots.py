"""Building a bootable root: receive a release under a hidden name in ``roots/``.

Owns: turning a release source (a send stream, a delta stream, a directory tree; a
repository or a chunk archive through :mod:`.fetch`) into a finished read-only subvolume
``roots/.staged-NAME`` and checking it; moving it into place. The stream's own subvolume
name is replaced by the staging name on the fly (so any release stream fits any slot), and
a stream holding more than one subvolume is refused.

Does not own: which slot to build, when a root becomes bootable (:mod:`.install`,
:mod:`.boot`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from ..errors import ChecksumError
from ..fs import btrfs as sv
from ..receive import ReceivedSubvol, receive
from ..receive.receiver import BatchedEvents
from ..stream.reader import Event, StreamReader
from ..stream.records import Clone, Snapshot, Subvol
from ..tree import tree_sum
from ..tree.incremental import Digests, verified_digests
from ..update import heldsums
from ..update.receive import open_events
from .fetch import archive_stream, from_repository, source_kind
from .layout import DeviceError, Layout

__all__ = ["Built", "Fetch", "build_root", "place_root", "staged_path"]

_CHUNK = 256


@dataclass(frozen=True)
class Fetch:
    """For a repository URL: the version wanted (default the newest), other mirrors, the
    release name and tree-sum of the root the slot is rebuilt from."""

    to: str | None = None
    mirrors: tuple[str, ...] = ()
    parent_release: str | None = None
    parent_sum: str | None = None
    #: other roots of the device (path, recorded tree-sum), offered when they hold it
    holders: tuple[tuple[Path, str], ...] = ()


@dataclass(frozen=True)
class Built:
    """A root received and checked under its staging name."""

    path: Path
    release: str
    uuid: UUID
    tree_sum: str
    records: int
    data_bytes: int
    seconds: float
    source: str
    #: from a repository: the hops applied and the bytes downloaded (records and
    #: data_bytes are not counted there)
    hops: int = 0
    downloaded: int = 0
    #: the root's manifest entries with the lstat each was read with (kept by
    #: :func:`place_root`: a later install checks the root by them, reading no file)
    entries: dict[bytes, Any] | None = None


def staged_path(layout: Layout, name: str) -> Path:
    """Where root ``name`` is built before it takes its name."""
    return layout.roots / f".staged-{name}"


class _Renamed:
    """Events whose one SUBVOL/SNAPSHOT gets the staging name (and, for a stream sent
    from a tree against a local root, whose parent and clone UUIDs name that root)."""

    def __init__(self, events: Iterable[Event], name: bytes,
                 local_parent: UUID | None = None) -> None:
        self.events = events
        self.name = name
        #: the sent parent's UUID -> the local root's (tree sources only)
        self.local_parent = local_parent
        self.uuids: dict[UUID, UUID] = {}
        self.original = b""

    def _fix(self, ev: Any) -> Any:
        kind = type(ev)
        if kind is Subvol or kind is Snapshot:
            if self.original:
                raise DeviceError("a release stream must hold one subvolume; this one has "
                                  f"{os.fsdecode(self.original)!r} and {os.fsdecode(ev.path)!r}")
            self.original = ev.path
            if kind is Subvol:
                return Subvol(self.name, ev.uuid, ev.ctransid)
            clone = ev.clone_uuid
            if self.local_parent is not None:
                self.uuids[clone] = clone = self.local_parent
            return Snapshot(self.name, ev.uuid, ev.ctransid, clone, ev.clone_ctransid)
        if kind is Clone and ev.clone_uuid in self.uuids:
            return Clone(ev.offset, ev.length, ev.path, self.uuids[ev.clone_uuid],
                         ev.clone_ctransid, ev.clone_path, ev.clone_offset)
        return ev

    def batches(self) -> Generator[list[Event], None, None]:
        inner: Iterator[list[Event]]
        if isinstance(self.events, BatchedEvents):
            inner = self.events.batches()
        else:
            inner = _chunks(iter(self.events))
        watch = (Subvol, Snapshot, Clone) if self.local_parent else (Subvol, Snapshot)
        for batch in inner:
            for i, ev in enumerate(batch):
                if isinstance(ev, watch):
                    batch[i] = self._fix(ev)
            yield batch

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch


def _chunks(it: Iterator[Event]) -> Generator[list[Event], None, None]:
    batch: list[Event] = []
    for ev in it:
        batch.append(ev)
        if len(batch) >= _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _local_uuid(path: Path) -> UUID:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = sv.subvol_info(fd)
    finally:
        os.close(fd)
    return info.received_uuid or info.uuid


def _tree_events(tree: Path, parent: Path | None, name: str) -> Iterable[Event]:
    """Records of a stream of ``tree``, incremental against local root ``parent``."""
    from ..send import send_records

    if parent is None:
        return send_records(tree, name=name.encode())
    return send_records(tree, parent, name=name.encode())


def build_root(
    layout: Layout,
    source: str | os.PathLike[str],
    name: str,
    *,
    parent: Path | None = None,
    expect_sum: str | None = None,
    keys: list[str] | None = None,
    signature: str | None = None,
    fetch: Fetch | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Built:
    """Receive ``source`` as ``roots/.staged-NAME`` (read-only, received UUID set), then
    take its tree-sum and check it against ``expect_sum``.

    ``source`` is a send stream or delta stream (a file, ``-``), a directory tree (sent
    against ``parent``, the local root the device runs, so unchanged files are shared), a
    repository URL or a chunk archive of a plain stream (:mod:`.fetch`; ``fetch`` says what
    to take from a repository). With ``keys`` (Ed25519 public key files) the stream must
    carry a signature by one of them (``signature``, default ``SOURCE.sig``): the root gets
    its staging name only once the whole input verified; a repository's index and an
    archive are checked against one key. A failure removes what was received and waits until btrfs
    gave the space back.

    Raises:
        ChecksumError: the tree-sum is not ``expect_sum``.
        BtrdeltaError: the receive failed (bad stream, missing parent, disk full...).
    """
    staged = staged_path(layout, name)
    if os.path.lexists(staged):
        layout.delete(staged, wait=True)
    start = time.monotonic()
    label = os.fspath(source)
    try:
        done, carried = _receive(layout, source, staged.name, parent, label, on_progress,
                                 keys, signature, fetch or Fetch())
        # (from a repository: as the update checked it against the signed index)
        digests = carried or verified_digests(staged)
        digest = digests.identity
        if expect_sum and digest != expect_sum.lower():
            _check_loose_sum(staged, expect_sum, digest, label)
    except BaseException:
        layout.delete(staged)
        layout.wait_cleaned()  # the receive's own unfinished subvolume too
        raise
    seconds = time.monotonic() - start
    if source_kind(label) == "repository":  # from_repository: its hops and downloads
        return Built(staged, done.name, done.uuid, digest, 0, 0, seconds, label,
                     hops=done.records, downloaded=done.data_bytes, entries=digests.entries)
    return Built(staged, done.name, done.uuid, digest, done.records, done.data_bytes,
                 seconds, label, entries=digests.entries)


def _check_loose_sum(staged: Path, expect_sum: str, digest: str, label: str) -> None:
    """Accept ``expect_sum`` as the root's tree-sum without its top directory's mtime
    (``tree-sum --ignore-root-mtime``): a kernel-made incremental stream sends no utimes of
    the top directory after orphans passed through it, so no receiver can set that mtime
    and the full tree-sum of the source is not reachable."""
    loose = tree_sum(staged, ignore_root_mtime=True)
    if loose == expect_sum.lower():
        return
    raise ChecksumError(
        f"received root has tree-sum {digest} ({loose} without its top directory's mtime, "
        f"as tree-sum --ignore-root-mtime), the release's is {expect_sum}",
        expected=expect_sum, actual=digest, source=label)


@dataclass(frozen=True)
class _Signed:
    """The trusted keys and the signature file of a signed source."""

    keys: list[str]
    signature: str | None
    label: str

    def events(self, f: Any, dest: Path) -> Iterable[Event]:
        from ..trust import load_public_key, read_signature
        from ..update.signed import open_signed_events, signature_path

        sig_path = signature_path(self.label, self.signature)
        return open_signed_events(f, read_signature(sig_path),
                                  [load_public_key(k) for k in self.keys], dest,
                                  source=self.label, signature_source=sig_path)


def _receive(layout: Layout, source: str | os.PathLike[str], staged: str,
             parent: Path | None, label: str,
             on_progress: Callable[[int, int], None] | None, keys: list[str] | None,
             signature: str | None, fetch: Fetch) -> tuple[ReceivedSubvol, Digests | None]:
    """The received root, and from a repository the digests it was checked with."""
    path = Path(source)
    kind = source_kind(label)
    if kind == "repository":
        return from_repository(layout, label, layout.roots / staged, parent=parent,
                               parent_release=fetch.parent_release, to=fetch.to,
                               mirrors=fetch.mirrors, keys=keys, on_progress=on_progress,
                               parent_sum=fetch.parent_sum, holders=fetch.holders)
    if fetch.to is not None or fetch.mirrors:
        raise DeviceError(f"{label}: --to and --mirror are for a repository URL (http(s)://, "
                          "or file:// for a directory)")
    if kind == "archive":  # an archive carries its signature in itself
        with archive_stream(layout, label, parent=parent, keys=keys,
                            on_progress=on_progress) as stream:
            # (an error's offset is the image's: say so)
            return _receive_stream(layout, stream, staged, f"{label} (the archive's image)",
                                   on_progress, None), None
    signed = _Signed(keys, signature, label) if keys else None
    if label != "-" and path.is_dir():
        if signed is not None:
            raise DeviceError(f"{label}: a directory tree carries no signature (install a "
                              "signed stream, or leave out --key)")
        events = _tree_events(path, parent, path.name)
        renamed = _Renamed(events, staged.encode(),
                           _local_uuid(parent) if parent is not None else None)
        done = receive(renamed, layout.roots, on_progress=on_progress, read_ahead=True)
        return _one(done, path.name.encode(), label), None
    import sys

    f: Any = sys.stdin.buffer if label == "-" else open(path, "rb", buffering=0)  # noqa: SIM115
    try:
        return _receive_stream(layout, f, staged, label, on_progress, signed), None
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _receive_stream(layout: Layout, f: Any, staged: str, label: str,
                    on_progress: Callable[[int, int], None] | None,
                    signed: _Signed | None) -> ReceivedSubvol:
    """Receive a (signed) send or delta stream read from ``f`` as ``roots/STAGED``."""
    events = (signed.events(f, layout.roots) if signed is not None
              else open_events(f, layout.roots, source=label))
    inner = getattr(events, "inner", events)  # a signed stream's own events
    renamed = _Renamed(events, staged.encode())
    done = receive(renamed, layout.roots, on_progress=on_progress,
                   read_ahead=not isinstance(inner, StreamReader))
    return _one(done, renamed.original, label)


def _one(done: list[ReceivedSubvol], original: bytes, label: str) -> ReceivedSubvol:
    if len(done) != 1:
        raise DeviceError(f"{label}: no subvolume received")
    got = done[0]
    return ReceivedSubvol(os.fsdecode(original), got.path, got.uuid, got.ctransid,
                          got.parent_uuid, got.parent_path, got.btrfs, got.records,
                          got.data_bytes)


def place_root(layout: Layout, built: Built, name: str) -> None:
    """Move a built root to ``roots/NAME``, replacing what is there (never the running or
    selected root: the caller checked). The old one goes to ``.old-NAME`` first and is
    deleted after, so a crash between the steps leaves hidden work for recovery. The root's
    digests are kept (:mod:`btrdelta.update.heldsums`, in ``.btrdelta/held/``)."""
    final = layout.roots / name
    old = layout.roots / f".old-{name}"
    if os.path.lexists(old):
        layout.delete(old)
    if os.path.lexists(final):
        layout.rename(final, old)
    layout.rename(built.path, final)
    layout.sync()
    if os.path.lexists(old):
        layout.delete(old)
    if built.entries is not None:  # (in .btrdelta/held/: fetch._offer reads them)
        heldsums.save(layout.meta, Digests(final, built.tree_sum, built.entries))
