"""The sendshot store: a directory of records, the receivers' cursors, and retention.

Layout (``docs/formats/sendshot.md``)::

    STORE/records/<digest>.sendshot   one record, named by the BLAKE3-256 of its content
    STORE/cursors.json                {"version": 1, "receivers": {ID: {"digest": ...,
                                      "sources": {SOURCE: digest, ...}, ...}}}
    STORE/seed                        the block-digest seed of this store (hex, 0600)
    STORE/heads                       a cache of the records' heads (:data:`_HEADS`)
    STORE/.lock                       flock(2) while the store is changed

Records are written to a temporary file (``O_EXCL``) and renamed to their name. A *durable*
one (:meth:`SendshotStore.save`, :meth:`~SendshotStore.begin`: the default; ``replicate``)
is ``fsync``-ed before it is named, so after a power cut its name never shows an incomplete
record; ``btrdelta send --record`` does not wait for the disk (a power cut in the next
seconds can leave the newest record missing or damaged, which ``--from-sendshot latest``
treats as absent: ``docs/formats/sendshot.md`` §4). A *cursor* says which sendshot a
receiver holds (what the next incremental is sent against); :meth:`SendshotStore.prune`
never deletes a sendshot a cursor names, nor one an in-flight replication needs.

Retention (:func:`plan_prune`, pure): keep the newest N, or a time grid such as
``1h:24,1d:7,1w:4`` (the newest sendshot in each of the last 24 hours, 7 days and 4 weeks,
as btrbk's and zrepl's grids), always keeping the newest one and every one a receiver needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator

from .. import TYPE_CHECKING
from .._defaults import DEFAULT_STORE
from .._value import Value, field
from ..errors import BtrdeltaError, MissingBaseError, StreamFormatError
from ..fs.atomic import fsync_dir, naming, pid_alive, write_atomic
from ..tree.early import RECORDS
from ..tree.early import SUFFIX as _SUFFIX
from ..tree.sendshot import (
    RecordInode,
    RecordReader,
    SendshotHead,
    decode_head,
    encode_head,
    read_head,
    write_record,
)

if TYPE_CHECKING:
    from typing import Any

    from ..tree.chain import View
    from ..tree.columns import Encoded
    from ..tree.sendshot import Patch

__all__ = [
    "DEFAULT_STORE",
    "PendingRecord",
    "SendshotStore",
    "StoredSendshot",
    "parse_grid",
    "plan_prune",
]

#: the head cache: each record's head (:func:`~..tree.sendshot.encode_head`) with the size,
#: mtime and inode its file had. Listing a store read every record's head from its start
#: (a zstd context and window each: ~0.25 ms a record, the first ~0.6 ms), and a store
#: gains a record per ``send --record``; a record's name is its content's digest, so an
#: entry whose file still has that size, mtime and inode is that record's head. Written
#: (not ``fsync``-ed: a cache) by a listing that had to read a head and by a new record;
#: damaged, stale or missing entries are read from the records again. The base of a send
#: is read whole and checked against its name, and its head against the one listed.
_HEADS = "heads"
_HEADS_MAGIC = b"btrdelta sendshot heads 2\n"  # (1: without the record's version)
#: an entry: digest (hex), size, mtime (ns), inode, length of the head's bytes that follow
_ENTRY = struct.Struct("<64sQqQI")
_BLAKE3 = 32
#: the most patch records read on the way to a chain's whole record (writers compact a
#: chain at :data:`~..tree.chain.MAX_DEPTH`)
_MAX_CHAIN = 64
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def _is_ident(name: str) -> bool:
    """``name`` is 4 to 64 lowercase hex digits (a record's digest, or a prefix of one;
    no ``re`` pattern compiled on the send path for this)."""
    return 4 <= len(name) <= 64 and not name.strip("0123456789abcdef")


class StoredSendshot(Value):
    """One record of a store."""

    digest: str
    head: SendshotHead
    size: int
    path: str
    #: receivers whose cursor names it
    held_by: list[str] = field(default_factory=list)

    @property
    def created(self) -> float:
        """Creation time (seconds since the epoch)."""
        return self.head.created_ns / 1e9

    def to_json(self) -> dict[str, Any]:
        """The fields ``sendshot list/show --json`` print."""
        h = self.head
        return {
            "id": self.digest, "created": round(self.created, 3), "kind": h.kind,
            "name": os.fsdecode(h.name), "source": os.fsdecode(h.source),
            "stream_uuid": str(h.stream_uuid), "stream_ctransid": h.stream_ctransid,
            "subvol_uuid": str(h.subvol_uuid) if h.subvol_uuid else None,
            "parent": h.parent, "base": h.base, "generation": h.generation,
            "bytes": self.size,
            "held_by": self.held_by,
        }


def _read_seed(path: str) -> str:
    """The seed file's text, stripped ("" when there is none)."""
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return f.read().strip()
    return ""


