"""The tree-sum of a tree made by applying an incremental stream to a verified parent,
reading only what the stream may have changed.

:func:`verified_digests` computes a tree's tree-sum (:func:`~.treesum.tree_sum`) and keeps
every manifest entry with the ``lstat`` it was read with (inode, size, mtime, ctime, mode,
owner, link count). :class:`Changes` follows the records of an incremental stream applied
to a snapshot (or copy) of that tree: :class:`~.pathmap.PathMap` tells which parent inode
each final path holds; every record that can change a file's content or extended
attributes marks that inode (by its parent path): WRITE and TRUNCATE with the ranges they
write and the sizes they set (:class:`~.overlay.Overlay`), SET_XATTR and REMOVE_XATTR, and
CLONE into it, ENCODED_WRITE, FALLOCATE, UPDATE_EXTENT, ENABLE_VERITY or any record it
does not know as "changed anyhow". :meth:`Changes.tree_sum` then walks the new tree
(:func:`~.treesum.tree_manifest`: every entry's lstat read) and

* takes an entry whole from the parent when its lstat is the one the parent's entry at the
  same path was read with, ctime included: the very inode, untouched since (a btrfs
  snapshot keeps inode numbers and ctimes; any change of content, attributes, xattrs or
  links sets the ctime, which no process can set back);
* else, for an inode of the parent (renames followed) with one link in both trees and no
  record on its content or xattrs, whose parent entry still has the inode, size, mtime
  and ctime it was hashed with (a change of the parent after it was hashed, before it was
  snapshotted or copied, shows in its ctime): the content digest (same size), and in a
  snapshot (same inode) its xattrs and symlink target too, from the parent;
* else, for such a file that only WRITEs and TRUNCATEs changed: its content digest from
  the ranges the stream wrote, read from the new file (fresh in the page cache), and the
  others read from the parent's file (:func:`~.overlay.overlay_digest`), whose stamp is
  checked before and after;
* reads everything else from the new tree.

The result is the same digest as :func:`~.treesum.tree_sum` of the new tree would give
provided the snapshot (copy) has the parent's contents where the stream did not write,
which is what a btrfs snapshot and ``cp -a`` make. The digests are data in memory, not a
cache on disk: a caller keeps them only for trees it hashed itself (see
:mod:`btrdelta.update.versions`).

Knows nothing of where the stream comes from or how it is applied.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from .. import _native
from .. import stream as _s
from .._futures import ThreadPoolExecutor
from .._value import Value
from ..fs.btrfs import subvol_info
from .content import WHOLE_MAX
from .overlay import Overlay, overlay_digest
from .pathmap import PathMap
from .treesum import Entry, EntryMaker, Known, Reuse, manifest_sum, tree_manifest

__all__ = ["Changes", "Digests", "key_of", "stamp_of", "verified_digests"]

#: what tells that a file's content may have changed since it was hashed
_Stamp = tuple[int, int, int, int]  # inode, size, mtime ns, ctime ns
#: the stamp and the rest of an entry's lstat its manifest line depends on
_Key = tuple[int, int, int, int, int, int, int, int]  # + mode, uid, gid, link count
#: the early overlay digests (path -> digest to come, stamp of the file it is of) and the
#: parent's entries proven unchanged (to come, or None)
_Early = tuple[dict[bytes, tuple[Future[str | None], _Stamp]], Future[set[bytes]] | None]


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _key(st: os.stat_result) -> _Key:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid,
            st.st_gid, st.st_nlink)


#: the stamp (inode, size, mtime, ctime) and the whole key a :class:`Digests` entry keeps
stamp_of, key_of = _stamp, _key


class Digests(Value):
    """A tree's tree-sum and its manifest entries, each with its lstat when it was read."""

    root: Path
    identity: str
    #: relative path -> (manifest entry, lstat key when read)
    entries: dict[bytes, tuple[Entry, _Key]]
    #: the ctransid of the btrfs subvolume ``root`` when every entry was seen with its key
    #: (read after the subvolume's writeback: :mod:`btrdelta.update.heldsums`), or None
    ctransid: int | None = None

    def same_root(self, path: Path | None) -> bool:
        """Whether ``path`` is this tree's root directory (the same inode)."""
        try:
            return path is not None and os.path.samefile(path, self.root)
        except OSError:
            return False


def _digests(root: Path, entries: list[Entry], keys: dict[bytes, _Key]) -> Digests:
    return Digests(root, manifest_sum(entries), {e.path: (e, keys[e.path]) for e in entries})


def verified_digests(path: Path) -> Digests:
    """The tree-sum of ``path``, every file read, with its entries."""
    keys: dict[bytes, _Key] = {}

    def record(rel: bytes, st: os.stat_result) -> None:
        keys[rel] = _key(st)

    return _digests(path, tree_manifest(path, known=record), keys)


