"""Turning scanned and matched trees into send-stream records.

Order of a stream (every step valid for a path-based receiver such as ``btrfs receive``):

1. ``SUBVOL`` (full) or ``SNAPSHOT`` of the parent (incremental), UUIDs derived from the
   trees (see :mod:`btrdelta.send.scan`);
2. the namespace records from :mod:`btrdelta.send.order`;
3. per inode of the new tree (top-down, the root last), in the kernel's per-inode order:
   xattr changes, data (``WRITE`` / ``ENCODED_WRITE`` / ``CLONE``, hole punches), ``TRUNCATE``,
   ``CHOWN``, ``CHMOD`` (never for symlinks), ``FILEATTR`` (v2+, only for inodes of the parent
   whose ``chattr`` flags changed, as the kernel does), ``security.capability`` (re-set after
   chown and after data, which both clear it), ``UTIMES`` last; inodes with nothing to send
   are skipped without building anything;
4. ``END``.

Data: v1 writes are 48 KiB, v2/v3 writes 128 KiB, as the kernel sends them. Holes stay holes
(data ranges come from ``SEEK_DATA``/``SEEK_HOLE``). With ``compress``, each 128 KiB piece that
starts on a 4 KiB boundary (and is 4 KiB aligned or ends at EOF) is compressed, zero padded
to 4 KiB as btrfs lays out a compressed extent, and sent as ``ENCODED_WRITE`` (zstd: one frame,
level 3, window log 17; zlib: one zlib stream), unless compressing does not save a sector.
A new file whose whole content equals a file of the old tree or one already sent becomes a
``CLONE`` (from the parent subvolume at its *old* path, which the receiver keeps intact, or
from the new subvolume, or from a clone source: ``send -c``, a tree the receiver has under
the UUID a full stream of it names). In a changed file, ranges found in its old version at a
4 KiB-aligned shift (:func:`~btrdelta.send.compare.shifted_clones`) become partial ``CLONE``
records from the parent, the rest ``WRITE`` records. With ``no_data`` (the kernel's
``NO_FILE_DATA``, ``send --no-data``) no file data is sent: each range that would be
written, and each hole that would be punched, becomes one ``UPDATE_EXTENT`` (path, offset,
length); clones stay.

Full sends without clone sources go through :mod:`.full` instead (no tree model). Here,
before any record, both trees are scanned and every regular file read once and hashed
(:mod:`btrdelta.send.scan`): the parent tree in a forked child process, the new tree here with
a thread pool, so an incremental send uses two cores like rsync's sender/receiver pair. A
full record-mode send whose UUID is not the content's (a btrfs snapshot's) starts at once
instead: its files are hashed in the order they are sent, each waited for as it is sent
(``TreeScan(order=...)``), or also its tree walked as it is sent, each directory waited for
(``TreeScan(stream=...)``: :class:`~.walk.ScanStream`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from itertools import chain
from uuid import UUID

from .. import TYPE_CHECKING, _native
from ..errors import BtrdeltaError
from ..fs.content import data_segments, iter_data_segments
from ..stream.records import (
    Chmod,
    Chown,
    Clone,
    EncodedWrite,
    End,
    Fallocate,
    Fileattr,
    Mkfile,
    Record,
    RemoveXattr,
    SetXattr,
    Snapshot,
    Subvol,
    Truncate,
    UpdateExtent,
    Utimes,
    Write,
)
from .clones import CLONE_MAX, CloneFinder
from .diff import Match, match_trees
from .encode import COMPRESSORS, encode_piece, option_problem
from .hashing import DirectReader, direct_buffer, reader, uncache
from .onepass import BlockHasher, hashed_as_sent, segment_max
from .order import Namespace, full_order, order_namespace
from .record import BlockIndex, Diff, block_diff
from .scan import ROOT, ContentHasher, Node, Tree, TreeScan, block_segments, inode_order, open_file
from .values import SendStats, StreamIds

if TYPE_CHECKING:
    from ..stream.writer import Encoded
    from .changes import Changes, SourceIndex
    from .walk import ScanStream

__all__ = ["CAPS", "COMPRESSORS", "SendStats", "Sender", "StreamIds", "encode_piece",
           "option_problem"]

CAPS = b"security.capability"
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


class Sender(CloneFinder):
    """Produces the records of a full or incremental send.

    Args:
        new_dir: the tree to send.
        parent_dir: the tree the receiver already has (``None``: full stream).
        version: stream version (1, 2 or 3); v1 cannot carry compressed data.
        compress: ``"zstd"``, ``"zlib"`` or ``None``.
        quick: trust equal size and mtime at the same path as "unchanged" (like rsync).
        clone_min: smallest file (bytes) that is deduplicated with ``CLONE``.
        workers: threads that read and hash file contents (default: CPU count, at most 4).
        shift_min: shortest range of a changed file that is cloned from elsewhere in its old
            version when found there at a 4 KiB-aligned shift (0: never look).
        name: subvolume name in the stream (default: the basename of ``new_dir``).
        on_progress: called with :class:`SendStats` now and then.
        scan: the trees' :class:`~btrdelta.send.scan.TreeScan`, if started (default: here).
        old_record: the parent as a tree without files (from a sendshot record,
            :func:`~btrdelta.send.record.tree_from_record`) instead of ``parent_dir``: the new
            tree must then be hashed in record mode (``TreeScan(seed=...)``); changed blocks
            are found by digest, moved content by digest, nothing of the old tree is read.
        ids: UUIDs and ctransids to name instead of the ones derived from the trees.
        identities: ``old_record`` is a record of an earlier state of this very tree (inode
            numbers are identities: renamed inodes are found by them).
        clone_sources: more trees the receiver has (as subvolumes received from full
            streams of them): whole files found there are sent as ``CLONE`` from them.
        no_data: send ``UPDATE_EXTENT`` instead of file data (``NO_FILE_DATA``).
        tmpdir: where temporary files go (the identity of a tree with hard links).

    An incremental send from ``parent_dir`` without ``scan`` walks both trees in lockstep
    and keeps only what changed (:func:`~.changes.find_changes`): memory grows with the
    changes, not with the trees. With ``scan`` or ``old_record`` both trees are held whole.
    """

    #: the C encoder of a created inode's records (:meth:`encoded_records`)
    _encode_inode: Callable[..., Encoded | None] | None = None
    #: a file's bytes taken from the hashing threads by :meth:`_encoded`, not encoded
    _content: bytes | None = None
    #: send the root's times even where the parent has the same (the receiver's may differ)
    root_times = False

    def __init__(
        self,
        new_dir: str | bytes | os.PathLike[str],
        parent_dir: str | bytes | os.PathLike[str] | None = None,
        *,
        version: int = 1,
        compress: str | None = None,
        quick: bool = False,
        clone_min: int = 16 * 1024,
        workers: int | None = None,
        shift_min: int = 16 * 1024,
        name: bytes | None = None,
        on_progress: Callable[[SendStats], None] | None = None,
        scan: TreeScan | None = None,
        old_record: Tree | None = None,
        ids: StreamIds | None = None,
        identities: bool = False,
        clone_sources: Sequence[str | bytes | os.PathLike[str]] = (),
        no_data: bool = False,
        tmpdir: str | None = None,
    ) -> None:
        problem = option_problem(version, compress)
        if problem is not None:
            if scan is not None:
                scan.close()
            raise BtrdeltaError(problem)
        self.new_dir = os.fsencode(new_dir)
        self.parent_dir = os.fsencode(parent_dir) if parent_dir is not None else None
        self.version = version
        self.quick, self.clone_min = quick, clone_min
        self.workers = workers
        self.shift_min = shift_min
        self.no_data = no_data
        self._old_by_name: dict[bytes, list[Node]] | None = None
        self.stats = SendStats()
        self._on_progress = on_progress
        self._compress: Callable[[bytes], bytes] | None = None
        self._compression = 0
        if compress is not None:
            self._compression, factory = COMPRESSORS[compress]
            self._compress = factory()
        self.chunk = 48 * 1024 if version == 1 else 128 * 1024
        base = os.path.basename(self.new_dir.rstrip(b"/")) or b"subvol"
        self.name = name if name is not None else base
        self._read = 0
        #: the trees reduced to what changed (an incremental send without ``scan``)
        self.changes: Changes | None = None
        self._hasher: ContentHasher | None = None
        self._window = direct_buffer()  # (a mapping: no page is touched until it is used)
        self._ordered = False  # (a full send's files hashed in the order sent)
        self._stream: ScanStream | None = None  # (its tree walked as it is sent)
        self.old: Tree | None = None
        if scan is None and old_record is None and self.parent_dir is not None:
            from .changes import find_changes  # (not needed by a send from a record)
            self.changes = find_changes(
                self.parent_dir, self.new_dir, quick=quick, tmpdir=tmpdir,
                index_min=min(clone_min, shift_min or clone_min),
                on_entry=self._on_entry(0, 0), workers=workers)
            self.new, self.old = self.changes.new, self.changes.old
        else:
            self._scan_trees(scan, old_record, workers)
        self.stats.files_scanned, self.stats.bytes_scanned = self.new.files, self.new.data_bytes
        #: the parent is a record (no files to read)
        self.virtual = old_record is not None
        self.identities = identities and self.virtual
        self.ids = ids or StreamIds()
        self._index: BlockIndex | None = None
        self._match: Match | None = None
        #: record mode: each file's block diff, made by the estimate and used when sending
        self._diffs: dict[int, Diff] = {}
        #: bytes of file data the stream carries at most (set with the header)
        self.estimate = 0
        # a full send is an incremental one from a tree that holds only the root directory
        self._base = self.old if self.old is not None else \
            Tree(self.new_dir, {ROOT: self.new.nodes[ROOT]}, {ROOT: {}})
        self._base.hashed = self.old is None or self._base.hashed
        if not self.virtual and self._hasher is not None:
            self._hasher.submit(self._base)
        self.sources = self._index_sources(clone_sources, tmpdir, scan)
        self._hashed = 0

    def _index_sources(self, sources: Sequence[str | bytes | os.PathLike[str]],
                       tmpdir: str | None, scan: TreeScan | None) -> list[SourceIndex]:
        """Walk the clone sources (``send -c``): their UUIDs and larger files by digest."""
        if not sources:
            return []
        from .changes import index_source

        try:
            return [index_source(src, index_min=self.clone_min, tmpdir=tmpdir)
                    for src in sources]
        except BaseException:
            if scan is not None:
                scan.close()
            raise

    @property
    def streaming(self) -> bool:
        """A full send hashed in the order sent (``TreeScan(order=...)``, or ``stream``: also
        walked as sent): each file waited for as sent (not if the UUID is the content's)."""
        return self.old is None and self._ordered and self.ids.uuid is not None

    def _scan_trees(self, scan: TreeScan | None, old_record: Tree | None,
                    workers: int | None) -> None:
        """The whole-tree model: scan both trees (or take ``scan``'s) and hash them, the
        parent in a child process, the new tree in threads (or take the record)."""
        if scan is None:
            scan = TreeScan(self.new_dir, self.parent_dir, workers=workers,
                            on_entry=self._on_entry(0, 0))
        elif scan.parent_dir != self.parent_dir:
            scan.close()
            raise BtrdeltaError("the prepared scan is of another parent tree")
        self.new = scan.new
        self._stream = scan.stream
        self._ordered = scan.order is not None or scan.stream is not None
        if old_record is not None:
            self.old = old_record
        else:
            self.old = scan.old_tree(on_entry=self._on_entry(self.new.files,
                                                             self.new.data_bytes))
        self._hasher = scan.hasher

    # -- progress ------------------------------------------------------------------------

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.stats)

    def _on_entry(self, files0: int, bytes0: int) -> Callable[[int, int], None]:
        def on_entry(files: int, nbytes: int) -> None:
            self.stats.files_scanned = files0 + files
            self.stats.bytes_scanned = bytes0 + nbytes
            self._progress()

        return on_entry

    # -- identity ------------------------------------------------------------------------

    def header(self) -> Subvol | Snapshot:
        """The stream's first record."""
        uuid, ctransid = self.new_ids()
        if self.old is None:
            return Subvol(path=self.name, uuid=uuid, ctransid=ctransid)
        clone_uuid, clone_ctransid = self.parent_ids()
        return Snapshot(
            path=self.name,
            uuid=uuid,
            ctransid=ctransid,
            clone_uuid=clone_uuid,
            clone_ctransid=clone_ctransid,
        )

    def new_ids(self) -> tuple[UUID, int]:
        """The UUID and ctransid the stream names for the new subvolume."""
        if self.ids.uuid is not None:
            return self.ids.uuid, self.ids.ctransid
        return self.new.subvol_uuid(), self.new.ctransid()

    def parent_ids(self) -> tuple[UUID, int]:
        """The UUID and ctransid the receiver knows the parent by."""
        assert self.old is not None
        if self.ids.parent_uuid is not None:
            return self.ids.parent_uuid, self.ids.parent_ctransid
        return self.old.subvol_uuid(), self.old.ctransid()

    # -- the stream ----------------------------------------------------------------------

    def records(self) -> Generator[Record, None, None]:
        """Every record of the stream, ``SUBVOL``/``SNAPSHOT`` first and ``END`` last."""
        return self._stream_of()  # type: ignore[return-value]  # (no Encoded without it)

    def encoded_records(self) -> Generator[Record | Encoded, None, None]:
        """:meth:`records`, but a full stream's created inodes may come as
        :data:`~..stream.writer.Encoded` (all of an inode's records, encoded as
        :class:`~..stream.writer.StreamWriter` would encode them in this version) where the C
        accelerator makes them (:meth:`_encoded`)."""
        if self.old is None and self._compress is None and not self.no_data:
            self._encode_inode = getattr(_native.live("speedups"), "encode_inode", None)
        return self._stream_of()

    def _stream_of(self) -> Generator[Record | Encoded, None, None]:
        try:
            yield from self._records()
        finally:
            if self.changes is not None:
                self.changes.close()
            if self.streaming and self._hasher is not None:
                self._hasher.close()  # (a stream that failed: the threads stop)
            if self._stream is not None:
                self._stream.close()  # (the walk too)

    def _records(self) -> Iterator[Record | Encoded]:
        old = self._base
        self.stats.phase = "hash"
        self._progress()

        def on_bytes(n: int) -> None:
            self._hashed = n
            self.stats.bytes_read = self._read + n
            self._progress()

        if self._stream is not None and not self.streaming:
            self._stream.join()  # (a tree whose UUID is its content's: scanned first)
        if self._hasher is None:
            assert self.changes is not None
            on_bytes(self.changes.bytes_read)
        elif not self.streaming:  # (streamed: each file waited for as it is sent)
            self._hasher.wait(on_bytes)
        self.stats.phase = "match"
        self._progress()
        match = match_trees(old, self.new, quick=self.quick, virtual=self.virtual,
                            identities=self.identities,
                            dropped=self.changes.dropped if self.changes else None)
        self._match = match
        if self.old is None:
            match.unchanged.discard(ROOT)
        self.estimate = self._estimate(old, match)
        self.stats.phase = "send"
        self._progress()
        yield self._count(self.header())
        names, ns = full_order(old, self.new, match, self._stream) if self.old is None \
            else order_namespace(old, self.new, match)
        if self.root_times and ROOT in match.n2o:  # (as a root the stream touched)
            ns.touched.add(match.n2o[ROOT])
        yield from self._inodes(old, match, ns, names)
        if self.streaming:
            assert self._hasher is not None
            if self._stream is not None:  # (every directory was sent: the walk is over)
                new = self._stream.join()
                self.stats.files_scanned, self.stats.bytes_scanned = new.files, new.data_bytes
            self._hasher.wait(on_bytes)  # every file was waited for: the threads end
            self.estimate = self._estimate(old, match)  # (its data ranges now known)
        yield self._count(End())
        self.stats.phase = "done"
        self._progress()

    def _count(self, rec: Record) -> Record:
        self.stats.records += 1
        return rec

    def _estimate(self, old: Tree, match: Match) -> int:
        """Bytes of file data the stream will carry at most: in record mode the blocks that
        differ from the receiver's and are not found in old files (the block diffs are kept
        for sending), else every changed file whole."""
        if self.streaming:  # (a file not hashed yet: whole, holes too)
            if self._stream is not None and self._stream.walking:
                return 0  # (not scanned yet either: unknown)
            return sum(n.size if n.segments is None else sum(k for _o, k in n.segments)
                       for nid, n in self.new.nodes.items()
                       if n.is_reg and nid not in match.unchanged)
        total = 0
        olds = {(o.bdigest, o.size) for o in old.nodes.values()
                if o.is_reg and o.bdigest and o.size >= self.clone_min} if self.virtual else set()
        for nid, node in self.new.nodes.items():
            if not node.is_reg or nid in match.unchanged:
                continue
            if node.segments is None:  # not hashed in record mode
                total += node.size
            elif not self.virtual:
                total += sum(n for _o, n in node.segments)
            else:
                oid = match.n2o.get(nid)
                onode = old.nodes[oid] if oid is not None else None
                if onode is None and (node.bdigest, node.size) in olds:
                    continue  # one CLONE of an old file
                self._diffs[nid] = diff = self._diff(node, onode)
                total += sum(n for _o, n in diff[0])
        return total

    def _diff(self, node: Node, onode: Node | None) -> Diff:
        """Record mode: :func:`~.record.block_diff` of a changed (``onode``) or new file."""
        got = self._diffs.pop(node.id, None)
        if got is not None:
            return got
        index = self._block_index()
        source = onode if onode is not None else self._similar_old_file(node)
        if source is not None:
            index.add(source)
        return block_diff(node, onode, index, min_len=self.shift_min)

    def _inodes(self, old: Tree, match: Match, ns: Namespace,
                names: Iterable[Record | int | tuple[int, int]]) -> Iterator[Record | Encoded]:
        """The namespace records ``names``, then every inode's (xattrs, data, metadata) in
        ``inode_order``; a full send's ``names`` hold its inodes' ids (``full_order``)."""
        new = self.new
        full = self.old is None
        # clone sources by content digest: old files, and new files already sent
        old_by_digest: dict[bytes, int] = {}
        if not full and self.changes is None:
            for o in old.nodes.values():
                if o.is_reg and o.size >= self.clone_min:
                    old_by_digest.setdefault(o.digest, o.id)
        self._old_digests = old_by_digest
        new_by_digest: dict[bytes, int] = {}
        order = names if full else chain(names, inode_order(new))
        ready = self._hasher.ready if self.streaming and self._hasher is not None else None
        unchanged, touched = match.unchanged, ns.touched
        encode = self._encode_inode if full else None
        for i, item in enumerate(order):
            if item.__class__ is tuple:  # a full send's new file: its MKFILE, then its id
                nid, ino = item
            elif item.__class__ is int:
                nid, ino = item, -1
            else:  # a namespace record
                yield self._count(item)  # type: ignore[arg-type]
                continue
            node = new.nodes[nid]
            if ready is not None and node.is_reg:
                ready(node)  # its digests and bytes (hashed in this order, ahead)
            enc = self._encoded(node, ino, encode, new_by_digest) if encode is not None \
                else None
            if enc is not None:
                yield enc
            else:
                if ino >= 0:
                    yield self._count(Mkfile(path=node.path, ino=ino))
                oid = match.n2o.get(nid)
                onode = old.nodes[oid] if oid is not None and not full else None
                if (
                    onode is None  # fast path: nothing at all to send for this inode
                    or (nid not in unchanged and node.is_reg)
                    or onode.mtime_ns != node.mtime_ns
                    or onode.mode != node.mode
                    or onode.uid != node.uid
                    or onode.gid != node.gid
                    or onode.flags != node.flags
                    or oid in touched
                    or onode.xattrs != node.xattrs
                ):
                    yield from self._inode(node, onode, match, ns, old_by_digest,
                                           new_by_digest)
            if node.is_reg and node.size >= self.clone_min:
                new_by_digest.setdefault(node.digest, nid)
            if i % 64 == 0:
                self.stats.bytes_read = self._read + self._hashed
                self.stats.files_scanned = new.files  # (a tree still walked: so far)
                self._progress()
        self.stats.bytes_read = self._read + self._hashed

    def _encoded(self, node: Node, ino: int, encode: Callable[..., Encoded | None],
                 new_by_digest: dict[bytes, int]) -> Encoded | None:
        """A full send's created inode's records (``ino`` >= 0: its ``MKFILE`` first) made by
        the C accelerator at once, as :meth:`_inode` makes them one by one: an inode without
        xattrs; a regular file only if its bytes fit one ``WRITE`` (the sizes of the
        kernel's writes), it has no holes and no ``CLONE`` stands for it (its bytes as the
        hashing threads kept them, else read here). None: :meth:`_inode` makes them (a
        file's bytes taken are handed to it). Which inodes come encoded depends on the tree
        only, not on what the threads kept: a replication's segments end at the same
        records when a cut transfer's stream is made again."""
        if node.xattrs:
            return None
        content = None
        if node.is_reg:
            if node.size > self.chunk or node.segments is None or self._hasher is None:
                return None
            content = self._hasher.take(node)
            if node.size >= self.clone_min and \
                    self._find_clone(node, new_by_digest) is not None:
                self._content = content
                return None
            if content is None and node.size:
                content = self._read_whole(node)
                if content is None:  # (holes)
                    return None
            if len(content or b"") != node.size:  # (its reading raises it)
                self._content = content
                return None
        enc = encode(self.version, node.path, ino, content, node.uid, node.gid, node.mode,
                     node.atime_ns, node.mtime_ns, node.ctime_ns)
        if enc is None:
            self._content = content
            return None
        self.stats.records += enc[3]
        self.stats.data_bytes += node.size
        self._read += node.size
        return enc

    def _read_whole(self, node: Node) -> bytes | None:
        """The bytes of a small file the hashing threads did not keep, as :meth:`_new_data`
        reads them; None if it has holes (it sends only its data)."""
        fd = open_file(self.new.abspath(node.path))
        try:
            if data_segments(fd, node.size) != [(0, node.size)]:
                return None
            data = os.pread(fd, node.size, 0)
            if self._hasher is not None and self._hasher.uncache:
                uncache(fd)
            return data
        finally:
            os.close(fd)

    def _inode(
        self,
        node: Node,
        onode: Node | None,
        match: Match,
        ns: Namespace,
        old_by_digest: dict[bytes, int],
        new_by_digest: dict[bytes, int],
    ) -> Iterator[Record]:
        path = node.path
        is_link = node.fmt == 0o120000
        created = onode is None
        # xattrs other than capabilities (a created inode: the ACLs it inherited)
        old_x = ns.xattrs_before(node, onode)
        for xname in sorted(old_x):
            if xname not in node.xattrs:
                yield self._count(RemoveXattr(path=path, name=xname))
        for xname, value in sorted(node.xattrs.items()):
            if xname == CAPS:
                continue
            if old_x.get(xname) != value:
                yield self._count(SetXattr(path=path, name=xname, data=value))
        # data
        data_changed = False
        if node.is_reg and node.id not in match.unchanged:
            if created:
                data_changed = yield from self._new_data(node, path, old_by_digest, new_by_digest)
            else:
                assert onode is not None
                data_changed = yield from self._changed_data(node, onode, path)
        # ownership, mode, capabilities, times
        chowned = created or (onode is not None and (onode.uid, onode.gid) != (node.uid, node.gid))
        if chowned:
            yield self._count(Chown(path=path, uid=node.uid, gid=node.gid))
        perms = node.mode & 0o7777
        if not is_link and (
            created
            or (onode is not None and onode.mode & 0o7777 != perms)
            or (chowned and perms & 0o6000)
        ):
            yield self._count(Chmod(path=path, mode=perms))
        if (
            self.version >= 2
            and onode is not None
            and not is_link
            and onode.flags != node.flags
        ):
            yield self._count(Fileattr(path=path, fileattr=node.flags))
        caps = node.xattrs.get(CAPS)
        if caps is not None and (
            created or chowned or data_changed or (onode is not None and old_x.get(CAPS) != caps)
        ):
            yield self._count(SetXattr(path=path, name=CAPS, data=caps))
        key = match.n2o.get(node.id, -1 - node.id)
        if (
            created
            or data_changed
            or key in ns.touched
            or (onode is not None and onode.mtime_ns != node.mtime_ns)
        ):
            yield self._count(
                Utimes(
                    path=path,
                    atime=node.atime_ns,
                    mtime=node.mtime_ns,
                    ctime=node.ctime_ns,
                    otime=node.ctime_ns if self.version >= 2 else None,
                )
            )

    # -- data ----------------------------------------------------------------------------

    def _new_data(
        self,
        node: Node,
        path: bytes,
        old_by_digest: dict[bytes, int],
        new_by_digest: dict[bytes, int],
    ) -> Generator[Record, None, bool]:
        kept = self.changes.whole.get(node.id) if self.changes is not None else None
        # a small file the hashing threads read: its bytes, as they were hashed (taken
        # already where :meth:`_encoded` did not encode it)
        content, self._content = self._content, None
        if content is None and self._hasher is not None and kept is None:
            content = self._hasher.take(node)
        seed, c3 = (h.seed, h.content3) if (h := self._hasher) is not None else (None, True)
        # record mode: a file not hashed yet (no CLONE can stand for it) is hashed as sent
        later = node.segments is None and seed is not None and kept is None
        clone = None if later else self._find_clone(node, new_by_digest)
        if clone is not None:
            if clone.length > CLONE_MAX:  # (btrfs-progs' receive: its low 32 bits)
                from .clonecut import clones_of
                yield from map(self._count, clones_of(clone, node, self.new))
                return True
            yield self._count(clone)
            return True
        if self.virtual:  # (a small file's bytes, kept as hashed: not read again)
            writes, vclones, _holes = self._diff(node, None)
            yield from self._emit_blocks(node, path, writes, vclones,
                                         reader(-1, content) if content is not None else None)
            if not node.segments or sum(node.segments[-1]) < node.size:
                yield self._count(Truncate(path=path, size=node.size))
            return True
        new_abs = self.new.abspath(path)
        # a new file read whole while walking: its data ranges were kept, as they were read
        fd = open_file(new_abs) if kept is None and content is None else -1
        try:
            hasher = BlockHasher(seed, content3=c3, size=node.size) \
                if later and seed is not None else None
            data = (iter_data_segments if hasher else data_segments)(fd, node.size) if fd >= 0 \
                else [(0, node.size)] if kept is None else [(o, n) for o, n, _ in kept]
            segs = list(data) if hasher is None or h is None else \
                block_segments(data, node.size, segment_max(h.extent_max))  # (record's bound)
            end = segs[-1][0] + segs[-1][1] if segs else 0
            clones: list[tuple[int, int, Node, int]] = []
            source = self._similar_old_file(node)
            if source is not None:
                assert self.old is not None
                found, segs = self._shifted_clones(
                    self.old.abspath(source.path), new_abs, source.size, node.size, segs)
                clones = [(o, n, source, src) for o, n, src in found]
            spooled = self.changes.spooled(node.id, whole=True) if self.changes else None
            # a large file of a read-only snapshot, read once (hashed as sent): directly
            direct = DirectReader.open(fd, node.size, self._window) if hasher is not None and \
                not spooled and self._hasher is not None and self._hasher.extents else None
            try:
                yield from self._emit_ops(spooled or direct or reader(fd, content), node, path,
                                          segs, clones, hasher)
            finally:
                if direct is not None:
                    direct.close()
            if hasher is not None and h is not None:  # (the store's bound: as the threads')
                hashed_as_sent(fd, node, segs, hasher, self.chunk, extents=h.extents,
                               extent_max=h.extent_max)
            if direct is None and fd >= 0 and self._hasher is not None and self._hasher.uncache:
                uncache(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        if end < node.size:
            yield self._count(Truncate(path=path, size=node.size))
        return True

    def _block_index(self) -> BlockIndex:
        """Blocks of the old files whose data may have moved (record mode): files that
        changed or went away; a file's own old version is added where it is compared."""
        if self._index is None:
            self._index = BlockIndex()
            match, old = self._match, self.old
            if match is not None and old is not None:
                self._index.add_all(o for o in old.nodes.values() if o.is_reg and (
                    (nid := match.o2n.get(o.id)) is None or nid not in match.unchanged))
        return self._index

    def _emit_blocks(self, node: Node, path: bytes, writes: list[tuple[int, int]],
                     clones: list[tuple[int, int, Node, int]],
                     spooled: Callable[[int, int], bytes] | None = None) -> Iterator[Record]:
        """Writes (from ``spooled`` when the blocks were kept as they were read, else from
        the file: a read-only snapshot's then leaves the page cache) and clones, by offset."""
        if (writes or clones) and spooled is not None:
            yield from self._emit_ops(spooled, node, path, writes, clones)
        elif writes or clones:
            fd = self._hasher.opened_file(node) if self._hasher is not None else -1
            fd = fd if fd >= 0 else open_file(self.new.abspath(path))
            try:
                yield from self._emit_ops(reader(fd), node, path, writes, clones)
                if self._hasher is not None and self._hasher.uncache:
                    uncache(fd)
            finally:
                os.close(fd)

    def _emit_ops(
        self,
        read: Callable[[int, int], bytes],
        node: Node,
        path: bytes,
        writes: list[tuple[int, int]],
        clones: list[tuple[int, int, Node, int]],
        hasher: BlockHasher | None = None,
    ) -> Iterator[Record]:
        """Writes from the new file and clones from old files (``(offset, length, old node,
        old offset)``), by offset (``hasher``: fed the bytes written)."""
        ops: list[tuple[int, int, Node | None, int]] = [(o, n, None, 0) for o, n in writes]
        ops += clones
        for off, length, source, src in sorted(ops, key=lambda op: op[0]):
            if source is None:
                yield from self._write_range(read, path, off, length, node.size, hasher)
                continue
            clone_uuid, clone_ctransid = self.parent_ids()
            self.stats.cloned_bytes += length
            clone = Clone(off, length, path, clone_uuid, clone_ctransid, source.path, src)
            if length > CLONE_MAX:  # (btrfs-progs' receive: its low 32 bits)
                from .clonecut import cut_clone
                yield from map(self._count, cut_clone(clone))
                continue
            yield self._count(clone)

    def _changed_data(self, node: Node, onode: Node, path: bytes) -> Generator[Record, None, bool]:
        assert self.old is not None
        if self.virtual:
            writes, vclones, holes = self._diff(node, onode)
            yield from self._punch(path, holes)
            # a small file the hashing threads read: its bytes, as they were hashed
            kept = self._hasher.take(node) if self._hasher is not None else None
            yield from self._emit_blocks(node, path, writes, vclones,
                                         reader(-1, kept) if kept is not None else None)
            if onode.size != node.size:
                yield self._count(Truncate(path=path, size=node.size))
            return bool(writes or vclones or holes) or onode.size != node.size
        old_path = self.old.abspath(onode.path)
        new_abs = self.new.abspath(path)
        known = self.changes.diffs.get(node.id) if self.changes is not None else None
        spooled = None
        if known is not None and known[0] == onode.id:  # compared while walking
            writes, holes = known[1], known[2]
            spooled = self.changes.spooled(node.id) if self.changes is not None else None
        else:
            from .compare import changed_ranges  # (a parent's files: not at import)

            writes, holes = changed_ranges(old_path, new_abs, onode.size, node.size)
            self._read += node.size + onode.size
        changed = bool(writes or holes) or onode.size != node.size
        yield from self._punch(path, holes)
        clones: list[tuple[int, int, Node, int]] = []
        if self.shift_min and writes:
            found, writes = self._shifted_clones(
                old_path, new_abs, onode.size, node.size, writes)
            clones = [(o, n, onode, src) for o, n, src in found]
        yield from self._emit_blocks(node, path, writes, clones, spooled)
        if onode.size != node.size:
            yield self._count(Truncate(path=path, size=node.size))
        return changed

    def _punch(self, path: bytes, holes: list[tuple[int, int]]) -> Iterator[Record]:
        """Holes of the new file that were data in the old one: punched (v2+) or zeros."""
        for off, length in holes:
            if self.no_data:
                yield self._count(UpdateExtent(path=path, offset=off, size=length))
            elif self.version >= 2:
                yield self._count(Fallocate(path=path, mode=_PUNCH, offset=off, size=length))
            else:
                pos = off
                while pos < off + length:
                    n = min(self.chunk, off + length - pos)
                    yield self._count(Write(path=path, offset=pos, data=bytes(n)))
                    pos += n

    def _write_range(
        self, read: Callable[[int, int], bytes], path: bytes, off: int, length: int, size: int,
        hasher: BlockHasher | None = None,
    ) -> Iterator[Record]:
        if self.no_data:  # NO_FILE_DATA: the range, not its bytes
            yield self._count(UpdateExtent(path=path, offset=off, size=length))
            return
        end = off + length
        pos = off
        while pos < end:
            n = min(self.chunk, end - pos)
            buf = read(n, pos)
            if len(buf) != n:
                raise BtrdeltaError("file changed while sending (short read)", path=path)
            if hasher is not None:
                hasher.update(pos, buf)
            self._read += n
            enc = self._encode(path, pos, buf, size) if self._compress is not None else None
            if enc is not None:
                yield self._count(enc)
            else:
                self.stats.data_bytes += n
                yield self._count(Write(path=path, offset=pos, data=memoryview(buf)))
            pos += n

    def _encode(self, path: bytes, pos: int, buf: bytes, size: int) -> EncodedWrite | None:
        assert self._compress is not None
        enc = encode_piece(self._compress, self._compression, path, pos, buf, size)
        if enc is not None:
            self.stats.data_bytes += len(enc.data)
        return enc