class SendshotStore:
    """A sendshot store directory (made on first write).

    Args:
        path: the store's directory.
        extent_max: the most bytes of a file's extent items the records written keep as
            they are, more as cells (:func:`~.extents.bounded`); None: ``EXTENT_MAX``.
    """

    def __init__(self, path: str | os.PathLike[str], extent_max: int | None = None) -> None:
        self.path = os.fspath(path)
        self.extent_max = extent_max
        self.records = os.path.join(self.path, RECORDS)
        #: records whose head could not be read at the last listing: digest -> (why, the
        #: file's mtime in ns); listed apart (``sendshot list``), deletable by id
        self.unreadable: dict[str, tuple[str, int]] = {}
        #: the records of the last listing, by digest: a chain's bases are taken from it
        #: (:meth:`view`), their heads not read from their files again
        self._listed: dict[str, StoredSendshot] = {}
        #: the records :meth:`view` read last, decoded, by digest (:meth:`keep_decoded`)
        self._decoded: dict[str, Any] | None = None

    def keep_decoded(self) -> None:
        """Keep the records :meth:`view` reads decoded in memory (those of its last chain:
        the whole record and its patches), for a process that sends round after round
        (``replicate --every``): the next round's base is a patch on the last one's, and
        only that new record is read then (the rest were checked against their digests
        when read; a record's content is what its name says, and a record whose file is
        gone is read, and missing, as without this)."""
        self._decoded = {}

    # -- locking and files ------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (writers exclude each other)."""
        os.makedirs(self.records, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def seed(self) -> int:
        """The store's block-digest seed (made once, kept in ``STORE/seed``, written whole:
        one a full disk cut was left empty and failed every run after it)."""
        p = os.path.join(self.path, "seed")
        text = _read_seed(p)
        if not text:  # none yet, or the empty one of a cut write: no record used it
            with self.locked():
                if not (text := _read_seed(p)):  # (os.urandom, as secrets does: importing
                    # secrets, hashlib with it, took 5 ms of a first replication's start)
                    text = f"{int.from_bytes(os.urandom(8), 'big') >> 1:016x}"
                    write_atomic(p, f"{text}\n".encode(), mode=0o600)
        try:
            return int(text, 16)
        except ValueError:
            raise StreamFormatError("damaged seed file: not a hexadecimal number",
                                    source=p) from None

    def save(self, head: SendshotHead, inodes: Iterable[RecordInode] | Encoded | Patch, *,
             durable: bool = True) -> StoredSendshot:
        """Write a record (temporary file, then its digest name); returns it. ``inodes``:
        every inode, or the columns already encoded. ``durable``: ``fsync`` it before it
        is named (False: named once written; the disk is not waited for)."""
        tmp = self._temporary()
        try:
            digest = _write_record(tmp, head, inodes, durable)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self._publish(tmp, digest, head, durable)

    def begin(self, head: SendshotHead, encoded: Encoded | Patch, *, durable: bool = True
              ) -> PendingRecord:
        """:meth:`save` in a thread, named only when :meth:`PendingRecord.commit` says so:
        the record of a stream is encoded and written (``durable``: and ``fsync``-ed) while
        the stream is sent, and stored under its name after the stream's last byte."""
        return PendingRecord(self, head, encoded, durable)

    def _temporary(self) -> str:
        os.makedirs(self.records, mode=0o700, exist_ok=True)
        return os.path.join(self.records, f".tmp-{os.getpid()}-{os.urandom(4).hex()}")

    def _publish(self, tmp: str, digest: str, head: SendshotHead,
                 durable: bool) -> StoredSendshot:
        """Give the complete temporary record ``tmp`` its name (``durable``: and ``fsync``
        the directory, so that a cursor written after it never names a record a power cut
        took back)."""
        final = self._file(digest)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            fsync_dir(self.records)
        st = os.stat(final)
        entries = self._heads()  # (the next listing reads no head of its own)
        entries[digest] = (st.st_size, st.st_mtime_ns, st.st_ino, encode_head(head))
        self._write_heads(entries)
        return StoredSendshot(digest, head, st.st_size, final)

    def _file(self, digest: str) -> str:
        return os.path.join(self.records, digest + _SUFFIX)

    # -- reading -----------------------------------------------------------------------

    def records_list(self) -> list[StoredSendshot]:
        """Every record, oldest first (records that cannot be read are skipped)."""
        out: list[StoredSendshot] = []
        try:
            names = os.listdir(self.records)
        except FileNotFoundError:
            return out
        held: dict[str, list[str]] = {}
        if cursors := self.cursors():
            from .cursors import cursor_digests

            for rid, cur in cursors.items():
                for digest in cursor_digests(cur):
                    held.setdefault(digest, []).append(rid)
        cached = self._heads()
        entries: dict[str, tuple[int, int, int, bytes]] = {}
        self.unreadable = {}
        for name in names:
            if not name.endswith(_SUFFIX) or not _is_ident(name[: -len(_SUFFIX)]):
                continue
            p = os.path.join(self.records, name)
            digest = name[: -len(_SUFFIX)]
            mtime = 0
            try:
                st = os.stat(p)
                mtime = st.st_mtime_ns
                if not stat.S_ISREG(st.st_mode):  # (a FIFO: its open waited forever)
                    raise OSError("not a regular file")
                entry = cached.get(digest)
                if entry is not None and entry[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
                    head = decode_head(entry[3])
                else:
                    with open(p, "rb") as f:
                        head = read_head(f, source=p)
                    entry = (st.st_size, st.st_mtime_ns, st.st_ino, encode_head(head))
            except (OSError, BtrdeltaError) as exc:
                self.unreadable[digest] = (str(exc).replace(f"{p}: ", ""), mtime)
                continue
            entries[digest] = entry
            out.append(StoredSendshot(digest, head, st.st_size, p, sorted(held.get(digest, []))))
        if entries != cached:
            self._write_heads(entries)
        out.sort(key=lambda s: (s.head.created_ns, s.digest))
        self._listed = {s.digest: s for s in out}
        return out

    def _heads(self) -> dict[str, tuple[int, int, int, bytes]]:
        """The head cache's entries (:data:`_HEADS`): none when it is missing or damaged."""
        try:
            with open(os.path.join(self.path, _HEADS), "rb") as f:
                data = f.read(64 << 20)
        except OSError:
            return {}
        import blake3

        body, tag = data[:-_BLAKE3], data[-_BLAKE3:]
        if not body.startswith(_HEADS_MAGIC) or blake3.blake3(body).digest() != tag:
            return {}
        out: dict[str, tuple[int, int, int, bytes]] = {}
        pos = len(_HEADS_MAGIC)
        try:
            while pos < len(body):
                name, size, mtime, ino, n = _ENTRY.unpack_from(body, pos)
                pos += _ENTRY.size + n
                if pos > len(body):
                    return {}
                out[name.decode("ascii")] = (size, mtime, ino, body[pos - n:pos])
        except (struct.error, UnicodeDecodeError):
            return {}
        return out

    def _write_heads(self, entries: dict[str, tuple[int, int, int, bytes]]) -> None:
        """Replace the head cache (a store this process cannot write keeps the old one)."""
        parts = [_HEADS_MAGIC]
        for digest, (size, mtime, ino, head) in entries.items():
            try:
                parts += (_ENTRY.pack(digest.encode("ascii"), size, mtime, ino, len(head)),
                          head)
            except struct.error:  # (an mtime past 2262: not kept, its head read each time)
                continue
        import blake3

        body = b"".join(parts)
        with contextlib.suppress(OSError):
            write_atomic(os.path.join(self.path, _HEADS), body + blake3.blake3(body).digest(),
                         mode=0o600, durable=False)

    def resolve(self, ident: str, *, lineage: Callable[[StoredSendshot], bool] | None = None,
                candidates: Iterable[str] | None = None) -> StoredSendshot:
        """The record named by ``ident``: a digest or a unique prefix of one (4+ hex
        digits), ``latest`` (the newest one that ``lineage`` accepts and, when
        ``candidates`` is given, whose digest is among them), or the subvolume name it
        was sent as when one record has it (of ``lineage``, when some record there has).

        Raises:
            MissingBaseError: no such record (or several match a prefix).
        """
        every = self.records_list()
        if ident == "latest":
            wanted = set(candidates) if candidates is not None else None
            found = [s for s in every if (lineage is None or lineage(s))
                     and (wanted is None or s.digest in wanted)]
            if not found:
                raise MissingBaseError(
                    f"no sendshot of this source in {self.path}: the first send records one "
                    "(send SOURCE -o FILE --record, a full stream), or `btrdelta sendshot "
                    "create COPY --source SOURCE` records a copy the receiver holds")
            return found[-1]
        if not _is_ident(ident):
            return self._named(every, ident, lineage)
        found = [s for s in every if s.digest.startswith(ident)]
        if not found and (bad := self.damaged(ident)) is not None:
            raise StreamFormatError(f"sendshot {bad[:16]} cannot be read "
                                    f"({self.unreadable[bad][0]}): `btrdelta sendshot "
                                    f"delete {bad[:16]}` removes it")
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise MissingBaseError(f"{what} sendshot matches {ident!r} in {self.path}")
        return found[0]

    def damaged(self, ident: str) -> str | None:
        """The digest of the one unreadable record (:attr:`unreadable`, as of the last
        listing) whose digest starts with ``ident``, else None."""
        found = [d for d in self.unreadable if _is_ident(ident) and d.startswith(ident)]
        return found[0] if len(found) == 1 else None

    def newer_unreadable(self, record: StoredSendshot) -> list[tuple[str, str]]:
        """``(digest, why)`` of each unreadable record written after ``record`` (as of the
        last listing): a newest record a power cut left empty or short under its name."""
        return [(d, why) for d, (why, mtime) in sorted(self.unreadable.items())
                if mtime > record.head.created_ns]

    def _named(self, every: list[StoredSendshot], name: str,
               lineage: Callable[[StoredSendshot], bool] | None) -> StoredSendshot:
        """The one record whose subvolume name (``send --name``, the receiver's) is
        ``name``: of ``lineage`` when that has one, else of any source."""
        named = [s for s in every if os.fsdecode(s.head.name) == name]
        if lineage is not None and any(lineage(s) for s in named):
            named = [s for s in named if lineage(s)]
        if len(named) == 1:
            return named[0]
        if named:
            raise MissingBaseError(f"{len(named)} sendshots are named {name!r} in {self.path}:"
                                   " give the id of one (btrdelta sendshot list)")
        raise MissingBaseError(f"no sendshot id or name {name!r} in {self.path} (an id, a "
                               "unique prefix of one, the name it was sent as, or 'latest')")

    def open(self, record: StoredSendshot) -> tuple[RecordReader, Any]:
        """A reader of all of ``record`` and the file it reads (close it when done)."""
        # (unbuffered: the reader reads the head, then all after it at once; a buffered
        # file's read after a seek inside its buffer joins that buffer with the rest, a
        # second copy of the record: 1 against 0.45 ms and 364 against 183 page faults)
        f = open(record.path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller
        try:
            reader = RecordReader(f, source=record.path, whole=True, digest=record.digest)
            if reader.head != record.head:  # (listed from the head cache: damaged)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, _HEADS))
                raise StreamFormatError("the record's head is not the one listed (the head "
                                        "cache was damaged: removed)", source=record.path)
            return reader, f
        except BaseException:
            f.close()
            raise

    def view(self, record: StoredSendshot) -> View:
        """The columns of ``record``, checked whole against the digest that names it; a
        patch record's with its chain of bases (each checked so) applied.

        Raises:
            StreamFormatError: the record or a base of it is damaged, missing, of another
                subvolume or seed, or the bases form a cycle.
        """
        from ..tree.chain import View

        chain = [record]
        while (named := chain[-1].head.base) is not None:
            cur = chain[-1]
            if len(chain) > _MAX_CHAIN or named in {s.digest for s in chain}:
                raise StreamFormatError("its bases form a cycle, or a chain of more than "
                                        f"{_MAX_CHAIN} patch records", source=cur.path)
            base = self._listed.get(named) or self._stored(named, cur.path)
            h, b = cur.head, base.head
            if (h.seed, h.subvol_uuid) != (b.seed, b.subvol_uuid) or not b.content3:
                raise StreamFormatError(f"its base {base.digest[:12]} is of "
                                        "another subvolume, seed or kind of digests",
                                        source=cur.path)
            chain.append(base)
        whole = chain.pop()
        got = View(self._decode(whole, chain[-1] if chain else None),
                   patches=whole.head.content3)
        got.whole = whole.digest
        for k in range(len(chain) - 1, -1, -1):
            link = chain[k]
            got.apply(self._decode(link, chain[k - 1] if k else None), link.path)
        if self._decoded is not None:  # (this chain's only)
            mine = {whole.digest, *(r.digest for r in chain)}
            self._decoded = {k: v for k, v in self._decoded.items() if k in mine}
        return got

    def _decode(self, record: StoredSendshot, named_by: StoredSendshot | None) -> Any:
        """The columns of a whole ``record``, or the patch of a patch record, checked
        whole against its digest (kept by :meth:`keep_decoded`: not read again while its
        file is there)."""
        kept = self._decoded
        if kept is not None and record.digest in kept and os.path.exists(record.path):
            return kept[record.digest]
        reader, f = self._open_base(record, named_by)
        try:
            got = _checked(reader, reader.patch() if record.head.base is not None
                           else reader.columns(), record)
        finally:
            f.close()
        if kept is not None:
            kept[record.digest] = got
        return got

    def _open_base(self, record: StoredSendshot, named_by: StoredSendshot | None
                   ) -> tuple[RecordReader, Any]:
        """:meth:`open` of a record of a chain, the base of ``named_by`` (None: the record
        asked for): one the last listing had but gone since is missing as :meth:`_stored`
        says."""
        try:
            return self.open(record)
        except FileNotFoundError:
            if named_by is None:
                raise
            raise StreamFormatError(f"its base {record.digest[:12]} is missing",
                                    source=named_by.path) from None

    def _stored(self, digest: str, named_by: str) -> StoredSendshot:
        """The record ``digest`` (named by the record ``named_by`` as its base)."""
        p = self._file(digest)
        try:
            if not stat.S_ISREG(os.stat(p).st_mode):
                raise OSError("not a regular file")
            with open(p, "rb") as f:
                head = read_head(f, source=p)
            size = os.stat(p).st_size
        except FileNotFoundError:
            raise StreamFormatError(f"its base {digest[:12]} is missing",
                                    source=named_by) from None
        except OSError as exc:
            raise StreamFormatError(f"its base {digest[:12]} cannot be read ({exc})",
                                    source=named_by) from None
        return StoredSendshot(digest, head, size, p)

    def delete(self, digest: str, *, force: bool = False) -> None:
        """Delete one record.

        Raises:
            BtrdeltaError: a receiver's cursor names it, or it is the base of a patch record
                (unless ``force``: that record can then not be read).
        """
        from .cursors import cursor_digests

        with self.locked():
            held = [r for r, c in self.cursors().items() if digest in cursor_digests(c)]
            if held and not force:
                raise BtrdeltaError(f"sendshot {digest[:12]} is held by receiver(s) "
                                    f"{', '.join(sorted(held))} (use --force)")
            based = [s.digest[:12] for s in self.records_list() if s.head.base == digest]
            if based and not force:
                raise BtrdeltaError(f"sendshot {digest[:12]} is the base of patch record(s) "
                                    f"{', '.join(based)}: delete them first (or --force: "
                                    "they can then not be read)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(digest))

    # -- cursors -----------------------------------------------------------------------

    def cursors(self) -> dict[str, dict[str, Any]]:
        """``{receiver id: {"digest": ..., ...}}`` (:func:`.cursors.read_cursors`; that
        module is not imported where there is no cursor file: a send's start)."""
        p = os.path.join(self.path, "cursors.json")
        if not os.path.lexists(p):
            return {}
        from .cursors import read_cursors

        return read_cursors(p)

    def edit_cursor(self, receiver: str, edit: Callable[[dict[str, Any]], Any]) -> None:
        """``receiver``'s cursor set to ``(digest, extra) = edit(it now, or {})``: the record
        it holds (None: none yet), ``extra`` (``inflight``...); None and no ``extra``: gone.
        Under the store's lock (not ``edit``'s): two conversations lose no change."""
        with self.locked():
            cur = self.cursors()
            digest, extra = edit(cur.get(receiver, {}))
            if digest is None and not extra:
                cur.pop(receiver, None)
            else:
                cur[receiver] = {"digest": digest, "updated": round(time.time(), 3), **extra}
            self._write_cursors(cur)

    def _write_cursors(self, cursors: dict[str, dict[str, Any]]) -> None:
        import json

        # whole or not at all, and durable (the rename too: a cursor that went back after a
        # power cut names a sendshot the receiver no longer needs)
        data = json.dumps({"version": 1, "receivers": cursors}, indent=1, sort_keys=True)
        write_atomic(os.path.join(self.path, "cursors.json"), (data + "\n").encode(),
                     mode=0o600)

    def forget(self, receiver: str, *, force: bool = False) -> dict[str, Any]:
        """Drop ``receiver``'s cursor (a receiver gone for good): the record it named is no
        longer kept for it. Returns the cursor dropped.

        Raises:
            BtrdeltaError: no such receiver, or one with a transfer in flight (its
                temporary snapshot on this side would be left behind) unless ``force``.
        """
        before = self.cursors()  # (checked again under the lock, which makes the store)
        if receiver not in before:
            known = ", ".join(sorted(before)) or "none"
            raise BtrdeltaError(f"no receiver {receiver!r} has a cursor in {self.path} "
                                f"(the receivers: {known})")
        with self.locked():
            cursors = self.cursors()
            cursor = cursors.pop(receiver, None)
            if cursor is None:
                raise BtrdeltaError(f"receiver {receiver!r}: its cursor went meanwhile")
            flight = cursor.get("inflight")
            if flight and not force:
                snap = flight.get("snapshot") if isinstance(flight, dict) else None
                raise BtrdeltaError(
                    f"receiver {receiver!r} has a transfer in flight (its snapshot "
                    f"{snap or '?'}): let `replicate` finish it, or delete that snapshot "
                    "and forget it with --force")
            self._write_cursors(cursors)
            return cursor

    # -- retention ---------------------------------------------------------------------

    def prune(self, *, keep: int | None = None, grid: list[tuple[int, int]] | None = None,
              now: float | None = None, dry_run: bool = False,
              only: Callable[[StoredSendshot], bool] | None = None) -> list[StoredSendshot]:
        """Delete what the rule does not keep (per source, see :func:`plan_prune`);
        returns what was (or, with ``dry_run``, would be) deleted. ``only``: consider only
        the records it accepts (one source)."""
        from .cursors import cursor_digests

        with self.locked():
            listed = self.records_list()
            every = [s for s in listed if only is None or only(s)]
            needed = {d for c in self.cursors().values() for d in cursor_digests(c)}
            # an in-flight transfer's base, and the sendshot it recorded (named before
            # its COMMIT: the receiver may hold it although the COMMITTED was lost)
            needed |= {str(c["inflight"].get(key)) for c in self.cursors().values()
                       if isinstance(c.get("inflight"), dict) for key in ("base", "sendshot")}
            doomed: list[StoredSendshot] = []
            for members in _lineages(every):
                doomed += plan_prune(members, needed, keep=keep, grid=grid,
                                     now=time.time() if now is None else now)
            doomed = _without_bases(doomed, listed)
            if not dry_run:
                for s in doomed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(s.path)
            return doomed

    def leftovers(self, *, now: float | None = None, remove: bool = False) -> list[str]:
        """Temporary files that a writer killed mid-way left in the store (a record or
        the cursor file not yet named): those whose process is gone and that are older than an
        hour (a process in another PID namespace looks gone; the hour keeps its file).
        ``remove``: delete them. Returns their paths."""
        now = time.time() if now is None else now
        found: list[str] = []
        with self.locked():
            for folder in (self.records, self.path):
                try:
                    names = os.listdir(folder)
                except FileNotFoundError:
                    continue
                import re  # (not imported by a send)

                for name in names:
                    m = re.fullmatch(_LEFTOVER, name)
                    if m is None or (folder == self.path) != name.startswith(
                            ("cursors", ".cursors", ".heads")):
                        continue
                    p = os.path.join(folder, name)
                    try:
                        age = now - os.lstat(p).st_mtime
                    except FileNotFoundError:
                        continue
                    if age < _LEFTOVER_AGE or pid_alive(int(next(g for g in m.groups() if g))):
                        continue
                    found.append(p)
                    if remove:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(p)
        return sorted(found)


#: a temporary file left by a process (compiled on first use: a send does not look)
#: (``.cursors.json.tmp-PID-HEX``, ``.heads.tmp-PID-HEX``: fs.atomic's, where there is no
#: O_TMPFILE; ``cursors.json.tmp-PID``: a writer's before session 9)
_LEFTOVER = (r"\.tmp-(\d+)-[0-9a-f]+|\.(?:cursors\.json|heads)\.tmp-(\d+)-[0-9a-f]+"
             r"|cursors\.json\.tmp-(\d+)")
_LEFTOVER_AGE = 3600.0


def _write_record(tmp: str, head: SendshotHead,
                  inodes: Iterable[RecordInode] | Encoded | Patch, durable: bool) -> str:
    """Write a record to the new file ``tmp`` (``durable``: and ``fsync`` it); its digest."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with naming(os.path.dirname(tmp)), os.fdopen(fd, "wb") as f:  # (a new record there)
        digest, _n = write_record(f.write, head, inodes)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    return digest


class PendingRecord:
    """A record being written to a temporary file of the store by a thread
    (:meth:`SendshotStore.begin`). :meth:`commit` waits and names it; :meth:`abort` waits
    and deletes it. One of them must be called."""

    def __init__(self, store: SendshotStore, head: SendshotHead, encoded: Encoded | Patch,
                 durable: bool = True) -> None:
        import threading

        self._store, self._head, self._durable = store, head, durable
        self._tmp = store._temporary()
        self._digest = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(encoded,),
                                        name="btrdelta-record", daemon=True)
        self._thread.start()

    def _run(self, encoded: Encoded | Patch) -> None:
        try:
            self._digest = _write_record(self._tmp, self._head, encoded, self._durable)
        except BaseException as exc:  # handed to commit() in the caller's thread
            self._error = exc

    def commit(self) -> StoredSendshot:
        """The record, under its name (raises what writing it raised)."""
        self._thread.join()
        if self._error is not None:
            self.abort()
            raise self._error
        return self._store._publish(self._tmp, self._digest, self._head, self._durable)

    def abort(self) -> None:
        """Wait for the thread and delete what it wrote."""
        self._thread.join()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def parse_grid(text: str) -> list[tuple[int, int]]:
    """``"1h:24,1d:7,1w:4"`` -> ``[(3600, 24), (86400, 7), (604800, 4)]``.

    Raises:
        BtrdeltaError: not a grid.
    """
    import re  # (not imported by a send)

    out: list[tuple[int, int]] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)([mhdwy]):(\d+)\s*", part)
        if not m:
            raise BtrdeltaError(f"bad retention grid {text!r} (e.g. 1h:24,1d:7,1w:4)")
        out.append((int(m.group(1)) * _UNITS[m.group(2)], int(m.group(3))))
    return out


def _checked(reader: RecordReader, got: Any, record: StoredSendshot) -> Any:
    """``got``, read whole by ``reader``, if the record's content is what its name says."""
    if reader.digest is not None and reader.digest != record.digest:
        raise StreamFormatError(f"the record's content is not the one its name says "
                                f"(digest {reader.digest[:12]})", source=record.path)
    return got


def _without_bases(doomed: list[StoredSendshot], every: list[StoredSendshot]
                   ) -> list[StoredSendshot]:
    """``doomed`` without the bases (and theirs) of the records kept: a patch record is
    read with its chain."""
    by_digest = {s.digest: s for s in every}
    gone = {s.digest for s in doomed}
    todo = [s for s in every if s.digest not in gone]
    while todo:
        base = todo.pop().head.base
        if base is not None and base in gone:
            gone.discard(base)
            todo.append(by_digest[base])
    return [s for s in doomed if s.digest in gone]


def _lineages(records: list[StoredSendshot]) -> list[list[StoredSendshot]]:
    """``records`` (oldest first) grouped by source as ``send --from-sendshot latest``
    sees one: records that share a subvolume UUID or a source path are of one source (a
    record adopted with ``sendshot create --source`` has the source's path and no UUID,
    the source's sends its UUID: grouped apart, ``prune`` kept the adopted one forever)."""
    parent: dict[object, object] = {}

    def find(k: object) -> object:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for r in records:
        keys: list[object] = [("source", r.head.source)]
        if r.head.subvol_uuid:
            keys.append(("uuid", r.head.subvol_uuid))
        for k in keys[1:]:
            parent[find(k)] = find(keys[0])
    groups: dict[object, list[StoredSendshot]] = {}
    for r in records:
        groups.setdefault(find(("source", r.head.source)), []).append(r)
    return list(groups.values())


def plan_prune(
    records: list[StoredSendshot], needed: set[str], *, keep: int | None = None,
    grid: list[tuple[int, int]] | None = None, now: float = 0.0,
) -> list[StoredSendshot]:
    """Which of ``records`` (one source, oldest first) to delete (pure).

    Always kept: the newest, every digest in ``needed``, and what the rule keeps: the newest
    ``keep``, or for each grid interval ``(seconds, count)`` the newest record in each of the
    last ``count`` intervals of that length (counted back from ``now``). Without a rule
    nothing is deleted.
    """
    if not records or (keep is None and not grid):
        return []
    kept = {records[-1].digest} | (needed & {r.digest for r in records})
    if keep is not None:
        kept |= {r.digest for r in records[-keep:]} if keep > 0 else set()
    for seconds, count in grid or ():
        for i in range(count):
            lo, hi = now - (i + 1) * seconds, now - i * seconds
            inside = [r for r in records if lo < r.created <= hi]
            if inside:
                kept.add(inside[-1].digest)
    return [r for r in records if r.digest not in kept]
