"""Incremental sends in bounded memory: what changed between two trees, found in one walk.

:func:`find_changes` walks the parent tree and the new tree in lockstep, one directory at a
time (entries sorted by name: the order and node numbering of :func:`.scan.scan_tree`, so
node ids, synthetic inode numbers and orphan names are those of the whole-tree model), and
compares the two entries of each name as it meets them. A pair that is provably unchanged
(the same type, one link each, equal mode, owner, mtime, xattrs, inode flags, symlink target
or device number, and for regular files equal size and content digest; with ``quick``, equal
size and mtime) is dropped at once; a directory pair is dropped after its subtree when
nothing below it was kept and its own metadata is equal. What is kept is the changed set:
entries of one side only (with their subtrees), pairs that differ, inodes with more than one
link, and the directories above them (for their paths). :mod:`.diff`, :mod:`.order` and
:mod:`.emit` then run on these reduced :class:`~.scan.Tree`s, so memory grows with the
changes (times their depth), not with the trees.

What else stays in memory: the first path and size of each parent file of at least
``index_min`` bytes, by content digest and by name (new files are cloned from the parent,
and pieces of a new file are looked for in an old file of the same name, as with the
whole-tree model); per kept directory pair the number of entry pairs dropped below it (their
votes in :func:`~.diff.match_trees`'s directory step); inodes with more than one link. Both
trees' identities (:meth:`.scan.Tree.identity`) are computed as the walk goes
(:class:`TreeIdentity`), so the stream names the UUIDs a full send of each tree names.

Each regular file of either tree is opened and read once here (its digest feeds the
identity); two files of the same name are read side by side (:func:`.diff.compare_files`),
which also gives the blocks that differ, so the emitter reads only those blocks again to
send them and never compares the two versions a second time.

:func:`index_source` is the same walk over one tree that keeps nothing but its identity and
its larger files by content digest: the clone sources of ``send -c``.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO
from uuid import UUID

import blake3

from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from .diff import compare_files
from .scan import _WHOLE, ROOT, Node, Tree, _hash_file, node_identity, read_node, uuid_of

__all__ = ["Changes", "SourceIndex", "TreeIdentity", "find_changes", "index_source"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: identity spool frames: literal bytes, or the node of a hard-linked inode (by st_ino)
_FRAME = struct.Struct("<BQ")
_LITERAL, _LINKED = 0, 1
#: root entries that an orphan name (:mod:`.order`) could collide with
_ORPHAN = re.compile(rb"o\d+-\d+-\d+")

#: (path, size, node id) of a parent file
OldFile = tuple[bytes, int, int]


class TreeIdentity:
    """:meth:`.scan.Tree.identity` fed node by node (through a temporary file: a hard-linked
    node's part is made at the end, when all its names are known)."""

    def __init__(self, tmpdir: str | None) -> None:
        self.tmpdir = tmpdir
        #: parts go straight into the hash until the first hard-linked node, then here
        self.file: IO[bytes] | None = None
        self.hash = blake3.blake3()
        self.buf = bytearray()
        self.newest = 0

    def add(self, node: Node) -> None:
        """The part of a node with its single name."""
        self.newest = max(self.newest, node.mtime_ns)
        self.buf += node_identity(node)
        if len(self.buf) >= 1 << 16:
            self._flush()

    def add_linked(self, node: Node) -> None:
        """A place for the part of a hard-linked node (made at the end)."""
        self.newest = max(self.newest, node.mtime_ns)
        self._flush()
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.tmpdir)  # noqa: SIM115 - close()
        self.file.write(_FRAME.pack(_LINKED, node.st_ino))

    def _flush(self) -> None:
        if not self.buf:
            return
        if self.file is None:
            self.hash.update(self.buf)
        else:
            self.file.write(_FRAME.pack(_LITERAL, len(self.buf)))
            self.file.write(self.buf)
        self.buf.clear()

    def ctransid(self) -> int:
        """:meth:`.scan.Tree.ctransid` of the nodes added."""
        return max(1, self.newest // 1_000_000_000)

    def digest(self, linked: dict[int, tuple[Node, bytes]]) -> bytes:
        """The identity (``linked``: hard-linked nodes by ``st_ino``); closes the file."""
        self._flush()
        f, h = self.file, self.hash
        if f is not None:
            f.seek(0)
            while True:
                head = f.read(_FRAME.size)
                if not head:
                    break
                kind, n = _FRAME.unpack(head)
                h.update(f.read(n) if kind == _LITERAL else node_identity(linked[n][0]))
            f.close()
        digest: bytes = h.digest()
        return digest

    def close(self) -> None:
        """Drop the temporary file (after an error)."""
        if self.file is not None:
            self.file.close()


def _dir_flags(path: bytes) -> int:
    try:
        fd = os.open(path, _DIR)
    except OSError as exc:
        raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=path) from exc
    try:
        return get_fileattr(fd)
    finally:
        os.close(fd)


