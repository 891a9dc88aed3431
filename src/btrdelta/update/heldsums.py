"""The verified digests of DEST's held versions, kept between updates (btrfs only).

``update`` must know which versions DEST holds, by content (:func:`.holdings.find_held`):
without this module every run read every file of every candidate (numpy: 64 MB, ~60 ms of
CPU; a root filesystem: minutes). A read-only btrfs subvolume's tree-sum is kept instead in
``DEST/.btrdelta/held/<subvolume UUID>.json`` (written whole: temporary file, ``fsync``,
rename) with every manifest entry and the lstat it was read with, and used again only when
all of these hold (else the tree is hashed whole, as before):

* the path is a btrfs subvolume's root, read-only now, with the UUID the file is named by
  (a snapshot, a re-received copy, another subvolume renamed there: another UUID);
* the subvolume's ``ctransid`` is the one kept. The kernel sets it to the running
  transaction's id in ``btrfs_update_inode()``: every change of a name, mode, owner, time,
  extended attribute or size there moves it at once, a buffered or mapped write of data
  when its pages are written back. The value kept is read after a ``syncfs`` that wrote
  back what was already written (the received version's own data), so only a later
  change moves it. A snapshot of the subvolume moves its generation, not its ctransid;
* every entry kept still has the inode, size, mtime and ctime it was hashed with (the
  incremental check's stamp rule, :mod:`btrdelta.tree.incremental`): what a write
  through a descriptor opened before the subvolume was made read-only changes (measured:
  such a ``pwrite`` succeeds, sets mtime and ctime in memory at once, and moves the
  ctransid only at writeback, up to 30 s later). The subvolume's root changes its ctime
  in memory when it is renamed (its item keeps the old one), so the root is instead
  made again as tree-sum makes it (mode, owner, mtime, extended attributes) and its
  names listed: equal to the entry kept and to the manifest's names at the top;
* the file is the one written: its format, the identity algorithm (``tree-sum-2``), and
  the BLAKE3 of its manifest entries equal to the identity it names and the index wants.

Stale or corrupt files are a miss, never an error. Files of subvolumes no longer in DEST
are removed when another is written. Directories (not btrfs) keep the full check.

The digests found or kept carry that ctransid (:attr:`Digests.ctransid`): a delta hop
from them then needs no look at the parent's entries after its snapshot while the
parent's ctransid is still that one (:func:`btrdelta.tree.incremental._unchanged`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .. import _native
from ..fs import btrfs as sv
from ..fs.atomic import write_atomic
from ..fs.libc import syncfs
from ..repo.model import IDENTITY_ALGORITHM
from ..tree.incremental import Digests, key_of, stamp_of
from ..tree.treesum import Entry, EntryMaker, manifest_sum

__all__ = ["FORMAT", "carried", "load", "save"]

FORMAT = "btrdelta-held-1"
_DIR = "held"
_ROOT = b"."
#: inode number of a btrfs subvolume's root directory
_SUBVOL_ROOT_INO = 256
_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _subvolume(fd: int) -> sv.SubvolInfo | None:
    """The read-only btrfs subvolume whose root ``fd`` is, or None."""
    try:
        if not sv.is_btrfs(fd) or os.fstat(fd).st_ino != _SUBVOL_ROOT_INO:
            return None
        info = sv.subvol_info(fd)
    except OSError:
        return None
    return info if info.readonly else None


def _subvolume_at(path: Path) -> sv.SubvolInfo | None:
    """:func:`_subvolume` of the directory at ``path`` (None when it cannot be opened)."""
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return None
    try:
        return _subvolume(fd)
    finally:
        os.close(fd)


def _root_entry(path: Path) -> tuple[Entry, os.stat_result]:
    """The root's manifest entry as tree-sum makes it now, and its lstat."""
    full = os.fsencode(path)
    st = os.lstat(full)
    maker = EntryMaker(False, False, frozenset(), None, None)
    try:
        maker.add(_ROOT, full, st)
        return maker.finish()[0], st
    finally:
        maker.close()


def _still(path: Path, entries: dict[bytes, tuple[Entry, Any]]
           ) -> dict[bytes, tuple[Entry, Any]] | None:
    """``entries`` (the manifest's, with their lstat keys) when the tree at ``path`` still
    has them as the module docstring says (the root's key taken now), else None."""
    kept = entries.get(_ROOT)
    if kept is None:
        return None
    root, st = _root_entry(path)
    top = {rel for rel in entries if rel != _ROOT and b"/" not in rel}
    if root.record != kept[0].record or set(os.listdir(os.fsencode(path))) != top:
        return None
    walk = _native.live("treewalk")
    rest = {rel: e for rel, e in entries.items() if rel != _ROOT}
    if walk is not None:
        same = walk.unchanged(os.fsencode(path), rest)
    else:
        base = os.fsencode(path)
        same = set()
        for rel, (_e, key) in rest.items():
            with contextlib.suppress(OSError):
                if stamp_of(os.lstat(os.path.join(base, rel))) == tuple(key[:4]):
                    same.add(rel)
    if len(same) != len(rest):
        return None
    return {rel: ((kept[0], key_of(st)) if rel == _ROOT else e) for rel, e in entries.items()}


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


