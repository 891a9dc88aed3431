"""What changed in a tree since a record of it, from btrfs's own change tracking: a send and a
record that cost what changed, not the size of the tree.

When the record is of an earlier read-only snapshot of the same subvolume (lineage UUID and
generation, see :func:`usable`) and the tree read now is a newer read-only snapshot of it,
:func:`rescan` finds the changes without walking the tree, as ``btrfs send -p`` does with
its two trees: :func:`~btrdelta.fs.btrfs.changed_inodes` (one ``TREE_SEARCH_V2`` sweep that
skips every tree block not written since the record's generation) names the inodes written
since; everything else is as the record says and is neither stat'ed nor read.

* every changed directory is found by its back reference (:func:`~btrdelta.fs.btrfs.dir_path`)
  and listed (adding, removing or renaming an entry rewrites the directory's inode item), as
  are the new directories found in those listings; an entry that is the recorded one (same
  name, inode number and type) and that btrfs calls unchanged is not even stat'ed, any other
  entry btrfs calls unchanged makes the tree :class:`Stale`;
* a changed inode is stat'ed (a regular file then read by the hasher); its names are those the
  listings show plus those in directories that did not change;
* an inode whose sequence (``i_version``, record version 8) is the recorded one changed
  nothing but its atime (a read on a ``relatime`` mount: ``find``, ``du``, ``diff -r``,
  ``updatedb``), which rewrites its inode item (its transid moves) but moves no sequence:
  it is not listed, stat'ed or read, and its record row is kept (a stream sends no change
  of atime alone, so the receiver keeps the recorded one); btrfs moves it (forced) for every
  change of entries (create, link, unlink, rename into or out of a directory), names,
  mode, owner, times set, size, xattrs, flags and ``write``. Not for data written through
  a mapping when the file's timestamps had that tick already: a regular file with a file
  extent item written since (:func:`~btrdelta.fs.btrfs.changed_inodes`' ``written``) or
  ``NOCOW`` (written in place, no new item) is never taken as unchanged so;
* an inode number reused after a delete is another generation: a new inode;
* deleted inodes are the recorded entries of listed directories that are gone and not found
  elsewhere, and everything below a deleted directory.

The result (:class:`Changes`) is two small trees: the part of the record (old) and of the
snapshot (new) that the changes touch, with every ancestor directory up to the root on both
sides, so :class:`~.emit.Sender` matches and emits only those; and the next record, made from
the old one by dropping the rows of changed and deleted inodes and appending the new ones
(:meth:`~btrdelta.tree.chain.View.patched`) once the new files are hashed.

Owns the change finding only; the sweep is :mod:`btrdelta.fs.btrfs`, hashing
:class:`~.scan.ContentHasher`, the stream :mod:`.emit`.
"""

from __future__ import annotations

import os
import stat
import sys
from array import array
from collections.abc import Iterable
from itertools import compress
from uuid import UUID

from .. import _native
from ..fs.btrfs import dir_path, get_fileattr
from ..tree.chain import View
from ..tree.columns import Encoded
from ..tree.sendshot import (
    C_FLAGS,
    C_GEN,
    C_SEQUENCE,
    NO_SEQUENCE,
    Patch,
    RecordInode,
    SendshotHead,
)
from .extents import NOCOW
from .record import node_of, record_inode
from .scan import ROOT, Node, Tree, read_node

__all__ = ["Changes", "Stale", "loud", "rescan", "usable"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FMT = 0o170000
_DIR = stat.S_IFDIR


def _same_type(entry: os.DirEntry[bytes], mode: int) -> bool:
    """Whether directory entry ``entry`` (its ``d_type``) has the file type of ``mode``."""
    fmt = mode & _FMT
    if fmt == _DIR:
        return entry.is_dir(follow_symlinks=False)
    if fmt == stat.S_IFREG:
        return entry.is_file(follow_symlinks=False)
    if fmt == stat.S_IFLNK:
        return entry.is_symlink()
    return not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)
                or entry.is_symlink())


class Stale(Exception):
    """The tree on disk disagrees with the record and the change sweep (scan it whole)."""


