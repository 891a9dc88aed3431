"""Releases ``device install`` fetches: from a versions repository or a chunk archive.

Owns: telling a remote release source from a local stream or tree (:func:`source_kind`),
and turning it into a received root under the staging name:

* a **repository** (an ``http(s)://`` URL that is not a ``.bdar``): ``btrdelta update``
  (:func:`btrdelta.update.versions.update`) runs on ``.btrdelta/fetch/`` of the device, where
  the root the slot is rebuilt from was first snapshotted (read-only, under the name of the
  repository's version whose identity is the root's recorded tree-sum, else its release
  name: the planner counts it as held only when its tree-sum is the index's identity of that
  version; a factory base received from a stream or a tree carries the stream's name, not
  the repository's). A root holding the version wanted (the factory root, the other slot:
  its recorded tree-sum is the listing's identity of it) is snapshotted in under that
  version's name too; a root's content is checked by the digests kept for it in
  ``.btrdelta/held/`` (:mod:`btrdelta.update.heldsums`), else every file read once, and the
  snapshot's digests are kept for the update, which then reads none of its files
  (:func:`slot_holds`: the same for the slot to rebuild). The planner picks
  the cheapest path (deltas, or the full reusing that root's chunks); the version arrives
  verified against the signed index and is moved to the staging name. The pinned root key
  and the trusted index state stay in ``.btrdelta/fetch/.btrdelta/`` (rollback protection
  across installs); downloads and verified intermediates stay there while an install is
  unfinished, so a re-run resumes.
* a **chunk archive** (``.bdar``, a path or URL) whose image is a plain send stream of the
  root: cloned into the chunk store ``.btrdelta/fetch/chunks`` (every chunk checked against
  its id; chunks of the plain stream of the root the slot is rebuilt from are reused as
  seeds; an interrupted clone resumes), then read back and received like a stream file.

Does not own: the staging name, verification of the new root and the commit
(:mod:`.roots`, :mod:`.install`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..chunk.archive import MAGIC
from ..chunk.source import file_url_path, is_url
from ..chunk.store import ChunkStore
from ..fs import btrfs as sv
from ..receive import ReceivedSubvol
from ..tree.incremental import Digests, verified_digests
from ..trust import load_public_key
from ..update import heldsums
from ..update.holdings import HOP_PREFIX
from .layout import DeviceError, Layout

if TYPE_CHECKING:
    from ..update.versions import UpdateResult

__all__ = ["WORK", "archive_stream", "clear_work", "from_repository", "slot_holds",
           "source_kind"]

#: the device's fetch area, below the metadata directory
WORK = "fetch"
_ARCHIVE_SUFFIX = ".bdar"
_IMAGE = "release"


def source_kind(source: str) -> str:
    """``"repository"``, ``"archive"`` or ``"local"`` (a stream file, stdin or a tree). A
    ``file://`` URL of a directory is a repository (as ``update`` takes it: a repository
    on a USB stick); a plain directory path stays a tree."""
    if is_url(source):
        return "archive" if source.split("?")[0].endswith(_ARCHIVE_SUFFIX) else "repository"
    if source.startswith("file://") and os.path.isdir(file_url_path(source)):
        return "repository"
    if source != "-" and os.path.isfile(source):
        with open(source, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return "archive"
    return "local"


def work_dir(layout: Layout) -> Path:
    """The fetch area of the device (created)."""
    work = layout.meta / WORK
    work.mkdir(parents=True, exist_ok=True)
    return work


def clear_work(layout: Layout, *, resumable: bool = False) -> None:
    """Drop what a fetch left; keep the pinned root key and the trusted index state, and
    with ``resumable`` what a re-run resumes from (downloads, chunks, verified
    intermediate versions)."""
    work = layout.meta / WORK
    if not work.is_dir():
        return
    for entry in sorted(os.listdir(work)):
        kept = entry.startswith(HOP_PREFIX) or entry == "chunks"
        if entry != ".btrdelta" and not (resumable and kept):
            layout.delete(work / entry)
    if not resumable:
        for sub in ("downloads", "tmp", "chunks", "meta"):
            shutil.rmtree(work / ".btrdelta" / sub, ignore_errors=True)


def _one_key(keys: Sequence[str] | None, what: str) -> str | None:
    if keys and len(keys) > 1:
        raise DeviceError(f"{what} is checked against one key: give --key once")
    return keys[0] if keys else None


def _identities(url: str, key: str | None) -> list[tuple[str, str]]:
    """The repository's versions (name, identity), oldest first: hints only (the update
    checks a held tree's content against the verified index); a repository that cannot be
    listed gives none, and the update says why."""
    from ..errors import BtrdeltaError
    from ..update.listing import list_repo

    try:
        listing = list_repo(url, key=key)
    except (BtrdeltaError, OSError):
        return []
    return [(str(v["name"]), str(v.get("identity"))) for v in listing["versions"]]


def _target(versions: list[tuple[str, str]], to: str | None) -> tuple[str, str] | None:
    """The (name, identity) of version ``to`` (default: the newest) in the hint."""
    return next((v for v in reversed(versions) if to is None or v[0] == to), None)


def _offer(layout: Layout, root: Path, held: Path, identity: str) -> bool:
    """Snapshot device root ``root`` (read-only) as ``held``, an entry of the fetch area the
    update counts as held, when its content is ``identity``: checked by the digests kept
    for it in ``.btrdelta/held/`` (:mod:`btrdelta.update.heldsums`: the same read-only
    subvolume, unchanged), else every file read once (and the digests kept). The
    snapshot's digests are kept for the update too, which then reads no file of it."""
    digests = heldsums.load(layout.meta, root, identity)
    if digests is None:
        digests = verified_digests(root)
        if digests.identity != identity:
            return False  # a root changed behind the state file's back: not held
        heldsums.save(layout.meta, digests)
    if os.path.lexists(held):
        layout.delete(held)
    layout.snapshot(root, held, readonly=True)
    from ..update.versions import STATE

    heldsums.save(held.parent / STATE, Digests(held, identity, digests.entries))
    return True


