"""The tree-sum of a tree made by applying an incremental stream to a verified parent,
hashing only the file contents the stream may have changed.

:func:`verified_digests` computes a tree's tree-sum (:func:`~.treesum.tree_sum`) and keeps
what it learned about each regular file: its content digest and the ``lstat`` fields that
change whenever its content does (inode, size, mtime, ctime). :class:`Changes` follows the
records of an incremental stream applied to a snapshot (or copy) of that tree:
:class:`~.pathmap.PathMap` tells which parent inode each final path holds, and every record
that can change a file's content (WRITE, CLONE into it, TRUNCATE, ENCODED_WRITE,
FALLOCATE, UPDATE_EXTENT, ENABLE_VERITY, any record it does not know) marks that inode
(by its parent path). :meth:`Changes.tree_sum` then walks the new tree as
:func:`~.treesum.tree_manifest` always does (every entry's type, mode, owner, times, size,
link count, xattrs and symlink target read from the tree) and takes a regular file's
content digest from the parent instead of reading it only when all of these hold:

* the file is an inode of the parent (renames followed), no record changed its content;
* it has one link, in the new tree and in the parent (a hard-linked inode can be written
  through another name);
* its size is the parent's;
* the parent's file still has the inode, size, mtime and ctime it had when it was hashed
  (a change of the parent after it was hashed, before it was snapshotted or copied, shows
  in its ctime, which no process can set).

The result is the same digest as :func:`~.treesum.tree_sum` of the new tree would give
provided the snapshot (copy) has the parent's contents, which is what a btrfs snapshot and
``cp -a`` make. The digests are data in memory, not a cache on disk: a caller keeps them
only for trees it hashed itself (see :mod:`btrdelta.update.versions`).

Knows nothing of where the stream comes from or how it is applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import stream as _s
from .pathmap import PathMap
from .treesum import Entry, manifest_sum, tree_manifest

__all__ = ["Changes", "Digests", "verified_digests"]

#: what tells that a file's content may have changed since it was hashed
_Stamp = tuple[int, int, int, int]  # inode, size, mtime ns, ctime ns


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(slots=True)
class Digests:
    """A tree's tree-sum and the content digests of its singly-linked regular files."""

    root: Path
    identity: str
    #: relative path -> (content digest, stamp when hashed)
    files: dict[bytes, tuple[str, _Stamp]]

    def same_root(self, path: Path | None) -> bool:
        """Whether ``path`` is this tree's root directory (the same inode)."""
        try:
            return path is not None and os.path.samefile(path, self.root)
        except OSError:
            return False


def _digests(root: Path, entries: list[Entry], stamps: dict[bytes, _Stamp]) -> Digests:
    files = {e.path: (e.digest, stamps[e.path]) for e in entries
             if e.kind == "f" and e.nlink == 1 and e.digest is not None}
    return Digests(root, manifest_sum(entries), files)


def verified_digests(path: Path) -> Digests:
    """The tree-sum of ``path``, every file read, with the digests of its files."""
    stamps: dict[bytes, _Stamp] = {}

    def record(rel: bytes, st: os.stat_result) -> None:
        stamps[rel] = _stamp(st)

    return _digests(path, tree_manifest(path, reuse=record), stamps)


#: records that change names (PathMap follows them) or metadata the walk reads anyway
_NAMES = frozenset({_s.Rename, _s.Link, _s.Unlink, _s.Rmdir, _s.Mkfile, _s.Mkdir, _s.Mknod,
                    _s.Mkfifo, _s.Mksock, _s.Symlink})
_METADATA = frozenset({_s.Chmod, _s.Chown, _s.Utimes, _s.SetXattr, _s.RemoveXattr,
                       _s.Fileattr, _s.End, _s.StreamHeader})


class Changes:
    """Follows the records of one incremental stream (see the module docstring): feed every
    record applied, in order, then ask :meth:`tree_sum`."""

    def __init__(self) -> None:
        self._paths = PathMap()
        #: parent paths of inodes whose content a record may have changed
        self._dirty: set[bytes] = set()
        #: a full stream, or no SNAPSHOT seen: nothing comes from a parent
        self._incremental = False

    def feed(self, rec: object) -> None:
        """Take one record (headers included)."""
        cls = type(rec)
        if cls in _METADATA:
            return
        if cls in _NAMES or cls is _s.Snapshot or cls is _s.Subvol:
            self._paths.feed(rec)
            if cls is _s.Snapshot or cls is _s.Subvol:
                self._incremental = cls is _s.Snapshot
                self._dirty.clear()
            return
        path = getattr(rec, "path", None)
        if not isinstance(path, bytes):  # unknown and pathless: trust no content
            self._incremental = False
            return
        origin = self._paths.origin(path)
        if origin is not None:
            self._dirty.add(origin)

    def tree_sum(self, path: Path, parent: Digests) -> Digests:
        """The tree-sum (and digests) of ``path``, made from ``parent`` by the records fed;
        contents are reused from ``parent`` as the module docstring says."""
        stamps: dict[bytes, _Stamp] = {}
        origin, dirty, files = self._paths.origin, self._dirty, parent.files
        root = os.fsencode(parent.root)
        usable = self._incremental

        def reuse(rel: bytes, st: os.stat_result) -> str | None:
            stamps[rel] = _stamp(st)
            if not usable or st.st_nlink != 1:
                return None
            old = origin(rel)
            if old is None or old in dirty:
                return None
            known = files.get(old)
            if known is None or known[1][1] != st.st_size:
                return None
            try:
                now = _stamp(os.lstat(os.path.join(root, old)))
            except OSError:
                return None
            return known[0] if now == known[1] else None

        return _digests(path, tree_manifest(path, reuse=reuse), stamps)
