"""Full sends streamed directory by directory: bounded memory, every file read once.

A full stream recreates a tree on an empty receiver: there is no old tree to match and no
namespace to order around, so :class:`FullSend` walks the tree top-down one directory at a
time (entries sorted by name: the order and node numbering of :func:`.walk.scan_tree`) and
emits, per entry, its create record (``LINK`` for a further name of a hard-linked inode) and
its xattrs, data and metadata in the order of :mod:`.emit`. A regular file is opened once and
read once: its content digest is computed from the same reads that make its ``WRITE``
records. A directory's own metadata comes after everything below it (a read-only directory
is filled before its mode is set), the root's last.

What stays in memory: the entries of the directory being read, the directories still to
visit (each a path), for inodes with more than one link their first path and names, and for
files of at least ``clone_min`` bytes their first path by content digest (a copy becomes a
``CLONE`` from the new subvolume, confirmed byte by byte first; with clone sources, ``send
-c``, their files of that size by digest: :func:`.changes.index_source`), and the inode
numbers given, 8-16 bytes an inode (:class:`.order.FullInos`: each derived from the inode's
first path, so the same in the next release's full). Nothing else grows with the tree.
The stream's first record (``SUBVOL``) names the tree's UUID, which is derived from the
content of every file (:meth:`.scan.Tree.identity`), so the records after it are written
as they are made, after room left for it, and it is written last: into a new regular output
file directly, else (a pipe, a signed stream) into a spool, an unnamed temporary file in
``tmpdir`` (the CLI's: ``$TMPDIR``, else ``/var/tmp``) copied out behind the header at the
end. ``CLONE`` records from the new subvolume are patched with its UUID at the end. The
identity's input goes to a second temporary file, node by node (a hard-linked node's names
are all known only at the end).
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from .. import TYPE_CHECKING, _native
from .._optional import need
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from ..fs.content import data_segments, has_byte_at
from ..stream.codec import encode_record, encode_stream_header
from ..stream.decode import decode_payload
from ..stream.reader import StreamReader
from ..stream.records import (
    Chmod,
    Chown,
    Clone,
    End,
    Link,
    Mkfile,
    Record,
    SetXattr,
    Subvol,
    Truncate,
    UpdateExtent,
    Utimes,
    Write,
)
from .changes import SourceIndex, TreeIdentity, dir_flags, index_source
from .clones import CLONE_MAX
from .emit import CAPS, COMPRESSORS, SendStats, encode_piece, option_problem
from .hashing import open_dir
from .onepass import content_hasher
from .order import FullInos, _create
from .scan import ROOT, Node, open_file, open_to_read, read_node, uuid_of

if TYPE_CHECKING:
    from ..stream.writer import Encoded

__all__ = ["FullSend"]

#: files up to this size are read with one ``read`` (and kept until sent)
_WHOLE = 1 << 20
_HDR = struct.Struct("<IHI")
#: the UUID of a CLONE from the new subvolume until its UUID is known
_NIL = uuid.UUID(int=0)


class _Spool:
    """Encoded records after a stream header and ``reserve`` bytes for the first record:
    in ``file`` (the output itself, when it is a regular file) or an unnamed temporary
    file."""

    def __init__(self, version: int, file: IO[bytes] | None = None, reserve: int = 0,
                 tmpdir: str | None = None) -> None:
        self.version = version
        self.owned = file is None
        if file is None:
            file = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 - see close()
        self.file = file
        head = encode_stream_header(version)
        self.file.write(head + bytes(reserve))
        self.head_len = len(head)
        self.pos = len(head) + reserve
        self.records = 0
        # the C encoder of plain commands (as StreamWriter's), else None
        self._head: Callable[[Record, int], Any] | None = getattr(
            _native.live("speedups"), "encode_head", None)

    def write(self, rec: Record) -> None:
        got = self._head(rec, self.version) if self._head is not None else None
        write = self.file.write
        for piece in encode_record(rec, self.version) if got is None else got:
            if piece is not None:
                write(piece)
                self.pos += len(piece)
        self.records += 1

    def write_encoded(self, enc: Encoded) -> None:
        """Records encoded already (:data:`~..stream.writer.Encoded`)."""
        head, data, tail, count = enc
        write = self.file.write
        for piece in (head, data, tail):
            if piece:
                write(piece)
                self.pos += len(piece)
        self.records += count

    def mark(self) -> tuple[int, int]:
        """Where the next record goes (for :meth:`rewind`)."""
        return self.pos, self.records

    def rewind(self, mark: tuple[int, int]) -> None:
        """Drop the records written since ``mark``."""
        self.file.truncate(mark[0])
        self.file.seek(mark[0])
        self.pos, self.records = mark

    def patch_clones(self, offsets: array[int], subvol: uuid.UUID, ctransid: int) -> None:
        """Name the new subvolume in the ``CLONE`` records at ``offsets``."""
        self.file.flush()
        fd = self.file.fileno()
        for off in offsets:
            length, cmd, _crc = _HDR.unpack(os.pread(fd, _HDR.size, off))
            rec = decode_payload(cmd, memoryview(os.pread(fd, length, off + _HDR.size)),
                                 0, length, self.version)
            assert isinstance(rec, Clone)
            fixed = Clone(offset=rec.offset, length=rec.length, path=rec.path,
                          clone_uuid=subvol, clone_ctransid=ctransid,
                          clone_path=rec.clone_path, clone_offset=rec.clone_offset)
            data = b"".join(encode_record(fixed, self.version))
            assert len(data) == _HDR.size + length
            os.pwrite(fd, data, off)
        self.file.seek(self.pos)

    def copy_to(self, write: Callable[[Any], object], skip: int) -> int:
        """Write the spool's bytes from ``skip`` on to ``write``; the bytes written."""
        self.file.flush()
        fd = self.file.fileno()
        pos, total = skip, 0
        while True:
            chunk = os.pread(fd, 1 << 20, pos)
            if not chunk:
                return total
            write(chunk)
            pos += len(chunk)
            total += len(chunk)

    def close(self) -> None:
        if self.owned:
            self.file.close()