#: a directory entry as a walk meets it: (name, node, first name of the node)
Entry = tuple[bytes, Node, bool]


class _Side:
    """One tree of a walk: its node numbering, identity, hard links and reduced tree."""

    def __init__(self, root: bytes, tmpdir: str | None) -> None:
        try:
            st = os.lstat(root)
        except OSError as exc:
            raise BtrdeltaError(f"cannot scan: {exc.strerror}", path=root) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise BtrdeltaError("not a directory", path=root)
        self.dev = st.st_dev
        self.ident = TreeIdentity(tmpdir)
        #: st_ino -> (node, first path) of inodes with more than one link
        self.linked: dict[int, tuple[Node, bytes]] = {}
        self.count = 1
        self.files = self.data = self.read = 0
        self.orphan_like: frozenset[bytes] = frozenset()
        top = read_node(ROOT, st, root, b"", None, root)
        top.flags = _dir_flags(root)
        self.ident.add(top)
        self.tree = Tree(root, {ROOT: top}, {ROOT: {}})

    def is_linked(self, node: Node) -> bool:
        """Whether ``node`` has more than one link."""
        got = self.linked.get(node.st_ino)
        return got is not None and got[0] is node

    def entries(self, dnode: Node) -> list[Entry]:
        """Number the entries of directory ``dnode`` as :func:`.scan.scan_tree` does (a
        further name of a hard-linked inode is added to its node's dentries)."""
        absdir = self.tree.abspath(dnode.path)
        try:
            dfd = os.open(absdir, _DIR)
        except OSError as exc:
            raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=absdir) from exc
        try:
            try:
                names = sorted(os.listdir(absdir))
            except OSError as exc:
                raise BtrdeltaError(f"cannot read directory: {exc.strerror}",
                                    path=absdir) from exc
            if dnode.id == ROOT:
                self.orphan_like = frozenset(n for n in names if _ORPHAN.fullmatch(n))
            return [e for name in names if (e := self._entry(dfd, dnode, absdir, name))]
        finally:
            os.close(dfd)

    def _entry(self, dfd: int, dnode: Node, absdir: bytes, name: bytes) -> Entry | None:
        st = os.lstat(name, dir_fd=dfd)
        if st.st_dev != self.dev:
            return None  # mount point or nested subvolume: not part of this tree
        fmt = stat.S_IFMT(st.st_mode)
        full = absdir + b"/" + name
        if fmt == stat.S_IFDIR and st.st_ino == 2 and not os.listdir(full):
            return None  # btrfs empty-subvolume stub in a snapshot
        linked = st.st_nlink > 1 and fmt != stat.S_IFDIR
        if linked and st.st_ino in self.linked:
            node = self.linked[st.st_ino][0]
            node.dentries.append((dnode.id, name))
            return name, node, False
        rel = dnode.path + b"/" + name if dnode.path else name
        node = read_node(self.count, st, full, rel, dfd, name)
        self.count += 1
        node.dentries.append((dnode.id, name))
        self.files += 1
        if fmt == stat.S_IFREG:
            self.data += st.st_size
        elif fmt == stat.S_IFDIR:
            node.flags = _dir_flags(full)
        if linked:
            self.linked[st.st_ino] = (node, rel)
        return name, node, True

    def hash(self, node: Node, buf: bytearray) -> None:
        """Read one regular file: its digest and flags."""
        node.digest, node.flags = _hash_file(self.tree.abspath(node.path), node.size, buf)
        self.read += node.size

    def identify(self, entries: list[Entry]) -> None:
        """Feed the identity the nodes of one directory listing (digests known)."""
        for _name, node, first in entries:
            if first:
                if self.is_linked(node):
                    self.ident.add_linked(node)
                else:
                    self.ident.add(node)

    def keep(self, dnode: Node, name: bytes, node: Node) -> None:
        """Put an entry into the reduced tree."""
        tree = self.tree
        tree.nodes[node.id] = node
        tree.children[dnode.id][name] = node.id
        if node.is_dir:
            tree.children.setdefault(node.id, {})

    def drop_dir(self, node: Node) -> None:
        """Take a kept directory (with nothing kept below it) out of the reduced tree."""
        tree = self.tree
        parent, name = node.dentries[0]
        del tree.children[parent][name]
        del tree.children[node.id]
        del tree.nodes[node.id]

    def finish(self) -> Tree:
        """The reduced tree, with the whole tree's identity, ctransid and counts."""
        tree = self.tree
        tree._identity = self.ident.digest(self.linked)
        tree.whole = (self.count, self.ident.ctransid(), self.orphan_like)
        tree.files, tree.data_bytes, tree.hashed = self.files, self.data, True
        return tree

    def close(self) -> None:
        """Drop the identity's temporary file (after an error)."""
        self.ident.close()


