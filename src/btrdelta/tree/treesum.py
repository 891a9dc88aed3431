"""A checksum of a whole directory tree, to verify an update and to compare receivers.

Per entry (sorted by name, bytes) it covers: file type, ``st_mode``, uid, gid, mtime in
nanoseconds, size, content (tree-sum-2: BLAKE3 of the whole apparent size; tree-sum-3:
:mod:`.content`'s digest, holes taken by length), symlink target, device numbers, link count and
hard-link group (which other path shares the inode), and every extended attribute (name and
value, not following symlinks). Optionally (``holes=True``) the data/hole layout of regular
files, found with ``SEEK_DATA``/``SEEK_HOLE`` and rounded to 4 KiB blocks.

It never covers atime, ctime, inode numbers or the device. Entries on another device than the
root (nested btrfs subvolumes) and btrfs's empty-subvolume stubs (directories with inode 2)
are skipped, because send streams never carry them. ``ignore_root_mtime`` drops the root's
mtime, which a receiver cannot reproduce after an incremental stream (the kernel sends no
UTIMES for an unchanged root that orphans were created in).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import blake3

from .._futures import ThreadPoolExecutor
from ..fs.content import NOT_COPIED_XATTRS, data_segments
from ..fs.longpath import listdir_at, short_path
from .content import WHOLE_MAX, Stopped, file_content_digest

__all__ = ["FORMATS", "Entry", "EntryMaker", "Known", "Reuse", "diff_manifests",
           "manifest_sum", "tree_manifest", "tree_sum"]

#: the tree-sum formats computed: 2, a file's content as one BLAKE3 of its whole apparent
#: size (holes hashed as zeros); 3, :mod:`.content`'s digest (holes by length)
FORMATS = (2, 3)

#: ``reuse(relative path, lstat)`` of any entry: ``(entry, same)``, an entry of an earlier
#: walk whose content digest (of a file of the same size) this one still has and, with
#: ``same`` (the very inode, e.g. in a btrfs snapshot), its extended attributes and symlink
#: target too (they are then not read); or None
Reuse = Callable[[bytes, os.stat_result], "tuple[Entry, bool] | None"]
#: ``known(relative path, lstat)`` of any entry: its whole :class:`Entry` when the caller
#: knows it did not change (nothing of it is read), or None
Known = Callable[[bytes, os.stat_result], "Entry | None"]

_ZEROS = bytes(1 << 20)
_BLOCK = 4096
_READ = 1 << 20
#: files at least this large are hashed in worker threads (BLAKE3 and read() release the
#: GIL) while the walk goes on; smaller ones cost less hashed at once
_POOL_SIZE = 256 << 10
_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


@dataclass(frozen=True)
class Entry:
    """What the checksum covers for one path (relative, bytes; ``b"."`` is the root)."""

    path: bytes
    kind: str  # f d l c b p s
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    size: int | None = None
    digest: str | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    nlink: int | None = None
    link_group: bytes | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    layout: tuple[tuple[int, int], ...] | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def record(self) -> bytes:
        """The line as the tree-sum hashes it (encoded, with its newline); computed once
        (kept in the instance's ``__dict__``: an entry reused by a later walk is not
        formatted again)."""
        memo = self.__dict__
        got: bytes | None = memo.get("_record")
        if got is None:
            got = memo["_record"] = self.line().encode("utf-8", "surrogateescape") + b"\n"
        return got

    def line(self) -> str:
        """One manifest line (stable text, used for the digest and for diffs)."""
        parts = [
            _show(self.path),
            self.kind,
            f"mode={self.mode:o}",
            f"uid={self.uid}",
            f"gid={self.gid}",
        ]
        if self.mtime_ns is not None:
            parts.append(f"mtime={self.mtime_ns}")
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.digest is not None:
            parts.append(f"data={self.digest}")
        if self.target is not None:
            parts.append(f"target={_show(self.target)}")
        if self.rdev is not None:
            parts.append(f"rdev={self.rdev[0]}:{self.rdev[1]}")
        if self.nlink is not None:
            parts.append(f"nlink={self.nlink}")
        if self.link_group is not None:
            parts.append(f"linked={_show(self.link_group)}")
        for name, value in self.xattrs:
            parts.append(f"xattr:{_show(name)}={value.hex()}")
        if self.layout is not None:
            parts.append("layout=" + ",".join(f"{a}+{n}" for a, n in self.layout))
        return " ".join(parts)


def _show(b: bytes) -> str:
    """``b`` as one space-free token, one token per byte string (injective): a backslash
    doubled first, then bytes that are not UTF-8 as ``\\xNN``, newline ``\\n``, space
    ``\\x20``. Without the doubling a name holding the four characters ``\\x20`` and one
    holding a space (or ``\\n`` and a newline, ``\\xff`` and byte 0xff) had one line,
    and so two different trees one sum (tree-sum-1; this is tree-sum-2)."""
    return (b.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
            .replace("\n", "\\n").replace(" ", "\\x20"))


def _xattrs_of(path: bytes | str, exclude: frozenset[bytes], *, follow: bool = False
               ) -> tuple[tuple[bytes, bytes], ...]:
    """The extended attributes of ``path`` (``follow``: a ``/proc/self/fd/N`` of an
    ``O_PATH`` descriptor, which names the inode itself, a symlink too)."""
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in sorted(n.encode("utf-8", "surrogateescape") for n in names
                       if n not in NOT_COPIED_XATTRS):
        if name in exclude:
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        out.append((name, value))
    return tuple(out)


_Stopped = Stopped  # a hashing thread told to stop (EntryMaker.close before the walk's end)


def _same_inode(fd: int, ident: tuple[int, int], path: bytes) -> None:
    """Raise unless ``fd`` is the inode ``ident`` (``st_dev``, ``st_ino``) the walk's lstat
    saw at ``path``: a directory on the way swapped for a symlink (or for another
    directory) between that lstat and this open made the walk read entries outside the
    tree (as ``fts`` checks after it enters a directory).

    Raises:
        OSError: ``ESTALE``, naming ``path``.
    """
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        raise _replaced(path)


def _replaced(path: bytes) -> OSError:
    return OSError(errno.ESTALE, "replaced by another file while the tree was read (the "
                   "tree changed: sum it again)", path)


def _file_digest(
    path: bytes, size: int, want_layout: bool, ident: tuple[int, int],
    stop: threading.Event | None = None, version: int = 2,
) -> tuple[str, tuple[tuple[int, int], ...] | None]:
    """The content digest of format ``version`` (2: BLAKE3 of the content, holes read as
    zeros, up to :data:`~.content.WHOLE_MAX` bytes; 3: :func:`.content.file_content_digest`)
    and, if asked, the data extents, of
    the file at ``path`` that is inode ``ident`` (:func:`_same_inode`); ``stop`` set ends
    it within 1 MiB (:class:`_Stopped`): a file of terabytes, sparse or not, would else
    keep an interrupted command alive until it is hashed."""
    with short_path(path) as short:
        fd = os.open(short, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _same_inode(fd, ident, path)
        if version == 3 or size > WHOLE_MAX:
            digest = file_content_digest(fd, size, stop, path).hex()
            return digest, (_layout(data_segments(fd, size), size) if want_layout else None)
        return _digest2(fd, path, size, want_layout, stop)
    finally:
        os.close(fd)


def _layout(segments: list[tuple[int, int]], size: int) -> tuple[tuple[int, int], ...]:
    """The data extents as whole 4 KiB blocks, neighbours merged."""
    layout: list[tuple[int, int]] = []
    for data, length in segments:
        a = data // _BLOCK * _BLOCK
        b = min(-(-(data + length) // _BLOCK) * _BLOCK, -(-size // _BLOCK) * _BLOCK)
        if layout and layout[-1][0] + layout[-1][1] >= a:
            start = layout[-1][0]
            layout[-1] = (start, max(b, start + layout[-1][1]) - start)
        else:
            layout.append((a, b - a))
    return tuple(layout)


def _digest2(fd: int, path: bytes, size: int, want_layout: bool,
             stop: threading.Event | None) -> tuple[str, tuple[tuple[int, int], ...] | None]:
    """tree-sum-2's content digest: BLAKE3 of the whole apparent size."""
    h = blake3.blake3()
    segments = data_segments(fd, size)
    pos = 0
    for data, length in segments:
        _feed_zeros(h, data - pos, stop)
        os.lseek(fd, data, os.SEEK_SET)
        left = length
        while left > 0:
            if stop is not None and stop.is_set():
                raise _Stopped
            chunk = os.read(fd, min(_READ, left))
            if not chunk:
                raise OSError(errno.EIO, "file shrank while hashing", path)
            h.update(chunk)
            left -= len(chunk)
        pos = data + length
    _feed_zeros(h, size - pos, stop)
    return h.hexdigest(), (_layout(segments, size) if want_layout else None)


