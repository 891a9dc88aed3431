"""Incremental sends in bounded memory: what changed between two trees, found in one walk.

:func:`find_changes` walks the parent tree and the new tree in lockstep, one directory at a
time (entries sorted by name: the order and node numbering of :func:`.walk.scan_tree`, so
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
whole-tree model); the kept directory pairs that had entries dropped (such a pair is the
same inode on both sides: :func:`~.diff.match_trees` pairs it first, since the dropped
entries stay in the old directory); inodes with more than one link. Both
trees' identities (:meth:`.scan.Tree.identity`) are computed as the walk goes
(:class:`TreeIdentity`), so the stream names the UUIDs a full send of each tree names.

Each regular file of either tree is opened and read once here (its digest feeds the
identity); two files of the same name are read side by side (:func:`.compare.compare_files`),
which also gives the blocks that differ, so the emitter never compares the two versions
again; a file without a counterpart of its name also gets a BLAKE3 digest (a move is
confirmed by it, not by reading both files again). The differing blocks of a changed file
of up to 1 MiB, and the data of a new file of up to 1 MiB, are kept in a :class:`DataSpool`
(an unnamed temporary file) and sent from there: such files are read once in all.

:func:`index_source` is the same walk over one tree that keeps nothing but its identity and
its larger files by content digest: the clone sources of ``send -c``.
"""

from __future__ import annotations

import bisect
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING
from uuid import UUID

import blake3

from .._optional import need
from .._value import Value, field
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from ..fs.content import data_segments, has_byte_at
from ..tree.content import WHOLE_MAX
from .compare import Compared, compare_files
from .hashing import _WHOLE, _hash_file, lstat_root, open_dir
from .onepass import Stopped, content_hasher
from .scan import (
    ROOT,
    Node,
    Tree,
    node_identity,
    open_to_read,
    read_node,
    uuid_of,
)

if TYPE_CHECKING:
    from .._futures import ThreadPoolExecutor

__all__ = ["Changes", "SourceIndex", "TreeIdentity", "find_changes", "index_source"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: identity spool frames: literal bytes, or the node of a hard-linked inode (by st_ino)
_FRAME = struct.Struct("<BQ")
_LITERAL, _LINKED = 0, 1
#: root entries that an orphan name (:mod:`.order`) could collide with
_ORPHAN = re.compile(rb"o\d+-\d+-\d+")


def _temporary_file(where: str | None) -> IO[bytes]:
    """An unnamed temporary file in ``where`` (``tempfile``: imported when needed, ~4 ms)."""
    import tempfile

    return tempfile.TemporaryFile(dir=where)


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
            self.file = _temporary_file(self.tmpdir)
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


def dir_flags(path: bytes) -> int:
    """The inode flags of directory ``path`` (FILEATTR encoding).

    Raises:
        BtrdeltaError: the directory cannot be opened.
    """
    try:
        fd = os.open(path, _DIR)
    except OSError as exc:
        raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=path) from exc
    try:
        return get_fileattr(fd)
    finally:
        os.close(fd)


#: files to read: (old, new) of the same name, or one of them
_Job = tuple[Node | None, Node | None]

#: a directory's files are read in the thread pool when they hold this many bytes
_THREADED = 8 << 20

#: a new file read whole: its data ranges and content
_Kept = tuple[list[tuple[int, int]], bytes]
_ZEROS = memoryview(bytes(_WHOLE))


def _read_single(node: Node, path: bytes, buf: bytearray, keep: bool,
                 stop: threading.Event | None = None) -> _Kept | None:
    """Read a file that has no counterpart of its name: its XXH3-128 and BLAKE3 digests
    (moves are confirmed by the latter, not by reading it again; a file of more holes than
    data has none: its moves are confirmed by comparing data) and flags; with ``keep``,
    a file of up to 1 MiB is returned whole with its data ranges (to send from this read).
    ``stop`` set ends the reading of a larger file within a MiB (:class:`.onepass.Stopped`).

    Raises:
        BtrdeltaError: the file cannot be read or changed size while it was read.
    """
    xxhash = need("xxhash", "make")
    fd = open_to_read(path)
    try:
        node.flags, size = get_fileattr(fd), node.size
        if size <= _WHOLE:
            data = os.pread(fd, size + 1, 0)
            if len(data) != size:
                raise BtrdeltaError("file changed while sending (size differs)", path=path)
            node.digest = xxhash.xxh3_128_digest(data)
            node.bdigest = blake3.blake3(data).digest()
            return (data_segments(fd, size), data) if keep else None
        segs = data_segments(fd, size)
        in_data = sum(n for _off, n in segs)
        h = content_hasher(size - in_data, in_data)
        # a file mostly holes gets no BLAKE3 (its zeros: ~3 min of CPU per TiB of holes),
        # nor one past 1 TiB: a move or copy of it is confirmed by comparing the data of
        # both files instead
        b3 = blake3.blake3() if size - in_data < in_data and size <= WHOLE_MAX else None
        view, pos = memoryview(buf), 0
        for off, length in [*segs, (size, 0)]:
            if pos < off:  # a hole: the zeros it reads as (XXH3 by length)
                h.zeros(off - pos)
            while pos < off and b3 is not None:
                if stop is not None and stop.is_set():
                    raise Stopped("reading stopped", path=path)
                k = min(_WHOLE, off - pos)
                b3.update(_ZEROS[:k])
                pos += k
            pos = max(pos, off)
            while pos < off + length:
                if stop is not None and stop.is_set():
                    raise Stopped("reading stopped", path=path)
                k = os.preadv(fd, [view[:min(_WHOLE, off + length - pos)]], pos)
                if k <= 0:
                    raise BtrdeltaError("file changed while sending (short read)", path=path)
                h.update(view[:k])
                if b3 is not None:
                    b3.update(view[:k])
                pos += k
        if has_byte_at(fd, size):
            raise BtrdeltaError("file changed while sending (size differs)", path=path)
        node.digest, node.bdigest = h.digest(), b3.digest() if b3 is not None else b""
        return None
    finally:
        os.close(fd)