#: records that change names (PathMap follows them) or metadata the walk reads anyway
_NAMES = frozenset({_s.Rename, _s.Link, _s.Unlink, _s.Rmdir, _s.Mkfile, _s.Mkdir, _s.Mknod,
                    _s.Mkfifo, _s.Mksock, _s.Symlink})
_METADATA = frozenset({_s.Chmod, _s.Chown, _s.Utimes, _s.Fileattr, _s.End,
                       _s.StreamHeader})


_XATTRS = frozenset({_s.SetXattr, _s.RemoveXattr})
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_WORKERS = 2


class Changes:
    """Follows the records of one incremental stream (see the module docstring): feed every
    record applied, in order, then ask :meth:`tree_sum`."""

    def __init__(self) -> None:
        self._paths = PathMap()
        #: parent paths of inodes whose content or extended attributes a record may have
        #: changed -> their writes and truncations (None: changed otherwise too)
        self._dirty: dict[bytes, Overlay | None] = {}
        #: a full stream, or no SNAPSHOT seen: nothing comes from a parent
        self._incremental = False
        #: parent path -> the last path a WRITE or TRUNCATE named it by
        self._named: dict[bytes, bytes] = {}
        #: what :meth:`start` began: (new root, parent, pool, its plan to come: the early
        #: overlay digests and the parent's entries proven unchanged, the C walk's
        #: ``unchanged``, or None)
        self._started: tuple[bytes, Digests, ThreadPoolExecutor, Future[_Early]] | None = None
        #: hashing threads started by :meth:`warm`, not used yet
        self._pool: ThreadPoolExecutor | None = None
        #: the threads :meth:`tree_sum` used, told to stop: :meth:`close` joins them
        self._stopping: list[ThreadPoolExecutor] = []

    def warm(self) -> None:
        """Start the hashing threads now, idle until :meth:`start` or :meth:`tree_sum`
        gives them work (e.g. while a receive waits for its first records): a thread started
        later, while the walk's thread runs, makes it wait for the interpreter (5 ms of
        numpy's hop). :meth:`close` stops them when neither follows."""
        if self._pool is not None:
            return
        pool = ThreadPoolExecutor(_WORKERS, "btrdelta-overlay")
        meet = threading.Barrier(_WORKERS)
        for _ in range(_WORKERS):  # each waits for the other: every thread is made
            pool.submit(_meet, meet)
        self._pool = pool

    def _take_pool(self) -> ThreadPoolExecutor:
        pool, self._pool = self._pool, None
        return pool if pool is not None else ThreadPoolExecutor(_WORKERS, "btrdelta-overlay")

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
                self._named.clear()
            return
        path = getattr(rec, "path", None)
        if not isinstance(path, bytes):  # unknown and pathless: trust no content
            self._incremental = False
            return
        origin = self._paths.origin(path)
        if origin is None:
            return
        dirty = self._dirty
        if cls is _s.Write or cls is _s.Truncate or cls in _XATTRS:
            if origin not in dirty:
                dirty[origin] = Overlay()
            ov = dirty[origin]
            if ov is not None:
                self._named[origin] = path
                if cls is _s.Write:
                    ov.write(rec.offset, len(rec.data))  # type: ignore[attr-defined]
                elif cls is _s.Truncate:
                    ov.truncate(rec.size)  # type: ignore[attr-defined]
        else:
            dirty[origin] = None

    def start(self, path: Path, parent: Digests) -> None:
        """Begin :meth:`tree_sum` of ``path`` early (every record fed and applied, e.g.
        while the subvolume is being made read-only): the overlay digests of the written
        files (:meth:`_overlay_early`) are computed in threads from now. Each is used only
        if the walk finds its file with the stamp it had when hashing began, so a change
        after this call costs the digest, not the result. First of all, the parent's
        entries still as they were hashed are found (the C walk's ``unchanged``: an
        fstatat() of each), so the walk after the seal makes none in the parent: that the
        parent's entry is unchanged now, after ``path`` was snapshotted from it, says it
        was unchanged when the snapshot was made (a change sets the ctime, and ctimes only
        go forward), which is all the walk's fstatat() after the seal says. :meth:`close`
        stops them when no :meth:`tree_sum` follows. The threads :meth:`warm` started are
        the ones used (stopping them here and starting others cost numpy's hop about a
        millisecond of the applying thread); one of them finds the written files and gives
        out the work (this thread goes on sealing: 0.4 ms of numpy's hop)."""
        started, self._started = self._started, None
        if started is not None:
            started[2].shutdown(wait=True, cancel_futures=True)
        if not self._incremental:
            return
        new_root = os.fsencode(path)
        pool = self._take_pool()
        walk = _native.live("treewalk")
        look = None if walk is None else partial(_unchanged, walk, parent)
        try:
            plan = pool.submit(self._overlay_early, pool, new_root, parent, look)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        self._started = (new_root, parent, pool, plan)

    def close(self) -> None:
        """Stop what :meth:`warm`, :meth:`start` and :meth:`tree_sum` began (threads
        joined)."""
        started, self._started = self._started, None
        if started is not None:
            started[2].shutdown(wait=True, cancel_futures=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        while self._stopping:
            self._stopping.pop().shutdown(wait=True)

    def tree_sum(self, path: Path, parent: Digests) -> Digests:
        """The tree-sum (and digests) of ``path``, made from ``parent`` by the records fed;
        entries and contents are reused from ``parent`` as the module docstring says. The
        hashing threads are told to stop; :meth:`close` waits for them."""
        keys: dict[bytes, _Key] = {}
        origin, dirty, entries = self._paths.origin, self._dirty, parent.entries
        root = os.fsencode(parent.root)
        new_root = os.fsencode(path)
        usable = self._incremental
        started, self._started = self._started, None
        pool: ThreadPoolExecutor | None = None
        early: dict[bytes, tuple[Future[str | None], _Stamp]] = {}
        proven: Future[set[bytes]] | None = None
        if started is not None and started[0] == new_root and started[1] is parent and usable:
            pool, (early, proven) = started[2], _planned(started[3])
        elif started is not None:
            started[2].shutdown(wait=True, cancel_futures=True)
        if pool is None and usable:
            pool = self._take_pool()
            early = self._overlay_early(pool, new_root, parent)[0]

        def known(rel: bytes, st: os.stat_result) -> Entry | None:
            key = keys[rel] = _key(st)
            if not usable:
                return None
            old = entries.get(rel)
            if old is None or old[1] != key or rel in dirty:
                return None
            return old[0]

        def reuse(rel: bytes, st: os.stat_result) -> tuple[Entry, bool] | None:
            if not usable:
                return None
            old = origin(rel)
            if old is None:
                return None
            found = entries.get(old)
            if found is None:
                return None
            entry, key = found
            if entry.kind != "d" and (st.st_nlink != 1 or entry.nlink != 1):
                return None
            old_path = os.path.join(root, old)
            if old in dirty:
                ov = dirty[old]
                if ov is None or entry.kind != "f":
                    return None
                got = early.get(rel)
                if got is not None and got[1] == _stamp(st):
                    digest = got[0].result()
                else:
                    digest = _overlaid(os.path.join(new_root, rel), st, old_path, key, ov)
                if digest is None:
                    return None
                return Entry(rel, "f", 0, 0, 0, None, st.st_size, digest), False
            try:
                now = _stamp(os.lstat(old_path))
            except OSError:
                return None
            return (entry, st.st_ino == key[0]) if now == key[:4] else None

        walk = _native.live("treewalk") if usable else None
        try:
            if walk is None:
                return _digests(path, tree_manifest(path, reuse=reuse, known=known), keys)
            return _digests(path, self._walk_c(walk, new_root, root, parent, reuse, known,
                                               keys, _result(proven)), keys)
        finally:
            if pool is not None:  # joined by close(): the result does not wait for that
                pool.shutdown(wait=False, cancel_futures=True)
                self._stopping.append(pool)

    def _walk_c(self, walk: Any, new_root: bytes, root: bytes, parent: Digests,
                reuse: Reuse, known: Known, keys: dict[bytes, _Key],
                proven: set[bytes] | None = None) -> list[Entry]:
        """The manifest of ``new_root`` by the C walk (``_treewalk.derive``): it lstat()s
        every entry and gives the parent's entry for an untouched inode (``known``'s rule),
        or the parent's entry restated (mode, uid, gid and mtime of this lstat, its line
        made in C) for a file, directory or symlink at the same path with the same inode,
        no record on its content or xattrs, one link, and a parent entry still as it was
        hashed (``reuse``'s rule, in a snapshot; ``proven``: the parent's entries found so
        by :meth:`start`, not looked at again); the others are made here as
        :func:`~.treesum.tree_manifest` makes them, with ``reuse`` and ``known``."""
        held = self._paths.moved()  # paths whose origin may not be themselves
        maker = EntryMaker(False, False, frozenset(), reuse, known)

        def handed_back(rel: bytes) -> None:  # (known() keeps its key)
            full = os.path.join(new_root, rel)
            maker.add(rel, full, os.lstat(full))

        try:
            # the C walk appends to maker.out and keys, and calls handed_back, in walk
            # order, while its thread lstat()s the entries that follow
            walk.derive(new_root, root, parent.entries, set(self._dirty), held, maker.out,
                        keys, handed_back, proven)
            return maker.finish()
        finally:
            maker.close()

    def _overlay_early(self, pool: ThreadPoolExecutor, new_root: bytes, parent: Digests,
                       first: Callable[[], set[bytes]] | None = None) -> _Early:
        """The overlay digests of the written files, started in ``pool`` before the walk
        (which uses one when it finds the file with the same stamp at that path): path ->
        (digest to come, stamp of the file it is of); and ``first`` (done before them),
        started. Every file is found first, then the jobs go out, ``first`` and then the
        largest first (a worker started earlier would hold the interpreter while this
        thread still lstat()s)."""
        root = os.fsencode(parent.root)
        jobs: list[tuple[bytes, bytes, os.stat_result, bytes, _Key, Overlay]] = []
        for old, rel in self._named.items():
            ov = self._dirty.get(old)
            found = parent.entries.get(old)
            if ov is None or found is None or self._paths.origin(rel) != old:
                continue
            entry, key = found
            if entry.kind != "f" or entry.nlink != 1:
                continue
            new = os.path.join(new_root, rel)
            try:
                st = os.lstat(new)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                jobs.append((rel, new, st, os.path.join(root, old), key, ov))
        jobs.sort(key=lambda job: -job[2].st_size)
        ahead = pool.submit(first) if first is not None else None
        return {rel: (pool.submit(_overlaid, new, st, old, key, ov), _stamp(st))
                for rel, new, st, old, key, ov in jobs}, ahead


def _unchanged(walk: Any, parent: Digests) -> set[bytes]:
    """The parent's entries still as they were hashed, after the snapshot of it was made
    (:meth:`Changes.start`): every one, without a look, when ``parent.ctransid`` (every
    entry seen with its key at that ctransid) is the subvolume's ctransid now. Sound: a
    change of a name, mode, owner, time, xattr or size moves the ctransid at once, and
    data written before the snapshot was written back by it (btrfs flushes the source's
    delayed allocation and waits for its ordered extents before a snapshot), which moves
    it too; else the C walk's ``unchanged`` (an ``fstatat()`` of each)."""
    root = os.fsencode(parent.root)
    if parent.ctransid is not None:
        with contextlib.suppress(OSError):
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                info = subvol_info(fd)
            finally:
                os.close(fd)
            if info.readonly and info.ctransid == parent.ctransid:
                return set(parent.entries)
    found: set[bytes] = walk.unchanged(root, parent.entries)
    return found


def _planned(plan: Future[_Early]) -> _Early:
    """What :meth:`Changes.start`'s plan started (nothing when it failed: the walk hashes
    the written files itself)."""
    try:
        return plan.result()
    except Exception:  # (out of memory, the pool stopped): as without start()
        return {}, None


def _result(proven: Future[set[bytes]] | None) -> set[bytes] | None:
    """What :meth:`Changes.start`'s ``unchanged`` found (None: the walk looks at the
    parent itself)."""
    if proven is None:
        return None
    try:
        return proven.result()
    except Exception:  # (out of memory): phase 1 makes the fstatat()s as before
        return None


def _meet(barrier: threading.Barrier) -> None:
    """A warm-up task: wait until every thread of the pool runs one."""
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=1.0)