class FullSend:
    """One full send of the tree at ``new_dir`` (see the module docstring).

    Args:
        new_dir: the tree to send.
        version: stream version (1, 2 or 3).
        compress: ``"zstd"``, ``"zlib"`` or ``None`` (v2+).
        no_data: ``UPDATE_EXTENT`` instead of file data.
        name: subvolume name in the stream (default: the basename of ``new_dir``).
        on_progress: called with :class:`~.emit.SendStats` now and then.
        clone_min: smallest file sent as a ``CLONE`` of an earlier file with its content.
        tmpdir: where the temporary files go (default: Python's, ``$TMPDIR`` or ``/tmp``).
        clone_sources: trees the receiver has (``send -c``): a file whose content one of
            them has (confirmed byte by byte) is sent as a ``CLONE`` from it.

    After :meth:`run`: :attr:`header` (the ``SUBVOL`` record) and :attr:`stats`.
    """

    def __init__(
        self,
        new_dir: str | bytes | os.PathLike[str],
        *,
        version: int = 1,
        compress: str | None = None,
        no_data: bool = False,
        name: bytes | None = None,
        on_progress: Callable[[SendStats], None] | None = None,
        clone_min: int = 16 * 1024,
        tmpdir: str | None = None,
        clone_sources: Sequence[str | bytes | os.PathLike[str]] = (),
    ) -> None:
        problem = option_problem(version, compress)
        if problem is not None:
            raise BtrdeltaError(problem)
        self._xxh = need("xxhash", "make")
        self.root = os.fsencode(new_dir).rstrip(b"/") or b"/"
        self.version = version
        self.no_data = no_data
        self.clone_min = clone_min
        self.chunk = 48 * 1024 if version == 1 else 128 * 1024
        self._compress: Callable[[bytes], bytes] | None = None
        self._compression = 0
        if compress is not None:
            self._compression, factory = COMPRESSORS[compress]
            self._compress = factory()
        base = os.path.basename(self.root) or b"subvol"
        self.name = name if name is not None else base
        self.stats = SendStats(phase="send")
        self._on_progress = on_progress
        self.header: Subvol | None = None
        self._spool: _Spool | None = None
        self.tmpdir = tmpdir
        self._ident = TreeIdentity(tmpdir)
        self._nodes = 0
        self._inos = FullInos()
        #: st_ino -> (node, first path) of inodes with more than one link
        self._linked: dict[int, tuple[Node, bytes]] = {}
        #: content digest -> first path, of files of at least clone_min bytes
        self._by_digest: dict[bytes, bytes] = {}
        self._clones: array[int] = array("Q")
        self._source_paths = clone_sources
        self._sources: list[SourceIndex] = []
        #: the clone source and path of the file being sent, when one has its content
        self._from: tuple[SourceIndex, bytes] | None = None
        #: a created inode's records encoded at once (the C accelerator), else None
        self._encode: Callable[..., Encoded | None] | None = None if compress or no_data \
            else getattr(_native.live("speedups"), "encode_inode", None)

    # -- driving ------------------------------------------------------------------------

    def write_to(self, write: Callable[[Any], object],
                 file: IO[bytes] | None = None) -> tuple[int, int]:
        """Send the stream to ``write``; (records, bytes) written. With ``file`` (the new,
        empty, regular file that ``write`` writes to) the records go straight into it and
        the first one is written last, into the room left for it: no spool."""
        if file is not None:
            reserve = len(b"".join(encode_record(self._subvol(_NIL, 0), self.version)))
            spool = self.run(file, reserve)
            assert self.header is not None
            data = b"".join(encode_record(self.header, self.version))
            assert len(data) == reserve
            file.flush()
            os.pwrite(file.fileno(), data, spool.head_len)
            return spool.records + 1, spool.pos
        spool = self.run()
        try:
            assert self.header is not None
            head = encode_stream_header(self.version)
            write(head)
            pieces = encode_record(self.header, self.version)
            for piece in pieces:
                write(piece)
            n = len(head) + sum(len(p) for p in pieces)
            return spool.records + 1, n + spool.copy_to(write, len(head))
        finally:
            spool.close()

    def _subvol(self, subvol: uuid.UUID, ctransid: int) -> Subvol:
        return Subvol(path=self.name, uuid=subvol, ctransid=ctransid)

    def records(self) -> Iterator[Record]:
        """The stream's records (``SUBVOL`` first, ``END`` last), read back from the spool."""
        spool = self.run()
        try:
            assert self.header is not None
            yield self.header
            spool.file.flush()
            spool.file.seek(0)
            yield from StreamReader(spool.file, source="send spool",  # type: ignore[arg-type]
                                    block_size=1 << 16)
        finally:
            spool.close()

    def run(self, file: IO[bytes] | None = None, reserve: int = 0) -> _Spool:
        """Walk the tree into a spool (in ``file``, after ``reserve`` bytes); sets
        :attr:`header`; returns the spool."""
        self._spool = spool = _Spool(self.version, file, reserve, self.tmpdir)
        try:
            self._sources = [index_source(src, index_min=self.clone_min, tmpdir=self.tmpdir)
                             for src in self._source_paths]
            self._walk()
            spool.write(End())
            identity = self._ident.digest(self._linked)
            subvol = uuid_of(identity)
            ctransid = self._ident.ctransid()
            spool.patch_clones(self._clones, subvol, ctransid)
            self.header = self._subvol(subvol, ctransid)
            self.stats.records = spool.records + 1
            self.stats.phase = "done"
            self._progress()
        except BaseException:
            spool.close()
            self._ident.close()
            raise
        return spool

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.stats)

    def _emit(self, rec: Record) -> None:
        assert self._spool is not None
        self._spool.write(rec)

    # -- the walk -----------------------------------------------------------------------

    def _walk(self) -> None:
        try:
            st = os.lstat(self.root)
        except OSError as exc:
            raise BtrdeltaError(f"cannot scan: {exc.strerror}", path=self.root) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise BtrdeltaError("not a directory", path=self.root)
        self.dev = st.st_dev
        root = read_node(ROOT, st, self.root, b"", None, self.root)
        root.flags = dir_flags(self.root)
        self._nodes = 1
        self._ident.add(root)
        # (node, absolute path) to visit, or (node, None): its metadata, after its subtree
        stack: list[tuple[Node, bytes | None]] = [(root, None), (root, self.root)]
        while stack:
            node, absdir = stack.pop()
            if absdir is None:
                self._metadata(node)
                continue
            subdirs = self._directory(node, absdir)
            for sub in reversed(subdirs):
                stack.append((sub, None))
                stack.append((sub, absdir + b"/" + sub.dentries[0][1]))

    def _directory(self, dnode: Node, absdir: bytes) -> list[Node]:
        """Send the entries of one directory; its subdirectories (to visit next, in order)."""
        try:
            dfd = open_dir(absdir)
            names = sorted(map(os.fsencode, os.listdir(dfd)))
        except OSError as exc:
            raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=absdir) from exc
        subdirs: list[Node] = []
        try:
            prefix = absdir + b"/"
            relprefix = dnode.path + b"/" if dnode.path else b""
            for name in names:
                st = os.lstat(name, dir_fd=dfd)
                if st.st_dev != self.dev:
                    continue  # mount point or nested subvolume: not part of this tree
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and st.st_ino == 2 and not os.listdir(prefix + name):
                    continue  # btrfs empty-subvolume stub in a snapshot
                node = self._entry(st, prefix + name, relprefix + name, dfd, name, dnode.id)
                if node is not None and is_dir:
                    subdirs.append(node)
        finally:
            os.close(dfd)
        return subdirs

    def _entry(self, st: os.stat_result, full: bytes, rel: bytes, dfd: int, name: bytes,
               parent: int) -> Node | None:
        """Send one entry; its node if it is a new one."""
        linked = st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode)
        if linked and st.st_ino in self._linked:
            first, first_path = self._linked[st.st_ino]
            first.dentries.append((parent, name))
            self._emit(Link(path=rel, path_link=first_path))
            return None
        node = read_node(self._nodes, st, full, rel, dfd, name)
        self._nodes += 1
        node.dentries.append((parent, name))
        self.stats.files_scanned += 1
        ino = self._inos.number(rel)
        if node.is_reg and not node.xattrs:  # (its MKFILE with its data, see _file)
            if not self._file(node, ino):
                self._metadata(node, xattrs=False)
        else:
            self._emit(_create(node, rel, ino))
        if node.is_dir:
            node.flags = dir_flags(full)
        elif node.xattrs or not node.is_reg:
            for xname, value in sorted(node.xattrs.items()):
                if xname != CAPS:
                    self._emit(SetXattr(path=rel, name=xname, data=value))
            if node.is_reg:
                self._file(node)
            self._metadata(node, xattrs=False)
        if linked:
            self._linked[st.st_ino] = (node, rel)
            self._ident.add_linked(node)
        else:
            self._ident.add(node)
        if self.stats.files_scanned % 256 == 0:
            self._progress()
        return node

    def _metadata(self, node: Node, *, xattrs: bool = True) -> None:
        """Ownership, mode, capabilities and times of a created inode (xattrs first for a
        directory, whose metadata comes after its subtree)."""
        path = node.path
        if not node.xattrs and self._encode is not None:
            enc = self._encode(self.version, path, -1, None, node.uid, node.gid, node.mode,
                               node.atime_ns, node.mtime_ns, node.ctime_ns)
            if enc is not None:
                assert self._spool is not None
                self._spool.write_encoded(enc)
                return
        if xattrs:
            for xname, value in sorted(node.xattrs.items()):
                if xname != CAPS:
                    self._emit(SetXattr(path=path, name=xname, data=value))
        self._emit(Chown(path=path, uid=node.uid, gid=node.gid))
        if node.fmt != stat.S_IFLNK:
            self._emit(Chmod(path=path, mode=node.mode & 0o7777))
        caps = node.xattrs.get(CAPS)
        if caps is not None:
            self._emit(SetXattr(path=path, name=CAPS, data=caps))
        self._emit(Utimes(path=path, atime=node.atime_ns, mtime=node.mtime_ns,
                          ctime=node.ctime_ns,
                          otime=node.ctime_ns if self.version >= 2 else None))

    # -- data ---------------------------------------------------------------------------

    def _file(self, node: Node, ino: int = -1) -> bool:
        """Open and read one regular file once: its data records, digest and flags (``ino``
        >= 0: its ``MKFILE`` first, and it has no xattrs). True when its metadata was sent
        with them: such a file of one ``WRITE`` without holes, its records encoded at once
        in C (:meth:`_at_once`)."""
        full = self.root + b"/" + node.path
        fd = open_to_read(full)
        try:
            node.flags = get_fileattr(fd)
            size = node.size
            segs = data_segments(fd, size) if size else []
            assert self._spool is not None
            self.stats.bytes_read += size
            if size <= _WHOLE:
                data = os.pread(fd, size + 1, 0) if size else b""
                if len(data) != size:
                    raise BtrdeltaError("file changed while sending (size differs)", path=full)
                node.digest = self._xxh.xxh3_128_digest(data)
                clone = self._clone(node, full, data)
                if ino >= 0 and not clone and self._encode is not None and \
                        0 < size <= self.chunk and segs == [(0, size)] and \
                        self._at_once(node, ino, data):
                    return True
                if ino >= 0:
                    self._emit(Mkfile(path=node.path, ino=ino))
                if clone:
                    self._clone_record(node, segs)
                    return False
                view = memoryview(data)
                for off, length in segs:
                    self._write_range(node, off, length, lambda p, n: view[p:p + n])
            else:
                if ino >= 0:
                    self._emit(Mkfile(path=node.path, ino=ino))
                mark, sent = self._spool.mark(), self.stats.data_bytes
                node.digest = self._read_large(node, fd, segs, full)
                if self._clone(node, full, None):
                    self.stats.data_bytes = sent
                    self._spool.rewind(mark)
                    self._clone_record(node, segs)
                    return False
            if not segs or sum(segs[-1]) < size:
                self._emit(Truncate(path=node.path, size=size))
            return False
        finally:
            os.close(fd)

    def _at_once(self, node: Node, ino: int, data: bytes) -> bool:
        """Send a small file's records (``MKFILE`` if ``ino`` >= 0, its one ``WRITE``,
        ``CHOWN``, ``CHMOD``, ``UTIMES``) encoded at once in C; False where the C encoder
        hands them back."""
        assert self._encode is not None
        assert self._spool is not None
        enc = self._encode(self.version, node.path, ino, data, node.uid, node.gid, node.mode,
                           node.atime_ns, node.mtime_ns, node.ctime_ns)
        if enc is None:
            return False
        self._spool.write_encoded(enc)
        self.stats.data_bytes += node.size
        return True

    def _read_large(self, node: Node, fd: int, segs: list[tuple[int, int]],
                    full: bytes) -> bytes:
        """Send the data ranges of a large file, hashing holes as the zeros they read as
        (by their length: :func:`.onepass.content_hasher`)."""
        data = sum(n for _off, n in segs)
        h = content_hasher(node.size - data, data)
        pos = 0

        def piece(p: int, n: int) -> bytes:
            nonlocal pos
            if pos < p:  # a hole before this piece
                h.zeros(p - pos)
            buf = os.pread(fd, n, p)
            if len(buf) != n:
                raise BtrdeltaError("file changed while sending (short read)", path=full)
            h.update(buf)
            pos = p + n
            return buf

        for off, length in segs:
            self._write_range(node, off, length, piece)
        if pos < node.size:
            h.zeros(node.size - pos)
        if has_byte_at(fd, node.size):
            raise BtrdeltaError("file changed while sending (size differs)", path=full)
        return h.digest()

    def _write_range(self, node: Node, off: int, length: int,
                     piece: Callable[[int, int], Any]) -> None:
        """``WRITE``/``ENCODED_WRITE`` records of one data range (the kernel's sizes), or one
        ``UPDATE_EXTENT`` (``no_data``: the range is still read, for the digest)."""
        path, end, pos = node.path, off + length, off
        while pos < end:
            n = min(self.chunk, end - pos)
            buf = piece(pos, n)
            if not self.no_data:
                enc = None
                if self._compress is not None:
                    enc = encode_piece(self._compress, self._compression, path, pos,
                                       bytes(buf), node.size)
                if enc is not None:
                    self.stats.data_bytes += len(enc.data)
                    self._emit(enc)
                else:
                    self.stats.data_bytes += n
                    self._emit(Write(path=path, offset=pos, data=memoryview(buf)))
            pos += n
        if self.no_data:
            self._emit(UpdateExtent(path=path, offset=off, size=length))

    def _clone(self, node: Node, full: bytes, data: bytes | None) -> bool:
        """Whether an earlier file of this tree has the same content (confirmed byte by
        byte: against ``data``, or by reading both files); else this file's content is
        remembered for later ones."""
        self._from = None
        if node.size < self.clone_min:
            return False
        for src in self._sources:
            found = src.by_digest.get(node.digest)
            if found is not None and found[1] == node.size and _same(
                    src.abspath(found[0]), full, node.size, data):
                self._from = (src, found[0])
                return True
        first = self._by_digest.get(node.digest)
        if first is None:
            self._by_digest[node.digest] = node.path
            return False
        return _same(self.root + b"/" + first, full, node.size, data)

    def _clone_record(self, node: Node, segs: list[tuple[int, int]]) -> None:
        """The ``CLONE`` of a file from the earlier one with its content (the new
        subvolume's UUID is patched in at the end)."""
        # (past CLONE_MAX: clonecut's CLONEs of its data ranges ``segs``)
        assert self._spool is not None
        self.stats.cloned_bytes += node.size
        if self._from is not None:
            src, path = self._from
            uuid, ctransid = src.uuid, src.ctransid
        else:
            uuid, ctransid, path = _NIL, 0, self._by_digest[node.digest]
        clone = Clone(offset=0, length=node.size, path=node.path, clone_uuid=uuid,
                      clone_ctransid=ctransid, clone_path=path, clone_offset=0)
        records: list[Record] = [clone]
        if node.size > CLONE_MAX:
            from .clonecut import whole_clones

            records = whole_clones(clone, segs)
        for rec in records:
            if self._from is None and isinstance(rec, Clone):
                self._clones.append(self._spool.pos)
            self._emit(rec)


def _same(a: bytes, b: bytes, size: int, data: bytes | None) -> bool:
    """Whether file ``a`` has the content ``data`` (or that of file ``b``)."""
    from .compare import files_equal

    if data is None:
        return files_equal(a, b, size)
    fd = open_file(a)
    try:
        return os.read(fd, size + 1) == data
    finally:
        os.close(fd)
