"""The new tree of an incremental send against a record, from btrfs's own change tracking.

A full scan stats every inode of the tree; on a large tree where a few files changed that
costs far more than the kernel's ``btrfs send -p``, which only visits what changed. When the
record is of an earlier read-only snapshot of the same subvolume (its lineage UUID and
generation match, see :func:`usable`) and the tree read now is a newer read-only snapshot of
it, :func:`rescan` builds the new tree from the record and from the inodes btrfs says were
written since the record's generation (:func:`~btrdelta.fs.btrfs.changed_inodes`: one
``TREE_SEARCH`` sweep that skips every tree block not written since, as ``btrfs subvolume
find-new`` does):

* a directory whose inode item was not written since keeps the record's entries (adding,
  removing or renaming an entry rewrites the directory's inode item: size, mtime); a changed
  one is listed (``lstat`` of its entries, as :func:`~.scan.scan_tree` does);
* an inode whose item was not written since is taken from the record, digests and all, and
  is neither stat'ed (unless a changed directory lists it) nor read; a changed one is
  stat'ed and, for a regular file, read for its digests by the hasher;
* an inode number reused after a delete is a new inode item (written since, with another
  generation): it is changed;
* deleted inodes are those no entry reaches any more (their directories changed).

Nodes come in the order :func:`~.scan.scan_tree` gives them (directories depth first, the
entries of each sorted by name), so the tree identity is the one a full scan computes. If
what is found disagrees with the record (an entry of an unchanged directory that is no longer
the recorded inode, or a listed inode that btrfs calls unchanged whose ctime differs), it
raises :class:`Stale` and the caller falls back to a full scan.

Owns the rebuild only; the sweep is :mod:`btrdelta.fs.btrfs`, the hashing
:class:`~.scan.ContentHasher`.
"""

from __future__ import annotations

import os
import stat
from uuid import UUID

from ..fs.btrfs import get_fileattr
from ..tree.sendshot import SendshotHead
from .scan import _FIRST_INO, ROOT, Node, Tree, _Scanner