def _encode(e: Entry, key: Any) -> list[Any]:
    return [e.path.hex(), e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.digest,
            _hex(e.target), e.rdev, e.nlink, _hex(e.link_group),
            [[n.hex(), v.hex()] for n, v in e.xattrs], e.layout, list(key)]


def _decode(row: list[Any]) -> tuple[Entry, Any]:
    (path, kind, mode, uid, gid, mtime, size, digest, target, rdev, nlink, group, xattrs,
     layout, key) = row
    entry = Entry(bytes.fromhex(path), kind, mode, uid, gid, mtime, size, digest,
                  _unhex(target), None if rdev is None else (rdev[0], rdev[1]), nlink,
                  _unhex(group), tuple((bytes.fromhex(n), bytes.fromhex(v)) for n, v in xattrs),
                  None if layout is None else tuple((a, n) for a, n in layout))
    if len(key) != 8 or not all(type(x) is int for x in key):
        raise ValueError("key")
    return entry, tuple(key)


def load(state: Path, path: Path, identity: str) -> Digests | None:
    """The digests of the tree at ``path`` kept in ``state`` when they are still its own
    and its identity is ``identity`` (see the module docstring), else None."""
    info = _subvolume_at(path)
    if info is None:
        return None
    try:
        doc = json.loads((state / _DIR / f"{info.uuid.hex}.json").read_bytes())
        if (doc["format"], doc["algorithm"], doc["uuid"], doc["ctransid"], doc["identity"]) \
                != (FORMAT, IDENTITY_ALGORITHM, info.uuid.hex, info.ctransid, identity):
            return None
        entries = dict((e.path, (e, k)) for e, k in map(_decode, doc["entries"]))
        if manifest_sum(e for e, _k in entries.values()) != identity:
            return None
        still = _still(path, entries)
    # (what a damaged file can raise: json's RecursionError nested too deep, the C walk's
    # OverflowError for an integer past 64 bits; every update failed on such a file)
    except (OSError, ValueError, LookupError, TypeError, AttributeError, ArithmeticError,
            RecursionError):
        return None
    return None if still is None else Digests(path, identity, still, info.ctransid)


def carried(digests: Digests, path: Path) -> Digests | None:
    """``digests`` as the digests of ``path``, a read-only snapshot of their tree made
    after they were taken, when every entry of it is still as they were read (the rules
    above: a snapshot keeps every inode, size and time; the root is made again), else None
    (the caller hashes it)."""
    if _subvolume_at(path) is None:
        return None
    try:
        still = _still(path, digests.entries)
    except OSError:
        return None
    return None if still is None else Digests(path, digests.identity, still)


def save(state: Path, digests: Digests) -> bool:
    """Keep ``digests`` (of the tree at ``digests.root``, hashed or checked by this
    process) in ``state`` when that tree is a read-only btrfs subvolume whose entries are
    all still as they were read: after a ``syncfs`` (the tree's own writeback committed,
    so that its ctransid does not move later), the ctransid is read and every entry looked
    at (:func:`_still`), then a second ``syncfs`` must leave the ctransid as it was.
    Returns whether it was kept; a failure to write is a miss later."""
    path = digests.root
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return False
    try:
        if _subvolume(fd) is None:
            return False
        syncfs(fd)
        info = _subvolume(fd)
        if info is None:
            return False
        still = _still(path, digests.entries)
        if still is None:
            return False
        # the transaction that set this ctransid committed: any later change gets a
        # higher one (without it, a change in the same running transaction, e.g. data
        # of an unlinked file written back, could leave it as it is)
        syncfs(fd)
        if _subvolume(fd) != info:
            return False
        doc = {"format": FORMAT, "algorithm": IDENTITY_ALGORITHM, "uuid": info.uuid.hex,
               "ctransid": info.ctransid, "identity": digests.identity,
               "entries": [_encode(e, k) for e, k in still.values()]}
        folder = state / _DIR
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{info.uuid.hex}.json",
                     json.dumps(doc, separators=(",", ":")).encode())
        _prune(folder, path.parent, info.uuid.hex)
        digests.entries, digests.ctransid = still, info.ctransid
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _prune(folder: Path, dest: Path, keep: str) -> None:
    """Remove the files of subvolumes that are no longer an entry of ``dest``."""
    present = {keep}
    for name in os.listdir(dest):
        with contextlib.suppress(OSError):
            fd = os.open(dest / name, _OPEN)
            try:
                present.add(sv.subvol_info(fd).uuid.hex)
            finally:
                os.close(fd)
    for name in os.listdir(folder):
        if name.endswith(".json") and name[:-5] not in present:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