def usable(head: SendshotHead, lineage: UUID | None, generation: int, readonly: bool) -> bool:
    """Whether the tree read (a snapshot of subvolume ``lineage`` whose inodes carry
    transids up to ``generation``) can be compared with the record ``head`` by
    :func:`rescan`: a read-only snapshot of the same subvolume, not older than the record's."""
    return (readonly and lineage is not None and head.subvol_uuid == lineage
            and head.generation > 0 and generation >= head.generation)


class Changes:
    """The changed part of a tree (see the module docstring), in two steps: found by
    :func:`rescan`, then, once the changed files in :attr:`to_hash` are hashed,
    :meth:`build` makes the two trees.

    Attributes:
        to_hash: the changed and new regular files (a tree of them alone, for the hasher).
        old: the record's inodes that changed or went away, and their ancestors (paths as
            recorded), and unchanged files a new file is a copy of: the old side of the
            send.
        new: the snapshot's inodes that changed or are new, and their ancestors (and those
            unchanged files): the new side.
        reused: regular files taken from the record (not read).
        listed: directories listed.
    """

    def __init__(self, delta: _Delta, dead: set[int]) -> None:
        self._delta, self._dead = delta, dead
        self.listed = len(delta.listed)
        files = {i: n for i, n in enumerate(delta.fresh.values()) if n.is_reg}
        self.to_hash = Tree(delta.root, files, {})
        self.old = self.new = Tree(b"", {}, {})
        self._drop: list[int] = []
        self._fresh: dict[int, Node] = {}
        self.reused = 0

    def recorded(self, node: Node) -> RecordInode | None:
        """The record's row of changed regular file ``node`` (of :attr:`to_hash`) when it
        is the same inode (the same number and generation), else None."""
        r = self._delta.same_row(node.st_ino)
        if r is None or self._delta.modes[r] & _FMT != stat.S_IFREG:
            return None
        return self._delta.inode(r)

    def sent_whole(self, node: Node) -> bool:
        """Whether changed regular file ``node`` (of :attr:`to_hash`) is a new inode, whose
        content the stream sends whole (of the others, only the blocks that changed)."""
        r = self._delta.same_row(node.st_ino)
        return r is None or self._delta.modes[r] & _FMT != stat.S_IFREG

    def build(self, clone_min: int = 16 * 1024) -> None:
        """Make :attr:`old` and :attr:`new` (the files of :attr:`to_hash` hashed). A changed
        file of at least ``clone_min`` bytes whose content equals an unchanged file's brings
        that file into both trees (a whole-file ``CLONE`` from the parent).

        Raises:
            Stale: the names found do not form a tree.
        """
        delta, dead = self._delta, self._dead
        old_rows, new_inos = delta.closure(dead, delta.copies_of(dead, clone_min))
        self.old = delta.old_tree(old_rows)
        self.old.hashed = True
        self.new, self._fresh = delta.new_tree(new_inos)
        self.new.hashed = True
        drop = dead | {r for ino in self._fresh if (r := delta.same_row(ino)) is not None}
        self._drop = sorted(r for r in drop if r != 0)
        cols = delta.cols
        gone_files = sum(1 for r in self._drop if cols.modes[r] & _FMT == stat.S_IFREG)
        self.reused = len(cols.file_rows) - gone_files

    def record(self, extent_max: int | None = None) -> Encoded | Patch:
        """The record of the new tree (after :meth:`build`): a patch of the base's, or its
        columns whole (:meth:`~btrdelta.tree.chain.View.patched`); ``extent_max``: as
        :func:`~.record.record_inode`."""
        nodes = self.new.nodes
        rows: list[RecordInode] = []
        root: RecordInode | None = None
        for node in self._fresh.values():
            rec = record_inode(node, [(nodes[p].st_ino, name) for p, name in node.dentries],
                               extent_max)
            if node.id == ROOT:
                root = rec
            else:
                rows.append(rec)
        return self._delta.cols.patched(self._drop, rows, root)