def _job_size(job: _Job) -> int:
    node = job[0] or job[1]
    return node.size if node is not None else 0


#: a directory entry as a walk meets it: (name, node, first name of the node)
Entry = tuple[bytes, Node, bool]


class _Side:
    """One tree of a walk: its node numbering, identity, hard links and reduced tree."""

    def __init__(self, root: bytes, tmpdir: str | None) -> None:
        st = lstat_root(root)
        self.dev = st.st_dev
        self.ident = TreeIdentity(tmpdir)
        #: st_ino -> (node, first path) of inodes with more than one link
        self.linked: dict[int, tuple[Node, bytes]] = {}
        self.count = 1
        self.files = self.data = self.read = 0
        self.orphan_like: frozenset[bytes] = frozenset()
        top = read_node(ROOT, st, root, b"", None, root)
        top.flags = dir_flags(root)
        self.ident.add(top)
        self.tree = Tree(root, {ROOT: top}, {ROOT: {}})

    def is_linked(self, node: Node) -> bool:
        """Whether ``node`` has more than one link."""
        got = self.linked.get(node.st_ino)
        return got is not None and got[0] is node

    def entries(self, dnode: Node) -> list[Entry]:
        """Number the entries of directory ``dnode`` as :func:`.walk.scan_tree` does (a
        further name of a hard-linked inode is added to its node's dentries)."""
        absdir = self.tree.abspath(dnode.path)
        try:
            dfd = open_dir(absdir)
        except OSError as exc:
            raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=absdir) from exc
        try:
            try:
                names = sorted(map(os.fsencode, os.listdir(dfd)))
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
            node.flags = dir_flags(full)
        if linked:
            self.linked[st.st_ino] = (node, rel)
        return name, node, True

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


class DataSpool:
    """The blocks of changed files that differ, kept when they were compared (an unnamed
    temporary file), so that sending them does not read the files again."""

    def __init__(self, tmpdir: str | None) -> None:
        self.tmpdir = tmpdir
        self.file: IO[bytes] | None = None
        self.pos = 0
        self._lock = threading.Lock()

    def put(self, data: bytes | memoryview) -> int:
        """Keep ``data``; its offset in the spool."""
        with self._lock:
            if self.file is None:
                self.file = _temporary_file(self.tmpdir)
            off = self.pos
            os.pwrite(self.file.fileno(), data, off)
            self.pos += len(data)
            return off

    def reader(self, pieces: list[tuple[int, int, int]]) -> Callable[[int, int], bytes]:
        """``read(n, pos)`` of a file whose ``pieces`` (file offset, length, spool offset)
        were kept; every read lies within one piece."""
        starts = [p[0] for p in pieces]

        def read(n: int, pos: int) -> bytes:
            off, length, at = pieces[bisect.bisect_right(starts, pos) - 1]
            assert off <= pos
            assert pos + n <= off + length
            assert self.file is not None
            return os.pread(self.file.fileno(), n, at + pos - off)

        return read

    def close(self) -> None:
        """Drop the spool."""
        if self.file is not None:
            self.file.close()
            self.file = None


class Changes(Value):
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
    #: new file id -> where the blocks in its diff's writes are kept in :attr:`spool`
    #: (file offset, length, spool offset)
    kept: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    #: new file id -> where the data ranges of a new file (read whole) are kept
    whole: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    spool: DataSpool | None = None

    def spooled(self, nid: int, *, whole: bool = False) -> Callable[[int, int], bytes] | None:
        """``read(n, pos)`` of the kept blocks of new file ``nid`` (``whole``: its kept
        data ranges), if they were kept."""
        pieces = (self.whole if whole else self.kept).get(nid)
        return None if pieces is None or self.spool is None else self.spool.reader(pieces)

    def close(self) -> None:
        """Drop the temporary files."""
        if self.spool is not None:
            self.spool.close()