__all__ = ["Stale", "rescan", "usable"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Stale(Exception):
    """The tree on disk disagrees with the record and the change sweep (scan it whole)."""


def usable(head: SendshotHead, lineage: UUID | None, generation: int, readonly: bool) -> bool:
    """Whether the tree read (a snapshot of subvolume ``lineage`` whose inodes carry
    transids up to ``generation``) can be rebuilt from the record ``head`` by :func:`rescan`:
    a read-only snapshot of the same subvolume, not older than the record's."""
    return (readonly and lineage is not None and head.subvol_uuid == lineage
            and head.generation > 0 and generation >= head.generation)


def _copy(o: Node, nid: int, rel: bytes) -> Node:
    """A new tree's node for the unchanged inode ``o`` of the record."""
    return Node(nid, 256 if nid == ROOT else _FIRST_INO + nid - 1, o.mode, o.uid, o.gid,
                o.size, o.atime_ns, o.mtime_ns, o.ctime_ns, rel, o.rdev, o.target, o.xattrs,
                [], o.flags, o.digest, o.st_ino, o.generation, o.transid, o.segments,
                o.blocks, o.bdigest)


class _Rebuild:
    """One :func:`rescan`: the record by inode number, the changes, the new tree so far."""

    def __init__(self, old: Tree, root: bytes, changed: dict[int, tuple[int, int]]) -> None:
        self.old = old
        self.old_by_ino = {n.st_ino: n for n in old.nodes.values()}
        self.changed = changed
        st = os.lstat(root)
        self.sc = _Scanner(root, st.st_dev, None)
        self.nodes = self.sc.nodes
        self.children = self.sc.children
        #: st_ino -> node id of the non-directories met so far (hard links)
        self.linked: dict[int, int] = {}
        self.listed = 0
        o = self.old_by_ino.get(st.st_ino)
        if o is None or st.st_ino in changed or not o.is_dir:
            self._fresh(st, root, b"", None, root)
        else:
            self.nodes[ROOT] = _copy(o, ROOT, b"")
        self.children[ROOT] = {}

    def _fresh(self, st: os.stat_result, full: bytes, rel: bytes, dfd: int | None,
               name: bytes) -> Node:
        node = self.sc.make(st, full, rel, dfd, name)
        node.generation, node.transid = self.changed.get(st.st_ino, (0, 0))
        return node

    def _add(self, dir_id: int, name: bytes, node: Node,
             subdirs: list[tuple[int, bytes, bytes]], full: bytes, rel: bytes) -> None:
        node.dentries.append((dir_id, name))
        self.children[dir_id][name] = node.id
        if node.is_dir:
            self.children[node.id] = {}
            subdirs.append((node.id, full, rel))
        else:
            self.linked.setdefault(node.st_ino, node.id)

    def visit(self, dir_id: int, absdir: bytes, reldir: bytes
              ) -> list[tuple[int, bytes, bytes]]:
        """Fill in one directory's entries; returns its subdirectories to visit."""
        node = self.nodes[dir_id]
        o = self.old_by_ino.get(node.st_ino)
        if node.st_ino in self.changed or o is None or not o.is_dir:
            return self._listed(dir_id, absdir, reldir)
        subdirs: list[tuple[int, bytes, bytes]] = []
        prefix = absdir + b"/"
        relprefix = reldir + b"/" if reldir else b""
        old_nodes = self.old.nodes
        for name, oid in sorted(self.old.children[o.id].items()):
            rec = old_nodes[oid]
            full, rel = prefix + name, relprefix + name
            nid = self.linked.get(rec.st_ino)
            if nid is not None:
                kid = self.nodes[nid]
            elif rec.st_ino in self.changed:
                est = os.lstat(full)
                if est.st_ino != rec.st_ino or stat.S_IFMT(est.st_mode) != rec.fmt:
                    raise Stale(f"{os.fsdecode(rel)} is not the recorded inode")
                kid = self._fresh(est, full, rel, None, full)
            else:
                kid = _copy(rec, len(self.nodes), rel)
                self.nodes[kid.id] = kid
            self._add(dir_id, name, kid, subdirs, full, rel)
        return subdirs

    def _listed(self, dir_id: int, absdir: bytes, reldir: bytes
                ) -> list[tuple[int, bytes, bytes]]:
        """A changed directory: list it as a full scan does."""
        self.listed += 1
        dfd = os.open(absdir, _DIR_FLAGS)
        try:
            self.nodes[dir_id].flags = get_fileattr(dfd)
            subdirs: list[tuple[int, bytes, bytes]] = []
            prefix = absdir + b"/"
            relprefix = reldir + b"/" if reldir else b""
            for name in sorted(os.listdir(absdir)):
                est = os.lstat(name, dir_fd=dfd)
                if est.st_dev != self.sc.dev:
                    continue  # a nested subvolume: not part of this tree
                fmt = stat.S_IFMT(est.st_mode)
                full, rel = prefix + name, relprefix + name
                if fmt == stat.S_IFDIR and est.st_ino == 2 and not os.listdir(full):
                    continue  # btrfs empty-subvolume stub in a snapshot
                nid = self.linked.get(est.st_ino) if fmt != stat.S_IFDIR else None
                rec = self.old_by_ino.get(est.st_ino)
                if nid is not None:
                    kid = self.nodes[nid]
                elif est.st_ino in self.changed or rec is None or rec.fmt != fmt:
                    kid = self._fresh(est, full, rel, dfd, name)
                elif est.st_ctime_ns != rec.ctime_ns:
                    raise Stale(f"{os.fsdecode(rel)} changed but btrfs does not say so")
                else:
                    kid = _copy(rec, len(self.nodes), rel)
                    self.nodes[kid.id] = kid
                self._add(dir_id, name, kid, subdirs, full, rel)
        finally:
            os.close(dfd)
        return subdirs


def rescan(old: Tree, root: bytes, changed: dict[int, tuple[int, int]]) -> tuple[Tree, int]:
    """The tree at ``root`` (a read-only snapshot) rebuilt from the record ``old`` (of an
    earlier snapshot of the same subvolume) and ``changed`` (the inodes written since it:
    ``{ino: (generation, transid)}``); returns the tree and how many directories were listed.

    Regular files taken from the record keep its digests (``segments`` set: the hasher skips
    them); changed ones have none yet.

    Raises:
        Stale: the tree disagrees with the record (scan it whole instead).
        OSError: the tree cannot be read.
    """
    rb = _Rebuild(old, root, changed)
    stack: list[tuple[int, bytes, bytes]] = [(ROOT, root, b"")]
    while stack:
        stack.extend(reversed(rb.visit(*stack.pop())))
    tree = rb.sc.tree
    for node in rb.nodes.values():
        if node.id != ROOT:
            tree.files += 1
            if node.is_reg:
                tree.data_bytes += node.size
    return tree, rb.listed