class _Delta:
    """One :func:`rescan`: the record, the changes, what was found so far."""

    def __init__(self, cols: View, root: bytes, fd: int,
                 changed: dict[int, tuple[int, int, int]]) -> None:
        self.cols, self.root, self.fd, self.changed = cols, root, fd, changed
        self.row_of = cols.row_of()
        # (the columns as arrays, once: the view makes each by a property and a call)
        self.inos, self.modes, self.gens = cols.inos, cols.modes, cols.fixed[C_GEN]
        self.dev = os.lstat(root).st_dev
        #: listed directories (inode number) -> path, and their entries (name -> inode)
        self.listed: dict[int, bytes] = {}
        self.entries: dict[int, dict[bytes, int]] = {}
        #: changed or new inodes -> their node, and their names (directory inode, name)
        self.fresh: dict[int, Node] = {}
        self.names: dict[int, list[tuple[int, bytes]]] = {}
        self._alive: dict[int, bool] = {0: True}
        #: rows read whole, by row: most are asked twice (by :meth:`Changes.recorded` or
        #: the new tree, and the old tree: 348 reads of 198 rows in an in-place round)
        self._whole: dict[int, RecordInode] = {}

    def inode(self, r: int) -> RecordInode:
        """Row ``r`` of the record whole (read once; not to be changed: several trees'
        nodes are made of it)."""
        got = self._whole.get(r)
        if got is None:
            got = self._whole[r] = self.cols.inode(r)
        return got

    def same_row(self, ino: int) -> int | None:
        """The record's row of inode ``ino`` if it is still that inode (not a reused
        number)."""
        r = self.row_of.get(ino)
        if r is None:
            return None
        got = self.changed.get(ino)
        gen = self.gens[r]
        if got is not None and gen and got[0] != gen:
            return None
        return r

    # -- finding the changes ----------------------------------------------------------

    def list_changed(self) -> None:
        """List every changed directory and the new directories below them."""
        queue: list[tuple[int, bytes]] = []
        rows: list[int] = []
        for ino in self.changed:
            r = self.same_row(ino)
            if r is not None and self.modes[r] & _FMT == _DIR:
                rel = dir_path(self.fd, ino)
                if rel is not None:
                    queue.append((ino, rel))
                    rows.append(r)
        self.cols.children_of(rows)  # (their recorded entries: one pass of the record)
        while queue:
            ino, rel = queue.pop()
            if ino not in self.listed:
                queue += self._list(ino, rel)

    def _make(self, st: os.stat_result, full: bytes, rel: bytes, dfd: int | None,
              name: bytes) -> Node:
        node = self.fresh.get(st.st_ino)
        if node is None:
            node = read_node(0, st, full, rel, dfd, name)
            node.generation, node.transid, node.sequence = self.changed.get(
                st.st_ino, (0, 0, NO_SEQUENCE))
            self.fresh[st.st_ino] = node
            self.names[st.st_ino] = []
        return node

    def _list(self, dino: int, rel: bytes) -> list[tuple[int, bytes]]:
        """List directory ``dino`` at ``rel``; returns new directories to list."""
        absdir = self.root + b"/" + rel if rel else self.root
        self.listed[dino] = rel
        ents = self.entries[dino] = {}
        dfd = os.open(absdir, _DIR_FLAGS)
        try:
            st = os.fstat(dfd)
            if st.st_ino != dino:
                raise Stale(f"{os.fsdecode(rel) or '/'} is not directory {dino}")
            self._make(st, absdir, rel, None, absdir).flags = get_fileattr(dfd)
            drow = self.same_row(dino)
            recorded = dict(self.cols.children(drow)) if drow is not None else {}
            more: list[tuple[int, bytes]] = []
            prefix, relprefix = absdir + b"/", rel + b"/" if rel else b""
            with os.scandir(absdir) as it:
                found = sorted((e.name, e) for e in it)
            for name, entry in found:
                ino = entry.inode()
                r = recorded.get(name)
                if r is not None and self.inos[r] == ino and ino not in self.changed and \
                        ino not in (2, 256) and _same_type(entry, self.modes[r]):
                    ents[name] = ino  # the recorded entry, unchanged: not even stat'ed
                    continue
                est = os.lstat(name, dir_fd=dfd)
                fmt = est.st_mode & _FMT
                if est.st_dev != self.dev or (fmt == _DIR and est.st_ino == 2
                                              and not os.listdir(prefix + name)):
                    continue  # a nested subvolume (or its stub in a snapshot)
                ino = est.st_ino
                ents[name] = ino
                r = self.same_row(ino)
                if r is not None and self.modes[r] & _FMT != fmt:
                    raise Stale(f"{os.fsdecode(relprefix + name)} changed its type")
                if r is not None and ino not in self.changed:
                    raise Stale(f"{os.fsdecode(relprefix + name)} changed but btrfs does not "
                                "say so")
                self._make(est, prefix + name, relprefix + name, dfd, name)
                self.names[ino].append((dino, name))
                if fmt == _DIR and ino not in self.listed:
                    more.append((ino, relprefix + name))
        finally:
            os.close(dfd)
        return more

    def alive(self, r: int) -> bool:
        """Whether the recorded directory row ``r`` is still in the tree."""
        chain: list[int] = []
        cur = r
        while cur not in self._alive:
            ino = self.inos[cur]
            if ino in self.listed:
                self._alive[cur] = self.same_row(ino) == cur
                break
            if ino in self.changed:  # changed but not listed: no entry leads to it
                self._alive[cur] = False
                break
            chain.append(cur)
            parent, name = self.cols.dentries(cur)[0]
            pino = self.inos[parent]
            if pino in self.listed:
                self._alive[cur] = self.entries[pino].get(name) == ino
                chain.pop()
                break
            cur = parent
        verdict = self._alive[cur]
        for c in chain:
            self._alive[c] = verdict
        return verdict

    def kept_names(self, r: int) -> list[tuple[int, bytes]]:
        """Names of row ``r`` in directories that were not listed and are still there."""
        inos = self.inos
        return [(inos[p], name) for p, name in self.cols.dentries(r)
                if inos[p] not in self.listed and self.alive(p)]

    def stat_changed(self) -> None:
        """Changed inodes that no listing showed: stat'ed at a name that did not change."""
        for ino in self.changed:
            r = self.same_row(ino)
            if r is None:
                continue  # new, but no entry leads to it: not part of the tree
            kept = self.kept_names(r)
            if ino in self.fresh:
                self.names[ino] = kept + self.names[ino]
            elif kept and self.modes[r] & _FMT != _DIR:
                rel = self.new_path(self.row_of[kept[0][0]], kept[0][1])
                full = self.root + b"/" + rel
                st = os.lstat(full)
                if st.st_ino != ino or st.st_mode & _FMT != self.modes[r] & _FMT:
                    raise Stale(f"{os.fsdecode(rel)} is not the recorded inode")
                self._make(st, full, rel, None, full)
                self.names[ino] = kept
            elif kept:  # a directory named where nothing changed, yet no entry leads to it
                raise Stale(f"directory {ino} changed but has no back reference")

    def new_path(self, drow: int, name: bytes) -> bytes:
        """The path now of entry ``name`` of the recorded, still present directory
        ``drow``."""
        parts = [name]
        cur = drow
        while True:
            ino = self.inos[cur]
            rel = self.listed.get(ino)
            if rel is not None or cur == 0:
                head = rel or b""
                break
            parent, pname = self.cols.dentries(cur)[0]
            parts.append(pname)
            cur = parent
        tail = b"/".join(reversed(parts))
        return head + b"/" + tail if head else tail

    def deleted(self) -> set[int]:
        """Rows of the recorded inodes that are gone."""
        cands: list[int] = []
        inos, row_of, changed = self.inos, self.row_of, self.changed
        for dino, ents in self.entries.items():
            drow = self.same_row(dino)
            if drow is not None:
                # (same_row(ino) != r, asked only of the changed inodes: every entry of a
                # listed directory is gone over, ~750 in an in-place round of the small tree)
                cands += [r for name, r in self.cols.children(drow)
                          if ents.get(name) != (ino := inos[r]) or row_of.get(ino) != r
                          or (ino in changed and self.same_row(ino) != r)]
        for ino in self.changed:
            r = self.row_of.get(ino)
            if r is not None and (self.same_row(ino) is None or ino not in self.fresh):
                cands.append(r)
        dead: set[int] = set()
        while cands:
            r = cands.pop()
            ino = self.inos[r]
            if r in dead or (ino in self.fresh and self.same_row(ino) == r):
                continue
            if ino not in self.changed and self.kept_names(r):
                raise Stale(f"inode {ino} lost a name but btrfs does not say it changed")
            dead.add(r)
            if self.modes[r] & _FMT == _DIR:
                cands += [c for _name, c in self.cols.children(r)]
        return dead

    # -- the two small trees ------------------------------------------------------------

    def copies_of(self, dead: set[int], clone_min: int) -> list[int]:
        """Unchanged recorded files whose content a changed file of at least ``clone_min``
        bytes has (same size, XXH3 and BLAKE3 digests), by inode number."""
        cols = self.cols
        wanted = [n for n in self.fresh.values() if n.is_reg and n.size >= clone_min
                  and n.segments is not None]
        if not wanted:
            return []
        digests = cols.digests
        # the files whose XXH3 digest starts as a wanted one's (its first 8 bytes as an
        # integer): one pass of the columns accelerator (33,000 files: ~0.06 ms), else C
        # iterators with a Python int per file (~1.1 ms); then by the whole digest, the
        # last such file for each (as a mapping of every file's would)
        firsts = {int.from_bytes(n.digest[:8], sys.byteorder) for n in wanted}
        native = _native.live("columns")
        near: Iterable[int]
        if native is not None:
            near = memoryview(native.leading(digests, 48, array("Q", firsts))).cast("Q")
        else:
            near = compress(range(len(cols.file_rows)),
                            map(firsts.__contains__, memoryview(digests).cast("Q")[::6]))
        # (bytes keys: hashing a slice of a memoryview hashes the object it views first,
        # the record's whole inflated body: ~1.6 ms for a 42,000-inode record)
        at = {bytes(digests[48 * k:48 * k + 16]): k for k in near}
        out: list[int] = []
        for node in wanted:
            k = at.get(node.digest)
            if k is None:
                continue
            r = cols.file_rows[k]
            ino = self.inos[r]
            if r not in dead and ino not in self.fresh and cols.sizes[r] == node.size \
                    and digests[48 * k + 16:48 * k + 48] == node.bdigest:
                out.append(ino)
        return out

    def closure(self, dead: set[int], extra: list[int]) -> tuple[set[int], set[int]]:
        """(rows of the old side, inodes of the new side): the changes, the unchanged
        inodes ``extra``, their ancestors, and every inode on one side that is still there
        on the other."""
        old_side: set[int] = set()
        new_side: set[int] = set()
        todo_new = [*self.fresh, *extra, self.inos[0]]
        todo_old = [*dead, 0]
        inos, cols = self.inos, self.cols
        while todo_new or todo_old:
            while todo_new:
                ino = todo_new.pop()
                if ino in new_side:
                    continue
                new_side.add(ino)
                r = self.same_row(ino)
                if ino in self.fresh:
                    todo_new += [p for p, _n in self.names[ino]]
                else:
                    assert r is not None
                    todo_new += [inos[p] for p, _n in cols.dentries(r)]
                if r is not None and r not in dead:
                    todo_old.append(r)
            while todo_old:
                r = todo_old.pop()
                if r in old_side:
                    continue
                old_side.add(r)
                todo_old += [p for p, _n in cols.dentries(r)]
                if r not in dead:
                    todo_new.append(inos[r])
        return old_side, new_side

    def old_tree(self, rows: set[int]) -> Tree:
        """The record's rows ``rows`` as a tree (root first; paths as recorded)."""
        order = [0, *sorted(rows - {0})]
        nid_of = {r: nid for nid, r in enumerate(order)}
        nodes = {nid: node_of(self.inode(r), nid) for nid, r in enumerate(order)}
        dentries = {nid_of[r]: [(nid_of[p], name) for p, name in self.cols.dentries(r)]
                    for r in order}
        return _tree(b"", nodes, dentries)

    def new_tree(self, inos: set[int]) -> tuple[Tree, dict[int, Node]]:
        """The inodes ``inos`` of the snapshot as a tree, and its changed or new nodes by
        inode number (their ``id`` set)."""
        root_ino = self.inos[0]
        order = [root_ino, *sorted(inos - {root_ino})]
        nid_of = {ino: nid for nid, ino in enumerate(order)}
        nodes: dict[int, Node] = {}
        dentries: dict[int, list[tuple[int, bytes]]] = {}
        fresh: dict[int, Node] = {}
        for nid, ino in enumerate(order):
            node = self.fresh.get(ino)
            if node is not None:
                node.id, node.ino = nid, 256 if nid == ROOT else 256 + nid
                node.dentries = []
                fresh[ino] = node
                names = self.names[ino]
            else:
                r = self.row_of[ino]
                node = node_of(self.inode(r), nid)
                names = [(self.inos[p], name) for p, name in self.cols.dentries(r)]
            nodes[nid] = node
            dentries[nid] = [(nid_of[p], name) for p, name in names]
        return _tree(self.root, nodes, dentries), fresh