def _open(path: bytes) -> int:
    """Open ``path`` to read it, with ``O_NOATIME`` where allowed (the owner or
    CAP_FOWNER). A written file is read before the seal (:meth:`Changes.start`), while
    ``SET_RECEIVED_SUBVOL`` commits: its atime, which the stream set to its mtime, is
    older than its ctime, so a read would update it (``relatime``), and btrfs joins a
    transaction for that, waiting for the commit running and dirtying the inode again
    for the read-only flag's."""
    try:
        return os.open(path, _OPEN | os.O_NOATIME)
    except PermissionError:
        return os.open(path, _OPEN)


def _overlaid(new: bytes, st: os.stat_result, old: bytes, key: _Key,
              ov: Overlay) -> str | None:
    """The content digest of file ``new`` (lstat ``st``) made from parent file ``old``
    (hashed with ``key``) by the writes and truncations of ``ov``, or None when it cannot
    be had that way (the caller reads the file)."""
    size, layout = ov.layout(key[1])
    if size != st.st_size or size > WHOLE_MAX:  # (past it: not BLAKE3 of the bytes)
        return None
    try:
        old_fd = _open(old)
    except OSError:
        return None
    try:
        if _stamp(os.fstat(old_fd)) != key[:4]:
            return None
        new_fd = _open(new)
        try:
            got = os.fstat(new_fd)
            if got.st_ino != st.st_ino or got.st_size != size:
                return None
            digest = overlay_digest(new_fd, old_fd, layout)
        finally:
            os.close(new_fd)
        # the parent's bytes read were the ones hashed: it did not change meanwhile
        return digest if _stamp(os.fstat(old_fd)) == key[:4] else None
    except OSError:
        return None
    finally:
        os.close(old_fd)
