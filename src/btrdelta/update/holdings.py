"""What an update destination holds, and placing new versions in it safely.

DEST holds versions as ``DEST/<version>`` (btrfs subvolumes, or directories with the
receive registry). A version counts as held only when its tree's content identity
(``tree-sum``) equals the index's, whatever its name says. While an update runs:

* a version being received is under a temporary name (``DEST/.btrdelta-tmp-…``, the
  receive's: :mod:`btrdelta.receive.subvolumes`) until its identity checked;
* a verified intermediate version of a multi-hop path is ``DEST/.btrdelta-hop-<version>``
  (held, so an interrupted update resumes from it; removed once the next version is
  verified, the last one when the update is done);
* the wanted version gets ``DEST/<version>`` last, never over an existing entry (or, held
  only as an intermediate of a run that stopped, the intermediate is renamed to it:
  :func:`promote`).

Existing versions are never written to. :func:`find_held` reads every file of each
candidate and returns its digests (:class:`~btrdelta.tree.incremental.Digests`), which the
update keeps in memory to check a delta hop from it reading only what the hop changed; a
read-only btrfs subvolume's digests are kept between updates (:mod:`.heldsums`) and not
read again while it is unchanged.

A held version a delta needs as its parent must be found by the stream's parent UUID (the
repository's UUID of that release); one received from the repository is, any other copy
gets an alias: a registry entry (directories), or a read-only snapshot
``.btrdelta-base-<version>`` carrying that UUID (btrfs).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..fs import btrfs as sv
from ..fs.atomic import fsync_dir, pid_alive
from ..fs.copy import copy_tree
from ..fs.remove import remove_tree
from ..receive.subvolumes import TMP_PREFIX, Subvolumes
from ..repo.model import stream_uuid
from ..tree import tree_sum
from ..tree.incremental import Digests, verified_digests
from . import heldsums

__all__ = [
    "HOP_PREFIX",
    "cleanup",
    "ensure_parent",
    "find_held",
    "promote",
    "remove_entry",
]

HOP_PREFIX = ".btrdelta-hop-"
BASE_PREFIX = ".btrdelta-base-"
#: inode number of a btrfs subvolume's root directory
_SUBVOL_ROOT_INO = 256


def remove_entry(dest: Path, name: str) -> None:
    """Remove ``dest/name`` (a subvolume, even read-only, or a directory)."""
    path = dest / name
    if not os.path.lexists(path):
        return
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if sv.is_btrfs(fd):
            with contextlib.suppress(OSError):
                sv.delete_subvolume(fd, name.encode())
                return
        remove_tree(fd, name)  # any depth: a tree that failed its check is untrusted
    finally:
        os.close(fd)


def cleanup(dest: Path) -> None:
    """Remove what an interrupted update left: unfinished receives of processes that are
    gone."""
    for entry in os.listdir(dest):
        if entry.startswith(TMP_PREFIX):
            pid = entry.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                remove_entry(dest, entry)


def find_held(dest: Path, wanted: dict[str, str], state: Path | None = None, *,
              keep: bool = True) -> dict[str, Digests]:
    """Versions of ``wanted`` (name -> identity) that ``dest`` holds: name -> the tree's
    digests (its directory is their ``root``).

    Candidates are ``DEST/<name>`` and ``DEST/.btrdelta-hop-<name>``; each is checked by
    its tree-sum, every file read, unless ``state`` (DEST's state directory) keeps its
    digests and they are still the tree's (:func:`.heldsums.load`: a read-only btrfs
    subvolume, unchanged since); a tree hashed here is kept there with ``keep``.
    """
    held: dict[str, Digests] = {}
    for name, identity in wanted.items():
        for path in (dest / name, dest / f"{HOP_PREFIX}{name}"):
            if path.is_dir() and not path.is_symlink():
                digests = heldsums.load(state, path, identity) if state is not None else None
                if digests is None:
                    digests = verified_digests(path)
                    if digests.identity == identity and state is not None and keep:
                        heldsums.save(state, digests)
                if digests.identity == identity:
                    held[name] = digests
                    break
    return held


def ensure_parent(dest: Path, held: Digests, name: str) -> Path:
    """Make held version ``held`` (hashed by this process) findable as the parent of the
    repository's deltas; returns the directory a delta of it is received from (the
    receive takes it as found: :func:`~btrdelta.receive.receive`'s ``parents``)."""
    identity, path = held.identity, held.root
    uid = stream_uuid(identity)
    with Subvolumes(dest) as subs:
        found = subs.find(uid)
        if found is not None and (held.same_root(found) or tree_sum(found) == identity):
            return found
        if not subs.btrfs:
            from ..receive.registry import Registry, RegistryEntry

            Registry(dest).add(RegistryEntry(path.name, uid, 0))
            return path
        base = f"{BASE_PREFIX}{name}"
        remove_entry(dest, base)
        # a subvolume: a snapshot costs nothing; a plain directory: a (reflinked) copy
        is_subvol = path.stat().st_ino == _SUBVOL_ROOT_INO
        pending = subs.begin(base.encode(), uid, 0, parent=path if is_subvol else None)
        if not is_subvol:
            try:
                copy_tree(path, pending.path)
            except BaseException:
                subs.abort(pending)
                raise
        return subs.finish(pending).path


def promote(dest: Path, held: Digests, name: str) -> Path:
    """Give intermediate ``held`` (``DEST/.btrdelta-hop-<name>``, checked by content) its
    name ``DEST/<name>``, as the last hop would have received it: in a directory DEST its
    registry entry (the repository's UUID of the version) is written whole first, so a
    crash leaves it registered or not named; a btrfs subvolume carries that UUID already.
    Returns the new path."""
    path = dest / name
    with Subvolumes(dest) as subs:
        if not subs.btrfs:
            from ..receive.registry import Registry, RegistryEntry

            Registry(dest).add(RegistryEntry(name, stream_uuid(held.identity), 0,
                                             ino=os.lstat(held.root).st_ino))
    os.rename(held.root, path)
    fsync_dir(str(dest))
    return path