def _same_meta(o: Node, n: Node) -> bool:
    return (o.mode == n.mode and o.uid == n.uid and o.gid == n.gid
            and o.mtime_ns == n.mtime_ns and o.flags == n.flags and o.rdev == n.rdev
            and o.target == n.target and o.xattrs == n.xattrs)


@dataclass
class Changes:
    """The changed part of two trees (see the module docstring)."""

    old: Tree
    new: Tree
    #: kept new directory id -> (old directory at its path, entry pairs dropped below it)
    dropped: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: new file id -> (old file id at its path, blocks that differ, holes to punch)
    diffs: dict[int, tuple[int, list[tuple[int, int]], list[tuple[int, int]]]] = field(
        default_factory=dict)
    #: parent files of at least ``index_min`` bytes: the first by content digest; by name
    by_digest: dict[bytes, OldFile] = field(default_factory=dict)
    by_name: dict[bytes, list[OldFile]] = field(default_factory=dict)
    #: bytes of file content read
    bytes_read: int = 0


class _Walk:
    """One :func:`find_changes`."""

    def __init__(self, old: _Side, new: _Side, quick: bool, index_min: int,
                 on_entry: Callable[[int, int], None] | None) -> None:
        self.old, self.new, self.quick, self.index_min = old, new, quick, index_min
        self.on_entry = on_entry
        self.buf = bytearray(_WHOLE)
        self.out = Changes(old.tree, new.tree)
        self._seen = 0

    def run(self) -> None:
        o, n = self.old.tree.nodes[ROOT], self.new.tree.nodes[ROOT]
        # (old dir, new dir, after): list a directory (pair), or after its subtree drop the
        # pair if nothing below it was kept
        stack: list[tuple[Node | None, Node | None, bool]] = [(o, n, False)]
        while stack:
            od, nd, after = stack.pop()
            if after:
                self._after(od, nd)
                continue
            subs = self._directory(od, nd)
            for so, sn in reversed(subs):
                if so is not None and sn is not None:
                    stack.append((so, sn, True))
                stack.append((so, sn, False))

    def _directory(self, od: Node | None, nd: Node | None
                   ) -> list[tuple[Node | None, Node | None]]:
        """Compare one directory (pair); its subdirectories (pairs) to visit, in order."""
        olds = {e[0]: e for e in self.old.entries(od)} if od is not None else {}
        news = {e[0]: e for e in self.new.entries(nd)} if nd is not None else {}
        self._read(olds, news)
        self.old.identify(list(olds.values()))
        self.new.identify(list(news.values()))
        subs: list[tuple[Node | None, Node | None]] = []
        for name in sorted(olds.keys() | news.keys()):
            oe, ne = olds.get(name), news.get(name)
            o, n = oe[1] if oe else None, ne[1] if ne else None
            if o is not None and oe is not None and o.is_reg and o.size >= self.index_min:
                if oe[2]:
                    self.out.by_digest.setdefault(o.digest, (o.path, o.size, o.id))
                self.out.by_name.setdefault(name, []).append((o.path, o.size, o.id))
            if od is not None and nd is not None and o is not None and n is not None:
                if o.is_dir and n.is_dir:
                    self.old.keep(od, name, o)
                    self.new.keep(nd, name, n)
                    subs.append((o, n))
                    continue
                if self._unchanged(o, n):
                    self._dropped(od, nd)
                    continue
            if od is not None and o is not None:
                self.old.keep(od, name, o)
                if o.is_dir and oe is not None and oe[2]:
                    subs.append((o, None))
            if nd is not None and n is not None:
                self.new.keep(nd, name, n)
                if n.is_dir and ne is not None and ne[2]:
                    subs.append((None, n))
        self._seen += len(olds) + len(news)
        if self.on_entry is not None and self._seen >= 256:
            self._seen = 0
            self.on_entry(self.new.files, self.new.data)
        return subs

    def _read(self, olds: dict[bytes, Entry], news: dict[bytes, Entry]) -> None:
        """Digests of the regular files listed: two of the same name side by side."""
        for name, (_n, n, first) in news.items():
            if not (first and n.is_reg):
                continue
            oe = olds.get(name)
            if oe is not None and oe[2] and oe[1].is_reg:
                o = oe[1]
                cmp = compare_files(self.old.tree.abspath(o.path),
                                    self.new.tree.abspath(n.path), o.size, n.size)
                o.digest, o.flags, n.digest, n.flags = (cmp.old_digest, cmp.old_flags,
                                                        cmp.new_digest, cmp.new_flags)
                self.old.read += o.size
                self.new.read += n.size
                if cmp.writes or cmp.holes or o.size != n.size:
                    self.out.diffs[n.id] = (o.id, cmp.writes, cmp.holes)
            else:
                self.new.hash(n, self.buf)
        for name, (_n, o, first) in olds.items():
            if first and o.is_reg and not o.digest:
                ne = news.get(name)
                if ne is None or not (ne[2] and ne[1].is_reg):
                    self.old.hash(o, self.buf)

    def _unchanged(self, o: Node, n: Node) -> bool:
        """Whether nothing at all is to be sent for this pair of non-directories."""
        if o.fmt != n.fmt or self.old.is_linked(o) or self.new.is_linked(n):
            return False
        if not _same_meta(o, n):
            return False
        if o.is_reg:
            return o.size == n.size and (self.quick or o.digest == n.digest)
        return True

    def _dropped(self, od: Node, nd: Node) -> None:
        """Count an entry pair dropped below the directory pair (votes for the pair)."""
        got = self.out.dropped.get(nd.id)
        self.out.dropped[nd.id] = (od.id, got[1] + 1 if got is not None else 1)
        self.out.diffs.pop(nd.id, None)

    def _after(self, od: Node | None, nd: Node | None) -> None:
        """After a directory pair's subtree: drop the pair if nothing was kept below it."""
        assert od is not None
        assert nd is not None
        if self.old.tree.children[od.id] or self.new.tree.children[nd.id] or \
                not _same_meta(od, nd):
            return
        self.old.drop_dir(od)
        self.new.drop_dir(nd)
        self.out.dropped.pop(nd.id, None)
        self._dropped(self.old.tree.nodes[od.dentries[0][0]],
                      self.new.tree.nodes[nd.dentries[0][0]])