class _Walk:
    """One :func:`find_changes`."""

    def __init__(self, old: _Side, new: _Side, quick: bool, index_min: int,
                 on_entry: Callable[[int, int], None] | None, workers: int,
                 tmpdir: str | None) -> None:
        self.old, self.new, self.quick, self.index_min = old, new, quick, index_min
        self.on_entry = on_entry
        self.spool = DataSpool(tmpdir)
        self.out = Changes(old.tree, new.tree, spool=self.spool)
        self._seen = 0
        self._local = threading.local()
        #: set when the walk ends (an error, a signal): the reading threads stop within a MiB
        self.stop = threading.Event()
        self.workers = workers
        #: started for the first directory that holds 8 MiB of files
        self.pool: ThreadPoolExecutor | None = None

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
        """Digests of the regular files listed (two of the same name side by side), in
        the thread pool when there are several."""
        jobs: list[_Job] = []
        for name, (_n, n, first) in news.items():
            if first and n.is_reg:
                oe = olds.get(name)
                paired = oe is not None and oe[2] and oe[1].is_reg
                jobs.append((oe[1] if oe is not None and paired else None, n))
        for name, (_n, o, first) in olds.items():
            if first and o.is_reg:
                ne = news.get(name)
                if ne is None or not (ne[2] and ne[1].is_reg):
                    jobs.append((o, None))
        if self.workers < 2 or len(jobs) < 2 or sum(map(_job_size, jobs)) < _THREADED:
            results = self._jobs(jobs)  # small files: threads would only pass the GIL around
        else:  # one slice a thread, big files spread over them
            if self.pool is None:
                from .._futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(self.workers,
                                               thread_name_prefix="btrdelta-read")
            jobs.sort(key=_job_size, reverse=True)
            k = self.workers
            futures = [self.pool.submit(self._jobs, jobs[i::k]) for i in range(k)]
            jobs = [job for i in range(k) for job in jobs[i::k]]
            results = [r for f in futures for r in f.result()]
        for (oj, nj), cmp in zip(jobs, results, strict=True):
            if oj is not None:
                self.old.read += oj.size
            if nj is not None:
                self.new.read += nj.size
            if isinstance(cmp, tuple):  # a new file read whole: its data ranges, kept
                assert nj is not None
                segs, view = cmp[0], memoryview(cmp[1])
                self.out.whole[nj.id] = [(off, n, self.spool.put(view[off:off + n]))
                                         for off, n in segs]
            elif cmp is not None and oj is not None and nj is not None and (
                    cmp.writes or cmp.holes or oj.size != nj.size):
                self.out.diffs[nj.id] = (oj.id, cmp.writes, cmp.holes)
                if cmp.data is not None:  # the differing blocks, read once: kept
                    view = memoryview(cmp.data)
                    self.out.kept[nj.id] = [(off, n, self.spool.put(view[off:off + n]))
                                            for off, n in cmp.writes]

    def _jobs(self, jobs: list[_Job]) -> list[Compared | _Kept | None]:
        """Read the files of ``jobs`` (in a worker thread): a pair side by side."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(_WHOLE)
        out: list[Compared | _Kept | None] = []
        for o, n in jobs:
            if o is not None and n is not None:
                cmp = compare_files(self.old.tree.abspath(o.path),
                                    self.new.tree.abspath(n.path), o.size, n.size, self.stop)
                o.digest, o.flags, n.digest, n.flags = (cmp.old_digest, cmp.old_flags,
                                                        cmp.new_digest, cmp.new_flags)
                out.append(cmp)
            else:
                node, side = (o, self.old) if o is not None else (n, self.new)
                assert node is not None
                out.append(_read_single(node, side.tree.abspath(node.path), buf,
                                        keep=n is not None, stop=self.stop))
        return out

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
        """Count an entry pair dropped below the directory pair (which must stay paired)."""
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
    workers: int | None = None,
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
        workers: threads reading the files of a directory (default: CPU count, at most 4).

    Raises:
        BtrdeltaError: a tree cannot be read, or a file changed while it was read.
    """
    old = _Side(os.fsencode(old_dir).rstrip(b"/") or b"/", tmpdir)
    try:
        new = _Side(os.fsencode(new_dir).rstrip(b"/") or b"/", tmpdir)
    except BaseException:
        old.close()
        raise
    walk = _Walk(old, new, quick, index_min, on_entry,
                 workers or min(4, os.cpu_count() or 1), tmpdir)
    try:
        walk.run()
        walk.out.old, walk.out.new = old.finish(), new.finish()
        walk.out.bytes_read = old.read + new.read
    except BaseException:
        walk.spool.close()
        raise
    finally:
        walk.stop.set()  # an error or a signal: a thread reading a large file stops soon
        if walk.pool is not None:
            walk.pool.shutdown(wait=True, cancel_futures=True)
        old.close()
        new.close()
    if on_entry is not None:
        on_entry(new.files, new.data)
    return walk.out


class SourceIndex(Value):
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
                    node.digest, node.flags = _hash_file(side.tree.abspath(node.path),
                                                         node.size, buf)
                    side.read += node.size
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