def _feed_zeros(h: blake3.blake3, n: int, stop: threading.Event | None) -> None:
    while n > 0:
        if stop is not None and stop.is_set():
            raise _Stopped
        take = min(n, len(_ZEROS))
        h.update(memoryview(_ZEROS)[:take])
        n -= take


def _kind(mode: int) -> str:
    fmt = stat.S_IFMT(mode)
    return {
        stat.S_IFREG: "f",
        stat.S_IFDIR: "d",
        stat.S_IFLNK: "l",
        stat.S_IFCHR: "c",
        stat.S_IFBLK: "b",
        stat.S_IFIFO: "p",
        stat.S_IFSOCK: "s",
    }.get(fmt, "?")


def _target_and_xattrs(path: bytes, ident: tuple[int, int], link: bool,
                       exclude: frozenset[bytes]
                       ) -> tuple[bytes | None, tuple[tuple[bytes, bytes], ...]]:
    """The target (``link``) and the extended attributes (but ``exclude``) of
    the entry at ``path`` that is inode ``ident`` (:func:`_same_inode`), both read through
    one ``O_PATH | O_NOFOLLOW`` descriptor of it: ``readlinkat(fd, "")`` and the xattr
    calls on ``/proc/self/fd/FD`` (``flistxattr`` refuses an ``O_PATH`` descriptor,
    EBADF, and a symlink or a FIFO is not opened otherwise). By path, a parent directory
    swapped for a symlink after the walk's lstat gave another entry's target or
    attributes. Without ``/proc`` they are read by path, after the inode check."""
    with short_path(path) as short:
        fd = os.open(short, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _same_inode(fd, ident, path)
            target = os.readlink(b"", dir_fd=fd) if link else None
            if _PROC_FD:
                return target, _xattrs_of(f"/proc/self/fd/{fd}", exclude, follow=True)
            return target, _xattrs_of(short, exclude)
        finally:
            os.close(fd)


#: whether ``/proc/self/fd`` is there (not in an initramfs that did not mount /proc)
_PROC_FD = os.path.isdir("/proc/self/fd")


def _walk(root: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, absolute path, lstat) in sorted depth-first order. A symlink given
    as ``root`` is followed (as ``find -H`` and ``du`` do for their argument, and ``send``
    for its snapshot); the symlinks inside the tree are not, nor a directory swapped for
    a symlink after its lstat (each directory listed is the inode its lstat saw)."""
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(root)  # (a dangling link: ENOENT naming the argument)
        root = os.path.realpath(root)
    dev = st.st_dev
    yield b".", root, st
    stack: list[tuple[bytes, bytes, int]] = [(b"", root, st.st_ino)]
    while stack:
        rel, absdir, ino = stack.pop()
        try:
            with short_path(absdir) as short:  # (a path longer than PATH_MAX too)
                dfd = os.open(short,
                              os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except NotADirectoryError:
            if not rel:  # (the tree given is a file)
                raise
            raise _replaced(absdir) from None  # (a symlink now: not followed)
        try:
            _same_inode(dfd, (dev, ino), absdir)
            names = sorted(map(os.fsencode, os.listdir(dfd)))
            subdirs = []
            for name in names:
                full = absdir + b"/" + name
                est = os.lstat(name, dir_fd=dfd)
                if est.st_dev != dev:
                    continue  # another subvolume / mount
                if stat.S_ISDIR(est.st_mode) and est.st_ino == 2 and \
                        not listdir_at(dfd, name):
                    continue  # btrfs empty-subvolume stub in a snapshot
                r = rel + b"/" + name if rel else name
                yield r, full, est
                if stat.S_ISDIR(est.st_mode):
                    subdirs.append((r, full, est.st_ino))
        finally:
            os.close(dfd)
        stack.extend(reversed(subdirs))


class EntryMaker:
    """The entries of one walk, made one at a time (:func:`tree_manifest`'s body; also
    :meth:`btrdelta.tree.incremental.Changes.tree_sum`'s for the entries its C walk hands
    back): content, link groups, extended attributes; large files hashed in worker threads
    (:meth:`finish` puts their digests in)."""

    def __init__(self, holes: bool, ignore_root_mtime: bool, exclude: frozenset[bytes],
                 reuse: Reuse | None, known: Known | None, version: int = 2) -> None:
        if version not in FORMATS:
            raise ValueError(f"no tree-sum format {version}")
        self.version = version
        self.holes = holes
        self.ignore_root_mtime = ignore_root_mtime
        self.exclude = exclude
        self.reuse = reuse
        self.known = known
        self.groups: dict[int, bytes] = {}
        #: (st_dev, st_ino) of a regular file of several names -> its first entry's index
        self.linked: dict[tuple[int, int], int] = {}
        #: (index, index of the first name's entry): a later name, its digest copied
        self.copies: list[tuple[int, int]] = []
        self.out: list[Entry] = []
        self.hashing: list[tuple[int, Future[tuple[str, tuple[tuple[int, int], ...] | None]]]]
        self.hashing = []
        self.pool: ThreadPoolExecutor | None = None
        self.stop = threading.Event()

    def add(self, rel: bytes, full: bytes, st: os.stat_result) -> None:
        """Make the entry of ``rel`` (absolute path ``full``, lstat ``st``) and append it."""
        out, known, holes = self.out, self.known, self.holes
        if known is not None:
            same = known(rel, st)
            if same is not None and (st.st_nlink == 1 or stat.S_ISDIR(st.st_mode)):
                out.append(same)
                return
        mode = st.st_mode
        kind = _kind(mode)
        mtime: int | None = st.st_mtime_ns
        if rel == b"." and self.ignore_root_mtime:
            mtime = None
        size = digest = target = rdev = nlink = group = None
        layout = None
        base = whole = None
        if self.reuse is not None:
            found = self.reuse(rel, st)
            if found is not None and found[0].kind == kind:
                base = found[0]
                whole = base if found[1] else None
        first = None
        if kind == "f" and st.st_nlink > 1:
            first = self.linked.setdefault((st.st_dev, st.st_ino), len(out))
            first = None if first == len(out) else first
        if first is not None:  # another name of a file already read: one inode, one content
            size = st.st_size
            self.copies.append((len(out), first))
        elif kind == "f":
            size = st.st_size
            if base is not None and base.size == size:
                digest = base.digest
            if digest is None and not holes and size >= _POOL_SIZE and _WORKERS > 1:
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(_WORKERS, "btrdelta-treesum")
                self.hashing.append((len(out), self.pool.submit(
                    _file_digest, full, size, False, (st.st_dev, st.st_ino), self.stop,
                    self.version)))
            elif digest is None:
                digest, layout = _file_digest(full, st.st_size, holes, (st.st_dev, st.st_ino),
                                              None, self.version)
        elif kind in "cb":
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != "d":
            nlink = st.st_nlink
            if st.st_nlink > 1:
                group = self.groups.setdefault(st.st_ino, rel)
                if group == rel:
                    group = None
        if first is not None:
            xattrs = out[first].xattrs
        elif whole is not None:
            xattrs, target = whole.xattrs, whole.target
        elif kind != "s":
            target, xattrs = _target_and_xattrs(full, (st.st_dev, st.st_ino), kind == "l",
                                                self.exclude)
        else:
            xattrs = ()
        out.append(
            Entry(rel, kind, mode, st.st_uid, st.st_gid, mtime, size, digest, target,
                  rdev, nlink, group, xattrs, layout)
        )

    def finish(self) -> list[Entry]:
        """The entries, with the digests hashed in threads."""
        out = self.out
        for i, fut in self.hashing:
            out[i] = replace(out[i], digest=fut.result()[0])
        for i, first in self.copies:
            out[i] = replace(out[i], digest=out[first].digest, layout=out[first].layout)
        return out

    def close(self) -> None:
        """Stop the worker threads (those not started are cancelled, those hashing stop
        within 1 MiB)."""
        self.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def tree_manifest(
    path: str | os.PathLike[str] | bytes,
    *,
    holes: bool = False,
    ignore_root_mtime: bool = False,
    exclude_xattrs: Iterable[bytes] = (),
    reuse: Reuse | None = None,
    known: Known | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    version: int = 2,
) -> list[Entry]:
    """Every entry of the tree at ``path`` as :class:`Entry` values, sorted by path
    (``path`` a symlink: the tree it points to; the symlinks inside are entries).

    ``reuse`` (not with ``holes``) is asked for what it knows of each entry's content,
    extended attributes and symlink target before they are read (see :data:`Reuse`),
    ``known`` (not with ``holes``) for a whole entry
    before anything else of it is read (see :data:`Known`); everything else is read from
    the tree. Large files are hashed in worker threads while the walk goes on.
    ``on_progress(entries, file bytes)`` is called every 256 entries and at the end (the
    bytes of regular files walked so far; those hashed in threads counted when handed to
    them). ``version``: the tree-sum format (:data:`FORMATS`) of the content digests;
    ``reuse`` and ``known`` must give entries of the same format."""
    if (reuse is not None or known is not None) and holes:
        raise ValueError("reuse gives content digests, not layouts")
    maker = EntryMaker(holes, ignore_root_mtime, frozenset(exclude_xattrs), reuse, known,
                       version)
    n = nbytes = 0
    try:
        if on_progress is None:
            for rel, full, st in _walk(os.fsencode(path)):
                maker.add(rel, full, st)
        else:
            for rel, full, st in _walk(os.fsencode(path)):
                maker.add(rel, full, st)
                n += 1
                if stat.S_ISREG(st.st_mode):
                    nbytes += st.st_size
                if not n % 256:
                    on_progress(n, nbytes)
        entries = maker.finish()
        if on_progress is not None:
            on_progress(n, nbytes)
        return entries
    finally:
        maker.close()


def tree_sum(
    path: str | os.PathLike[str] | bytes,
    *,
    holes: bool = False,
    ignore_root_mtime: bool = False,
    exclude_xattrs: Iterable[bytes] = (),
    on_progress: Callable[[int, int], None] | None = None,
    version: int = 2,
) -> str:
    """Hex BLAKE3 over the manifest of the tree at ``path`` (equal trees, equal sums);
    ``on_progress`` and ``version`` as :func:`tree_manifest`'s."""
    return manifest_sum(tree_manifest(
        path, holes=holes, ignore_root_mtime=ignore_root_mtime, exclude_xattrs=exclude_xattrs,
        on_progress=on_progress, version=version,
    ), version)


def manifest_sum(entries: Iterable[Entry], version: int = 2) -> str:
    """The tree-sum of a manifest (:func:`tree_manifest`'s entries, in order, made with
    ``version``); tree-sum-3's starts with the line ``tree-sum-3`` (no tree has one sum
    in both formats, even a tree without regular files)."""
    if version not in FORMATS:
        raise ValueError(f"no tree-sum format {version}")
    h = blake3.blake3(b"tree-sum-3\n" if version == 3 else b"")
    batch: list[bytes] = []
    for entry in entries:  # joined a few thousand lines at a time: few calls, little memory
        batch.append(entry.record)
        if len(batch) == 4096:
            h.update(b"".join(batch))
            batch.clear()
    h.update(b"".join(batch))
    return str(h.hexdigest())


def diff_manifests(a: list[Entry], b: list[Entry], limit: int = 20,
                   names: tuple[str, str] = ("first", "second")) -> list[str]:
    """Human-readable differences between two manifests (empty when equal); ``names``: how
    the lines call ``a`` and ``b`` ("only in NAME: path")."""
    da = {e.path: e for e in a}
    db = {e.path: e for e in b}
    out: list[str] = []
    for path in sorted(da.keys() | db.keys()):
        ea, eb = da.get(path), db.get(path)
        if ea is None:
            out.append(f"only in {names[1]}: {_show(path)}")
        elif eb is None:
            out.append(f"only in {names[0]}: {_show(path)}")
        elif ea.line() != eb.line():
            la, lb = ea.line().split(" "), eb.line().split(" ")
            fa = [x for x in la if x not in lb]
            fb = [x for x in lb if x not in la]
            out.append(f"differs: {_show(path)}: {' '.join(fa)} != {' '.join(fb)}")
        if len(out) >= limit:
            out.append("...")
            break
    return out