def slot_holds(layout: Layout, url: str, slot: Path, recorded: str, *, to: str | None,
               mirrors: Sequence[str], keys: Sequence[str] | None) -> UpdateResult | None:
    """The result of an update to version ``to`` (default: the newest) of the repository
    when ``slot`` (its tree-sum recorded as ``recorded`` in the state file) holds that
    version, else None. Held means: the slot's content is the identity the verified index
    names, the slot snapshotted into the fetch area and found held there by the update
    (its kept digests, else every file read once), which then has nothing to download
    but the repository's metadata (the root key given is pinned, the trusted index state
    kept, as by any install)."""
    from ..update.versions import update

    work = work_dir(layout)
    key = _repository_key(work, url, keys)
    target = _target(_identities(url, key), to)
    if target is None or target[1] != recorded or not _plain_name(target[0]):
        return None
    held = work / target[0]
    if not _offer(layout, slot, held, recorded):
        return None
    res = update(url, work, to=to, key=key, mirrors=mirrors)
    if res.applied or res.path != held:
        return None  # (what it fetched stays for the install's own update)
    layout.delete(held)
    return res


def _repository_key(work: Path, url: str, keys: Sequence[str] | None) -> str | None:
    """The root key file given, or None when the fetch area pinned one."""
    from ..update.versions import STATE

    key = _one_key(keys, "a repository's index")
    if key is None and not (work / STATE / "root.pub").exists():
        # (update's own words named the fetch area, below a temporary mount point when FS
        # is an image or a block device)
        raise DeviceError(f"{url}: no root key: give --key ROOT_PUB (the device remembers "
                          "it once an install from the repository verified with it)")
    return key