def _tree(root: bytes, nodes: dict[int, Node], dentries: dict[int, list[tuple[int, bytes]]]
          ) -> Tree:
    """A tree of ``nodes`` (ids 0..n-1, the root first) named by ``dentries``."""
    children: dict[int, dict[bytes, int]] = {nid: {} for nid, n in nodes.items() if n.is_dir}
    tree = Tree(root, nodes, children)
    for nid, names in dentries.items():
        node = nodes[nid]
        node.dentries = names
        for parent, name in names:
            kids = children.get(parent)
            if kids is None or name in kids:
                raise Stale(f"inode {node.st_ino}: bad name {name!r}")
            kids[name] = nid
        if nid != ROOT:
            tree.files += 1
            if node.is_reg:
                tree.data_bytes += node.size
    # paths: the first name under the parent's path, parents first
    done = {ROOT}
    for nid in range(1, len(nodes)):
        chain = []
        cur = nid
        while cur not in done:
            chain.append(cur)
            if not nodes[cur].dentries or len(chain) > len(nodes):
                raise Stale(f"inode {nodes[cur].st_ino} has no path to the root")
            cur = nodes[cur].dentries[0][0]
        for c in reversed(chain):
            nodes[c].path = tree.path_of(*nodes[c].dentries[0])
            done.add(c)
    return tree


