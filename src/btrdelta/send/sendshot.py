"""Sends that record a sendshot, and incremental sends against one (no old tree needed).

:func:`send_with_sendshots` is the whole job of ``btrdelta send SOURCE --record`` and
``--from-sendshot ID``: freeze the source (:func:`~.live.frozen`: a temporary read-only
snapshot of a live btrfs subvolume, deleted afterwards), load the base record, scan the
snapshot (on btrfs, against a record of an earlier snapshot of the same subvolume, only the
inodes written since are visited: :mod:`~.rescan`; everything else is taken from the record
and neither stat'ed nor read; elsewhere the tree is walked and every file read once for its
block digests), match and emit with the record as the old side (:class:`~.emit.Sender` with
``old_record``), and after the last byte was written store the new record (a patched one
is written and ``fsync``-ed by a thread while the stream is sent, and named at the end).

The stream names the identities a receiver knows: the snapshot's UUID (its received UUID if
it has one) and ctransid, as ``btrfs send`` would, and the base record's stream UUID as the
parent, so kernel-made and btrdelta-made streams alternate on one receiver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

from .. import TYPE_CHECKING
from .._value import Value
from ..errors import BtrdeltaError, MissingBaseError, StreamFormatError
from ..fs.btrfs import changed_inodes, largest_item
from ..stream.records import Record
from ..tree.chain import View
from ..tree.sendshot import PATCH_WRITTEN, VERSION, Patch, SendshotHead
from .emit import Sender
from .extents import EXTENT_MIN, Planned, plan_changed
from .hashing import direct_buffer
from .live import Frozen, frozen, subvolume_uuid
from .onepass import SentWhole
from .record import record_inodes, stamp_generations, tree_from_record
from .rescan import Changes, Stale, rescan, usable
from .scan import Tree, TreeScan, inode_order
from .store import SendshotStore, StoredSendshot
from .values import SendStats, StreamIds

if TYPE_CHECKING:
    from typing import Any

    from ..stream.writer import Encoded
    from .walk import ScanStream

__all__ = ["Preloaded", "SendshotResult", "adopt", "load_base", "send_with_sendshots"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: at most this many files read in parts are left open for the stream (the others are
#: opened again; 1,024 descriptors is a common limit)
_KEEP_OPEN = 256


class SendshotResult(Value):
    """What :func:`send_with_sendshots` did."""

    #: the new record (None without ``record``)
    recorded: StoredSendshot | None
    #: the base record (None for a full stream)
    base: StoredSendshot | None
    stream_uuid: str
    parent_uuid: str | None
    #: files whose digests came from the base record (not read)
    reused: int
    stats: SendStats
    #: the live-tree warning, or ""
    warning: str = ""


def load_base(store: SendshotStore, ident: str, source: bytes, lineage: object,
              candidates: Any = None, damaged: list[str] | None = None,
              found: Callable[[StoredSendshot], object] | None = None
              ) -> tuple[StoredSendshot, View]:
    """The record ``ident`` (``latest``: the newest of this source) and its columns, checked
    whole against the digest that names it (a patch record's with its chain of bases:
    :meth:`~.store.SendshotStore.view`).

    With ``latest``, a record that cannot be read whole (a power cut before the disk had it:
    ``send --record`` does not wait for it; or a base of it missing or damaged) is absent:
    the newest one that can is used, and a line saying so is added to ``damaged``.
    ``found`` is called with each record chosen (its head read) before its columns are read.

    Raises:
        MissingBaseError: no such record (``latest``: none that can be read).
        StreamFormatError: the record ``ident`` is damaged.
    """
    def mine(s: StoredSendshot) -> bool:
        return (lineage is not None and s.head.subvol_uuid == lineage) or \
            s.head.source == source

    if ident != "latest":
        rec = store.resolve(ident, lineage=mine, candidates=candidates)
        if found is not None:
            found(rec)
        return rec, store.view(rec)
    skipped: set[str] = set()
    first: StreamFormatError | None = None
    while True:
        try:
            rec = store.resolve(ident, lineage=lambda s: mine(s) and s.digest not in skipped,
                                candidates=candidates)
        except MissingBaseError:
            if first is not None:
                raise first from None
            raise
        if found is not None:
            found(rec)
        try:
            cols = store.view(rec)
        except StreamFormatError as exc:
            first = first or exc
            skipped.add(rec.digest)
            if damaged is not None:
                damaged.append(f"sendshot {rec.digest[:12]} cannot be read ({exc}): "
                               "an older one is used")
            continue
        if damaged is not None:  # (newer records whose very head is gone: not listed)
            damaged.extend(f"sendshot {d[:12]} cannot be read ({why}): an older one is used"
                           for d, why in store.newer_unreadable(rec))
        return rec, cols


class Preloaded:
    """What a live send does while the kernel makes its snapshot (a transaction commit:
    6-15 ms that the CLI's thread otherwise waits for, :func:`~.live.frozen`): :meth:`load`
    (its ``meanwhile``: the base record, as :func:`load_base`, for the snapshot's lineage)
    and :meth:`sweep` (its ``made``, in the snapshot's thread: the change sweep since the
    base's generation, when the base was chosen by then). :func:`send_with_sendshots`
    takes both where the frozen tree has that lineage; where no base is found or it cannot
    be read, the send looks again and says why."""

    def __init__(self, store: SendshotStore, ident: str,
                 source: str | bytes | os.PathLike[str]) -> None:
        self.store, self.ident = store, ident
        self.source = os.path.abspath(os.fsencode(source))
        #: (the lineage it was chosen for, the base, its columns), once loaded
        self.loaded: tuple[object, StoredSendshot, View] | None = None
        #: :func:`load_base`'s lines about the newer records it passed over
        self.damaged: list[str] = []
        #: the generation of the first record chosen, and the sweep since it
        self.since: list[int] = []
        self.swept: _Sweep | None = None

    def load(self, lineage: object) -> None:
        if lineage is None:
            return  # (no snapshot is made: the send loads it, the sweep beside it)
        try:
            base, cols = load_base(self.store, self.ident, self.source, lineage,
                                   damaged=self.damaged,
                                   found=lambda rec: self.since.append(rec.head.generation))
        except (BtrdeltaError, OSError):
            return
        self.loaded = (lineage, base, cols)

    def sweep(self, snapshot: bytes) -> None:
        if self.since:  # (else the snapshot was made first: the send sweeps)
            swept = _Sweep(self.since[0])
            swept.run(snapshot)
            self.swept = swept


class _Sweep:
    """The change sweep (:func:`~..fs.btrfs.changed_inodes`) of a snapshot since a record's
    generation, run by a thread while the record is read: the sweep is ioctls (the kernel
    walks the tree blocks written since; the GIL is released), the record's reading is
    mostly decompression and checks, so on two cores the one hides the other (the
    in-place round of the sendshot benchmark: a ~2.5 ms sweep, a ~4.5 ms record).
    :meth:`result` waits for it and raises what the sweep raised (``PermissionError``: not
    root)."""

    def __init__(self, since: int) -> None:
        self.since = since
        self._got: dict[int, tuple[int, int, int]] | None = None
        #: the inodes with file extent items written since (:func:`~.rescan.loud`)
        self.written: set[int] = set()
        self._error: BaseException | None = None
        self._thread: Any = None

    def start(self, path: bytes) -> _Sweep:
        """:meth:`run` in a thread of its own."""
        import threading

        self._thread = threading.Thread(target=self.run, args=(path,), name="btrdelta-sweep",
                                        daemon=True)
        self._thread.start()
        return self

    def run(self, path: bytes) -> None:
        """Sweep the snapshot at ``path`` (what it raises is :meth:`result`'s)."""
        try:
            fd = os.open(path, _DIR)
            try:
                self._got = changed_inodes(fd, self.since, written=self.written)
            finally:
                os.close(fd)
        except BaseException as exc:  # raised in the caller's thread by result()
            self._error = exc

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[int, tuple[int, int, int]]:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._got is not None
        return self._got


def _load_swept(store: SendshotStore, ident: str | None, src: bytes, fz: Frozen,
                candidates: Any, damaged: list[str], preloaded: Preloaded | None = None
                ) -> tuple[StoredSendshot | None, View | None, _Sweep | None]:
    """:func:`load_base` (``ident`` None: no base; ``preloaded``: its result already, if of
    ``fz``'s lineage), and the change sweep since the first record chosen, started once its
    head is read where :func:`_scan` will use it (:class:`_Sweep`; :func:`_scan` joins it,
    and sweeps again when another record was used: the chosen one was damaged)."""
    if ident is None:
        return None, None, None
    sweeps: list[_Sweep] = []

    def sweep(rec: StoredSendshot) -> None:
        if not sweeps and fz.info is not None and \
                usable(rec.head, fz.lineage, fz.generation, fz.info.readonly):
            sweeps.append(_Sweep(rec.head.generation).start(fz.path))

    if preloaded is not None and preloaded.loaded is not None and \
            preloaded.loaded[0] == fz.lineage:
        _lineage, base, cols = preloaded.loaded
        swept = preloaded.swept
        if swept is not None and fz.info is not None and \
                usable(base.head, fz.lineage, fz.generation, fz.info.readonly):
            sweeps.append(swept)  # (made in the snapshot's thread, of fz.path)
        sweep(base)
        damaged += preloaded.damaged
        return base, cols, sweeps[0] if sweeps else None
    try:
        base, cols = load_base(store, ident, src, fz.lineage, candidates, damaged, sweep)
    except BaseException:
        for started in sweeps:
            started.join()
        raise
    return base, cols, sweeps[0] if sweeps else None


def _stamp(fz: Frozen, extents: bool = False) -> Callable[[Tree], None]:
    """Give every inode of a fully scanned tree its btrfs generation and transid (root);
    ``extents``: and its smaller files their extent items (a tree hashed already, from a
    read-only snapshot: :func:`~.record.stamp_generations`)."""
    def prepare(tree: Tree) -> None:
        if fz.info is None:
            return
        fd = os.open(fz.path, _DIR)
        try:
            stamp_generations(tree, fd, extents and fz.info.readonly)
        except PermissionError:
            pass  # not root: the next send against this record reads every file
        finally:
            os.close(fd)

    return prepare


def _scan(fz: Frozen, base: StoredSendshot | None, cols: View | None,
          seed: int, scanned: ScanStream | None = None, sweep: _Sweep | None = None,
          extent_max: int | None = None) -> tuple[TreeScan, Tree | None, Changes | None]:
    """The new tree's scan, the old tree, and the changes when only they were visited.

    On btrfs, against a record of an earlier snapshot of the same subvolume, only what
    changed since is visited and sent (:func:`_changes`: both trees are then the changed
    part); otherwise the tree is walked whole and every file read, against the whole record.
    A full stream on btrfs (its UUID the subvolume's) starts at once and goes on while the
    tree is walked (:class:`~.walk.ScanStream`: ``scanned``, a walk started already, or one
    started here), its files hashed as the walk finds them, in the order they are sent.
    ``sweep``: the change sweep since ``base``, started already (joined before this returns:
    the snapshot may be deleted after). ``extent_max``: the store's bound on a file's
    extent items (past it cut to cells as they are searched).
    """
    try:
        return _scan_with(fz, base, cols, seed, scanned, sweep, extent_max)
    finally:
        if sweep is not None:
            sweep.join()


def _scan_with(fz: Frozen, base: StoredSendshot | None, cols: View | None, seed: int,
               scanned: ScanStream | None, sweep: _Sweep | None,
               extent_max: int | None = None) -> tuple[TreeScan, Tree | None, Changes | None]:
    # a record's digests are compared with the base's: of the base's kind (a version 3
    # base's lineage keeps BLAKE3 of the whole content until a full send or an adoption)
    content3 = base is None or base.head.content3
    if scanned is not None and (base is not None or fz.info is None):
        scanned.close()  # (not a full stream on btrfs: walked again below)
        scanned = None
    if fz.info is not None and base is not None and cols is not None and \
            usable(base.head, fz.lineage, fz.generation, fz.info.readonly):
        got = _changes(fz, base, cols, seed,
                       sweep if sweep is not None and sweep.since == base.head.generation
                       else None, content3, extent_max)
        if got is not None:
            return got[0], got[1].old, got[1]
    old = tree_from_record(cols.rows(), base.head, base.path) \
        if cols is not None and base is not None else None
    extents = fz.info is not None and fz.info.readonly
    if base is None and fz.info is not None:
        # its inodes' generations (only its record's) are read after it (send_with_sendshots)
        scan = TreeScan(fz.path, None, seed=seed, extents=extents, stream=scanned or True,
                        hash_as_sent=SentWhole(fz.path), content3=content3)
        scan.hasher.extent_max = extent_max
        return scan, None, None
    # a full stream of a plain directory (its UUID the content's) is hashed before it starts
    order = inode_order if base is None else None
    scan = TreeScan(fz.path, None, seed=seed, prepare=_stamp(fz) if base is not None else None,
                    extents=extents, order=order, content3=content3)
    scan.hasher.extent_max = extent_max
    return scan, old, None


def _changes(fz: Frozen, base: StoredSendshot, cols: View, seed: int,
             sweep: _Sweep | None = None, content3: bool = True, extent_max: int | None = None
             ) -> tuple[TreeScan, Changes] | None:
    """The changes since ``base`` (:func:`~.rescan.rescan`; ``sweep``: its change sweep,
    started already) and the scan holding them, or None when they cannot be found (not
    root, or the record disagrees with the tree). The changed files are hashed first: a new
    file may be a copy of an unchanged one, which then joins the trees (a ``CLONE``); the
    sender finds them hashed."""
    fd = os.open(fz.path, _DIR)
    try:
        if sweep is not None:
            changed, written = sweep.result(), sweep.written
        else:
            written = set()
            changed = changed_inodes(fd, base.head.generation, written=written)
        changes = rescan(cols, fz.path, fd, changed, written)
    except (PermissionError, Stale):
        return None
    finally:
        os.close(fd)
    # large files read only where their extents changed (the rest: the record's digests);
    # they stay open for the stream, which reads their changed blocks again
    opened: dict[int, int] = {}
    try:
        read = _hash_in_parts(changes, fz.path, seed, opened, extent_max)
    except BaseException:
        _close_all(opened)
        raise
    # a few MiB are hashed as fast in this thread as by a pool (not even started)
    small = sum(n.size for n in changes.to_hash.nodes.values()
                if n.segments is None) < (8 << 20)
    # the bytes of new files are kept for the stream (sent whole); changed ones are read
    # into one buffer and the stream reads the blocks that changed again: fresh memory for
    # every file read cost more (5.5 MiB of changed files: ~1,400 page faults) than that
    scan = TreeScan(fz.path, seed=seed, new_tree=changes.to_hash, workers=1 if small else None,
                    extents=True, keep=changes.sent_whole, content3=content3)
    scan.hasher.read_before = read
    scan.hasher.opened = opened
    scan.hasher.keep_open = _KEEP_OPEN
    scan.hasher.extent_min = EXTENT_MIN  # (a few files: a search each, as a full send records)
    scan.hasher.extent_max = extent_max
    # (a small change's pages stay cached: dropping them file by file costs more than the
    # snapshot's deletion takes to drop a few MiB)
    scan.hasher.uncache = not small
    try:
        scan.hasher.wait()
        changes.build()
    except Stale:
        scan.close()
        scan.hasher.close_files()
        return None
    except BaseException:
        scan.close()
        scan.hasher.close_files()
        raise
    scan.new = changes.new
    return scan, changes


def _close_all(opened: dict[int, int]) -> None:
    while opened:
        os.close(opened.popitem()[1])


def _hash_in_parts(changes: Changes, root: bytes, seed: int,
                   opened: dict[int, int] | None = None, extent_max: int | None = None) -> int:
    """Hash the changed files whose record keeps their extent items where those changed
    (:func:`~.extents.plan_changed`); the others are left to the hasher. Bytes read. Every
    file's reads are planned (asked of the device) before the first is made: the files of a
    new snapshot are not in the page cache, and one read after another each waited for the
    device (~30 µs a file). ``opened``: the files read are left open there (by ``id`` of
    their node, up to :data:`_KEEP_OPEN`), for the stream (each open and close of a file
    of a new snapshot, by path, ~15 µs). ``extent_max``: the store's bound (the items of a
    file past it are cut to cells as they are searched)."""
    plans: list[Planned] = []
    item_max = 0  # (the filesystem's largest item, asked once)
    try:
        for node in changes.to_hash.nodes.values():
            if node.size < EXTENT_MIN:
                continue
            old = changes.recorded(node)
            if old is None or old.extents is None:
                continue
            if not item_max:
                fd = os.open(root, _DIR)
                try:
                    item_max = largest_item(fd)
                finally:
                    os.close(fd)
            planned = plan_changed(node, root + b"/" + node.path, old, item_max, extent_max)
            if planned is not None:
                plans.append(planned)
        if not plans:
            return 0
        buf = direct_buffer()  # (a mapping: only the pages the reads fill are touched)
        read = 0
        for planned in plans:
            keep = opened is not None and len(opened) < _KEEP_OPEN
            read += planned.read(seed, buf, keep)
            if keep:
                opened[id(planned.node)] = planned.detach()  # type: ignore[index]
        return read
    finally:
        for planned in plans:
            planned.close()


def send_with_sendshots(
    write: Callable[[Any], object],
    source: str | bytes | os.PathLike[str],
    *,
    store: SendshotStore,
    from_sendshot: str | None = None,
    record: bool = True,
    candidates: Any = None,
    snapshot: bool = True,
    version: int = 1,
    compress: str | None = None,
    name: bytes | None = None,
    on_progress: Callable[[SendStats], None] | None = None,
    on_stream: Callable[[Sender], None] | None = None,
    inflight: Callable[[Frozen], None] | None = None,
    on_record: Callable[[Record | Encoded], None] | None = None,
    source_name: bytes | None = None,
    durable: bool = True,
    scanned: ScanStream | None = None,
    tree: Frozen | None = None,
    preloaded: Preloaded | None = None,
) -> SendshotResult:
    """Send ``source`` (full, or against the sendshot ``from_sendshot``) to ``write``.

    Args:
        write: where the stream's bytes go.
        source: a btrfs subvolume (live or read-only) or any directory.
        store: the sendshot store.
        from_sendshot: a record id, a unique prefix, or ``latest`` (the newest record of this
            source: same subvolume lineage on btrfs, same path elsewhere); None: full.
        record: store a record of what was sent (after the stream's last byte).
        candidates: with ``latest``, only these digests count (what a receiver holds).
        snapshot: snapshot a live btrfs subvolume (False: read it live).
        version, compress, name: as :class:`~.emit.Sender` (name: default the source's name).
        on_progress: progress callback.
        on_stream: called with the sender before the first record (its header is known).
        inflight: called with the frozen tree once the stream is complete (before its deletion).
        on_record: called after each record (or :data:`~..stream.writer.Encoded`) was written.
        source_name: the path to record (default ``source``; the live path, for a caller
            that froze it).
        durable: ``fsync`` the new record before naming it (``docs/formats/sendshot.md`` §4).
        scanned: a walk of ``source`` started already (:class:`~.walk.ScanStream`).
        tree: ``source`` frozen already (:func:`~.live.frozen`, by a caller that imported
            the send's modules while its snapshot was made); ``snapshot`` is not used.
        preloaded: the base, and the sweep, made while ``tree``'s snapshot was made
            (:class:`Preloaded`; with ``candidates`` None), used where ``tree`` has its
            lineage.

    Raises:
        MissingBaseError: no such sendshot.
        BtrdeltaError: the source cannot be read.
    """
    path = os.path.abspath(os.fsencode(source))
    src = os.path.abspath(source_name) if source_name is not None else path
    stream_name = name or os.path.basename(src) or b"subvol"
    with nullcontext(tree) if tree is not None else frozen(path, snapshot=snapshot) as fz:
        damaged: list[str] = []
        base, cols, sweep = _load_swept(store, from_sendshot, src, fz, candidates, damaged,
                                        preloaded)
        seed = base.head.seed if base is not None else store.seed()
        scan, old, changes = _scan(fz, base, cols, seed, scanned, sweep, store.extent_max)
        try:
            ids, sender = _sender(fz, base, src, scan, old, version=version, compress=compress,
                                  name=stream_name, on_progress=on_progress)
            if on_stream is not None:
                on_stream(sender)
            head = partial(_head, sender, fz, base, src, stream_name, seed)
            stored = _stream_and_record(sender, write, version, on_record, store, head,
                                        changes, record, durable,
                                        _stamp(fz, True) if base is None else None)
        finally:
            scan.hasher.close_files()  # (the files the stream did not read)
        if inflight is not None:
            inflight(fz)
        return SendshotResult(
            recorded=stored, base=base, stream_uuid=str(sender.new_ids()[0]),
            parent_uuid=str(ids.parent_uuid) if ids.parent_uuid else None,
            reused=changes.reused if changes is not None else 0, stats=sender.stats,
            warning="; ".join(filter(None, [fz.warning, *damaged])),
        )


def _sender(fz: Frozen, base: StoredSendshot | None, src: bytes, scan: TreeScan,
            old: Tree | None, **options: Any) -> tuple[StreamIds, Sender]:
    """The stream's identities and its :class:`~.emit.Sender` (``options``: its own)."""
    ids = StreamIds(
        uuid=fz.stream_uuid, ctransid=fz.info.ctransid if fz.info is not None else 0,
        parent_uuid=base.head.stream_uuid if base is not None else None,
        parent_ctransid=base.head.stream_ctransid if base is not None else 0,
    )
    same_tree = base is not None and (
        base.head.subvol_uuid == fz.lineage if fz.lineage is not None
        else base.head.source == src and base.head.kind == "sent")
    # a record `sendshot create` made describes the sender's tree: a receiver that got it
    # by the kernel's `btrfs send -p` can hold another root mtime (a directory removed
    # through an orphan name in the root, and no UTIMES of the root after it): sent once
    sender = Sender(fz.path, None, scan=scan, old_record=old, ids=ids, identities=same_tree,
                    **options)
    sender.root_times = base is not None and base.head.kind == "adopted"
    return ids, sender


def _stream_and_record(sender: Sender, write: Callable[[Any], object], version: int,
                       on_record: Callable[[Record | Encoded], None] | None, store: SendshotStore,
                       head: Callable[[Changes | None, Any], SendshotHead],
                       changes: Changes | None,
                       record: bool, durable: bool,
                       stamp: Callable[[Tree], None] | None = None) -> StoredSendshot | None:
    """Write the stream, then (``record``) store its record. The record of a change sweep is
    known before the stream: it is written (``durable``: and ``fsync``-ed) by a thread while
    the stream is sent, and named after its last byte (nothing is named for a stream that
    did not end). ``stamp``: gives a full stream's tree its inode generations (and its smaller
    files their extent items) before its record is made (a sweep of every inode: 11-14 ms of
    CPU for Debian's ``/usr``, after the stream rather than before its first byte)."""
    encoded = changes.record(store.extent_max) if record and changes is not None else None
    pending = store.begin(head(changes, encoded), encoded, durable=durable) \
        if encoded is not None else None
    try:
        _write_stream(sender, write, version, on_record)
    except BaseException:
        if pending is not None:
            pending.abort()
        raise
    if pending is not None:
        return pending.commit()
    if not record:
        return None
    if stamp is not None:
        stamp(sender.new)
    return store.save(head(None, None), record_inodes(sender.new, store.extent_max),
                      durable=durable)


def _write_stream(sender: Sender, write: Callable[[Any], object], version: int,
                  on_record: Callable[[Record | Encoded], None] | None) -> None:
    from ..stream.writer import StreamWriter

    writer = StreamWriter(write, version)
    records = sender.encoded_records()
    put, put_encoded = writer.write, writer.write_encoded
    try:
        for rec in records:
            if isinstance(rec, tuple):  # (a created inode's records, encoded at once)
                put_encoded(rec)
            else:
                put(rec)
            if on_record is not None:
                on_record(rec)
    finally:
        records.close()  # (a write that failed: the walk and the hashing threads stop now)


def _head(sender: Sender, fz: Frozen, base: StoredSendshot | None, src: bytes, name: bytes,
          seed: int, changes: Changes | None, encoded: Any) -> SendshotHead:
    """The head of the record of what ``sender`` sends: the base record patched with the
    changes (``encoded``: a patch record of it, or the whole record), or the whole tree
    scanned. A patched record has no tree identity (the stream named the snapshot's UUID,
    not one derived from the tree)."""
    uuid, ctransid = sender.new_ids()
    patch = isinstance(encoded, Patch) and base is not None
    return SendshotHead(
        stream_uuid=uuid, stream_ctransid=ctransid, name=name, created_ns=time.time_ns(),
        kind="sent", subvol_uuid=fz.lineage, parent=base.digest if base is not None else None,
        source=src, generation=fz.generation, seed=seed,
        tree_digest=b"" if changes is not None else sender.new.identity(),
        version=PATCH_WRITTEN if patch else VERSION if base is None or base.head.content3 else 3,
        base=(encoded.base or base.digest) if patch and base is not None else None,
    )


def adopt(store: SendshotStore, path: str | bytes | os.PathLike[str], *,
          uuid: Any = None, ctransid: int | None = None, name: bytes | None = None,
          source: str | bytes | os.PathLike[str] | None = None,
          on_entry: Callable[[int, int], None] | None = None,
          on_bytes: Callable[[int], None] | None = None) -> StoredSendshot:
    """Record a tree the receiver already holds (``sendshot create``) without sending it.

    Its identity is the one a receiver knows it by: a btrfs subvolume's received UUID and
    stransid when it was received (the receiver's own copy, or the sender's snapshot that
    the kernel sent), else its UUID and ctransid; a plain directory gets the UUID
    ``btrdelta send`` derives from its content. ``uuid``/``ctransid`` override.
    ``source``: the sender's source this tree is a copy of (``--from-sendshot latest`` of
    that source then finds it; default: ``path`` itself). A read-only snapshot of the
    subvolume the next sends read (``source`` omitted, or naming that subvolume) is recorded
    as a send of it would be (its generation and large files' extent items): the next send
    finds what changed since without reading the unchanged files. Progress: the walk's
    ``on_entry(files, bytes)`` (every 256 entries), then the hashing's ``on_bytes(read)``.
    """
    src = os.path.abspath(os.fsencode(path))
    with frozen(src, snapshot=False) as fz:
        # a snapshot of the subvolume later sends read (no --source, or --source naming
        # the subvolume it was taken of) is compared by the change sweep, and its large
        # files' extents recorded, as a record that btrdelta sent; another tree is not
        lineage = fz.lineage if source is None or (
            fz.lineage is not None and subvolume_uuid(source) == fz.lineage) else None
        seed = store.seed()
        scan = TreeScan(fz.path, None, seed=seed, prepare=_stamp(fz), on_entry=on_entry,
                        extents=lineage is not None and fz.info is not None
                        and fz.info.readonly)
        scan.hasher.extent_max = store.extent_max
        try:
            scan.hasher.wait(on_bytes)
            tree = scan.new
        finally:
            scan.close()
        info = fz.info
        if uuid is None:
            if info is not None and info.received_uuid is not None:
                uuid, stamp = info.received_uuid, info.stransid
            elif info is not None:
                uuid, stamp = info.uuid, info.ctransid
            else:
                uuid, stamp = tree.subvol_uuid(), tree.ctransid()
        else:
            stamp = 0
        if ctransid is not None:
            stamp = ctransid
        if fz.warning and info is not None:
            raise BtrdeltaError("sendshot create needs a read-only subvolume (or a directory "
                                "that is not a subvolume)", path=src)
        head = SendshotHead(
            stream_uuid=uuid, stream_ctransid=stamp,
            name=name or os.path.basename(src) or b"subvol", created_ns=time.time_ns(),
            kind="adopted", subvol_uuid=lineage,
            source=src if source is None else os.path.abspath(os.fsencode(source)),
            generation=fz.generation if lineage is not None else 0,
            seed=seed, tree_digest=tree.identity(),
        )
        return store.save(head, record_inodes(tree, store.extent_max))