def from_repository(
    layout: Layout, url: str, staged: Path, *, parent: Path | None, parent_release: str | None,
    to: str | None, mirrors: Sequence[str], keys: Sequence[str] | None,
    on_progress: Callable[[int, int], None] | None = None, parent_sum: str | None = None,
    holders: Sequence[tuple[Path, str]] = (),
) -> tuple[ReceivedSubvol, Digests | None]:
    """Bring version ``to`` (default: the newest) of the repository at ``url`` to
    ``staged`` (a read-only subvolume, its tree-sum checked against the signed index).
    ``parent`` (release ``parent_release``, tree-sum ``parent_sum``) is offered to the
    planner as held, and so is a root of ``holders`` (path, recorded tree-sum) whose
    content is the version wanted. The result's ``records`` are the hops applied, its
    ``data_bytes`` the bytes downloaded; with it the digests the update checked the
    version with, carried over to ``staged`` (:func:`.heldsums.carried`; None: not every
    entry of it is as they were read, hash it)."""
    from ..update.versions import update

    work = work_dir(layout)
    key = _repository_key(work, url, keys)
    versions = _identities(url, key) if parent is not None or holders else []
    target = _target(versions, to)
    offered = None
    if target is not None and _plain_name(target[0]):
        # a root of the device holding the version wanted (the factory root, the other
        # slot): taken as it is, nothing downloaded
        offered = next((target[0] for root, recorded in holders if recorded == target[1]
                        and _offer(layout, root, work / target[0], recorded)), None)
    named = next((n for n, i in versions if i == parent_sum), None) if parent_sum else None
    parent_release = named or parent_release
    if parent is not None and parent_release and _plain_name(parent_release) \
            and parent_release != offered:
        held = work / parent_release
        if named is None or parent_sum is None or not _offer(layout, parent, held, parent_sum):
            if os.path.lexists(held):
                layout.delete(held)
            layout.snapshot(parent, held, readonly=True)  # (the update checks it)
    received = 0

    def on_event(ev: dict[str, object]) -> None:
        nonlocal received
        if ev.get("event") == "bytes" and on_progress is not None:
            received += int(ev["n"])  # type: ignore[call-overload]
            on_progress(0, received)

    res = update(url, work, to=to, key=key, mirrors=mirrors, on_event=on_event)
    if res.path is None:
        raise DeviceError(f"{url}: the update brought no version {res.target!r}")
    # a read-only subvolume cannot change directory (its ".." is inside it): a snapshot
    # takes the staging name, with the received UUID later deltas find it by
    with layout.fd(res.path) as fd:
        info = sv.subvol_info(fd)
    layout.snapshot(res.path, staged, readonly=False)
    with layout.fd(staged) as fd:
        if info.received_uuid is not None:
            sv.set_received(fd, info.received_uuid, info.stransid)
        sv.set_readonly(fd, True)
    layout.delete(res.path)
    got = ReceivedSubvol(res.target, staged, info.received_uuid or info.uuid,
                         info.stransid, None, None, True, res.applied, res.received)
    return got, heldsums.carried(res.digests, staged) if res.digests is not None else None


def _plain_name(name: str) -> bool:
    """A release name usable as one directory entry."""
    return name not in (".", "..") and "/" not in name and not name.startswith(".btrdelta")


@contextlib.contextmanager
def archive_stream(
    layout: Layout, location: str, *, parent: Path | None, keys: Sequence[str] | None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[BinaryIO]:
    """The plain send stream in the chunk archive at ``location``, its chunks brought into
    the device's fetch store first (checked: per chunk, and the whole stream's BLAKE3 before
    its last byte is read; ``on_progress(0, bytes fetched)`` meanwhile, as a repository's
    download is reported)."""
    from ..update.clone import clone_image
    from ..update.fullfetch import store_stream

    work = work_dir(layout)
    store = ChunkStore(work / "chunks")
    key = _one_key(keys, "a chunk archive")
    public_key = load_public_key(key) if key else None
    seeds = [_seed(parent, work)] if parent is not None else []
    try:
        clone_image(location, target=f"{store.root}/{_IMAGE}", seeds=[str(s) for s in seeds],
                    public_key=public_key,
                    on_progress=None if on_progress is None else (
                        lambda phase, done, total: on_progress(0, done)
                        if phase == "fetch" else None))
    finally:
        for s in seeds:
            s.unlink(missing_ok=True)
    header, index = store.read_description(_IMAGE, public_key=public_key)
    with store_stream(index, header.image_digest, store, source=location) as stream:
        yield stream  # type: ignore[misc]


def _seed(parent: Path, work: Path) -> Path:
    """The plain stream of ``parent`` (a seed: its file data are chunks of the release's)."""
    from ..send import send_stream

    seed = work / "seed.stream"
    with open(seed, "wb") as f:
        send_stream(f.write, parent)
    return seed