def loud(cols: View, changed: dict[int, tuple[int, int, int]], written: set[int] | None
         ) -> dict[int, tuple[int, int, int]]:
    """``changed`` without the inodes whose only change since the record ``cols`` is their
    atime (see the module docstring): the same generation and the recorded sequence, and
    for a regular file no file extent item in ``written`` (None: not known, every file is
    kept) and not ``NOCOW``."""
    row_of, gens, modes = cols.row_of(), cols.fixed[C_GEN], cols.modes
    seqs, flags = cols.fixed[C_SEQUENCE], cols.fixed[C_FLAGS]
    out: dict[int, tuple[int, int, int]] = {}
    for ino, got in changed.items():
        r = row_of.get(ino)
        if r is None or got[2] != seqs[r] or got[2] == NO_SEQUENCE or got[0] != gens[r] or \
                (modes[r] & _FMT == stat.S_IFREG and (written is None or ino in written
                                                      or flags[r] & NOCOW)):
            out[ino] = got
    return out


def rescan(cols: View, root: bytes, fd: int, changed: dict[int, tuple[int, int, int]],
           written: set[int] | None = None) -> Changes:
    """The changes of the snapshot at ``root`` (``fd``: open on it) against the record
    ``cols`` of an earlier snapshot of the same subvolume, given ``changed``, the inodes
    written since (``{ino: (generation, transid, sequence)}``) and ``written``, the inodes
    with file extent items written since (:func:`loud`); hash :attr:`Changes.to_hash`, then
    call :meth:`Changes.build`.

    Raises:
        Stale: the tree disagrees with the record (scan it whole instead).
        OSError: the tree cannot be read (PermissionError: not root).
    """
    delta = _Delta(cols, root, fd, loud(cols, changed, written))
    delta.list_changed()
    delta.stat_changed()
    return Changes(delta, delta.deleted())