def find_changes(
    old_dir: str | bytes | os.PathLike[str],
    new_dir: str | bytes | os.PathLike[str],
    *,
    quick: bool = False,
    index_min: int = 16 * 1024,
    tmpdir: str | None = None,
    on_entry: Callable[[int, int], None] | None = None,
) -> Changes:
    """Walk ``old_dir`` and ``new_dir`` in lockstep; the changed part of both (see the
    module docstring).

    Args:
        old_dir: the parent tree.
        new_dir: the tree to send.
        quick: equal size and mtime mean equal content (rsync's quick check).
        index_min: smallest parent file remembered by digest and name (clone sources).
        tmpdir: where the identities' temporary files go.
        on_entry: called as ``on_entry(files, bytes)`` of the new tree now and then.

    Raises:
        BtrdeltaError: a tree cannot be read, or a file changed while it was read.
    """
    old = _Side(os.fsencode(old_dir).rstrip(b"/") or b"/", tmpdir)
    try:
        new = _Side(os.fsencode(new_dir).rstrip(b"/") or b"/", tmpdir)
    except BaseException:
        old.close()
        raise
    try:
        walk = _Walk(old, new, quick, index_min, on_entry)
        walk.run()
        walk.out.old, walk.out.new = old.finish(), new.finish()
        walk.out.bytes_read = old.read + new.read
    finally:
        old.close()
        new.close()
    if on_entry is not None:
        on_entry(new.files, new.data)
    return walk.out


@dataclass
class SourceIndex:
    """A tree the receiver has (``send -c``): its identity and larger files by digest."""

    root: bytes
    uuid: UUID
    ctransid: int
    #: content digest -> (path, size) of the first file with it
    by_digest: dict[bytes, tuple[bytes, int]]
    bytes_read: int = 0

    def abspath(self, rel: bytes) -> bytes:
        """Absolute path of relative path ``rel``."""
        return self.root + b"/" + rel


def index_source(path: str | bytes | os.PathLike[str], *, index_min: int = 16 * 1024,
                 tmpdir: str | None = None) -> SourceIndex:
    """Walk a clone source: every file read once for the identity, the files of at least
    ``index_min`` bytes remembered by content digest.

    Raises:
        BtrdeltaError: the tree cannot be read.
    """
    side = _Side(os.fsencode(path).rstrip(b"/") or b"/", tmpdir)
    try:
        buf = bytearray(_WHOLE)
        by_digest: dict[bytes, tuple[bytes, int]] = {}
        stack = [side.tree.nodes[ROOT]]
        while stack:
            entries = side.entries(stack.pop())
            subdirs = []
            for _name, node, first in entries:
                if first and node.is_reg:
                    side.hash(node, buf)
                    if node.size >= index_min:
                        by_digest.setdefault(node.digest, (node.path, node.size))
                elif first and node.is_dir:
                    subdirs.append(node)
            side.identify(entries)
            stack.extend(reversed(subdirs))
        identity = side.ident.digest(side.linked)
        return SourceIndex(side.tree.root, uuid_of(identity), side.ident.ctransid(),
                           by_digest, side.read)
    finally:
        side.close()
