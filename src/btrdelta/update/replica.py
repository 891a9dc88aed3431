"""The receiving side of replication (``btrdelta replicate --serve DEST`` / ``--listen``).

A destination directory holds received subvolumes (btrfs subvolumes, or directories with
the registry elsewhere), its state ``DEST/.btrdelta-replica.json`` (its id, and the
sendshot each subvolume was received as) and at most one partial transfer in
``DEST/.btrdelta-partial/``: the stream spooled as it arrives (``stream``) and how far it is
verified (``meta.json``).

:meth:`Replica.serve` runs one conversation (:class:`~btrdelta.protocol.Connection`, role
receiver): HELLO, HOLDINGS, a PLAN checked against what is held, then the stream. Each
segment is appended to the spool and acknowledged once its digest and the chain of digests
match its CHECKPOINT; a thread applies the verified bytes as they come with
:func:`btrdelta.receive.receive` (a hidden temporary subvolume, renamed to its final name at
END), after checking the stream is the one planned (its UUID, name and parent, clones only
from the parent or itself). COMMIT (size and chain) lets the applier reach the end; only
then is the subvolume visible, and COMMITTED is sent.

A cut connection or a killed sender leaves the spool: the next PLAN for the same session
resumes after the last acknowledged segment (the applier, stopped with the connection,
applies the spool again from its start). A peer that lies (bad CRC or digest, unknown or
misplaced messages, a stream for another base) gets a typed REFUSE, the partial is dropped
and nothing is applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import blake3

from .._value import value_class
from ..errors import (
    BtrdeltaError,
    ProtocolError,
    TransportError,
    UnsafePathError,
)
from ..fs.btrfs import delete_subvolume, subvol_info
from ..fs.remove import remove_path, remove_tree
from ..fs.sandbox import check_name
from ..protocol import (
    Accept,
    Ack,
    Checkpoint,
    Commit,
    Committed,
    Connection,
    Data,
    Held,
    Hello,
    Holdings,
    Partial,
    Plan,
    Refuse,
)
from ..protocol.messages import segment_hasher, spoken
from ..receive import ReceivedSubvol, receive, uses_btrfs
from ..receive.subvolumes import pid_alive
from ..stream.reader import Event, StreamReader
from ..stream.records import Clone, End, Snapshot, Subvol
from .channels import Channel, MessageIO, PeerClosed, PeerRefused

__all__ = ["PARTIAL_DIR", "STATE_FILE", "Replica", "ServeResult", "chain_next"]

STATE_FILE = ".btrdelta-replica.json"
PARTIAL_DIR = ".btrdelta-partial"
_ZERO_CHAIN = bytes(32).hex()
_TMP_PREFIX = ".btrdelta-tmp-"


def chain_next(chain: str, digest: str) -> str:
    """The chain digest after a segment of ``digest`` (both hex)."""
    return blake3.blake3(bytes.fromhex(chain) + bytes.fromhex(digest)).hexdigest()


@value_class
class ServeResult:
    """How one conversation ended."""

    #: "committed", "refused" (by either side), "interrupted" (resumable), "failed"
    outcome: str
    message: str = ""
    received: ReceivedSubvol | None = None
    #: bytes of stream this conversation added to the spool
    received_bytes: int = 0


class _Spool:
    """The partial transfer: spooled bytes, verified offset, waiting readers."""

    def __init__(self, path: Path, plan: Plan, *, resume: dict[str, Any] | None,
                 version: int) -> None:
        self.path = path
        self.plan = plan
        self.version = version
        path.mkdir(exist_ok=True)
        self.cond = threading.Condition()
        self.verified = resume["offset"] if resume else 0
        self.segments = resume["segments"] if resume else 0
        self.chain = resume["chain"] if resume else _ZERO_CHAIN
        self.complete = False
        self.aborted: BaseException | None = None
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = os.open(path / "stream", flags, 0o600)
        if os.fstat(self.fd).st_size != self.verified:
            # drop an unverified tail (only then: btrfs writes back on close a file that
            # was truncated, even to its own size, and this one is deleted once applied)
            os.ftruncate(self.fd, self.verified)
        self.written = self.verified
        self._seg = segment_hasher(version)
        self.added = 0
        if resume is None:
            self._save()

    def _save(self) -> None:
        p = self.plan
        doc = {"version": 1, "protocol": self.version, "session": p.session, "name": p.name,
               "uuid": str(p.uuid), "ctransid": p.ctransid,
               "parent_uuid": str(p.parent_uuid) if p.parent_uuid else None, "base": p.base,
               "segment": p.segment, "offset": self.verified, "segments": self.segments,
               "chain": self.chain}
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path / "meta.json")

    def append(self, data: bytes) -> None:
        limit = 2 * self.plan.segment + (1 << 20)
        if self.written + len(data) - self.verified > limit:
            raise ProtocolError(f"a segment longer than {limit} bytes")
        os.pwrite(self.fd, data, self.written)
        self._seg.update(data)
        self.written += len(data)
        self.added += len(data)

    def checkpoint(self, cp: Checkpoint) -> None:
        digest = self._seg.hexdigest()
        if cp.offset != self.written or digest != cp.digest:
            raise ProtocolError(f"segment {cp.index} does not match its checkpoint "
                                f"(digest {digest[:16]}, announced {cp.digest[:16]})")
        chain = chain_next(self.chain, digest)
        if chain != cp.chain:
            raise ProtocolError(f"segment {cp.index}: the chain of digests differs")
        with self.cond:
            self.chain, self.verified, self.segments = chain, cp.offset, cp.index + 1
            self._seg = segment_hasher(self.version)
            self._save()
            self.cond.notify_all()

    def finish(self, commit: Commit) -> None:
        if commit.size != self.verified or commit.chain != self.chain:
            raise ProtocolError("COMMIT does not match the stream received")
        with self.cond:
            self.complete = True
            self.cond.notify_all()

    def abort(self, exc: BaseException) -> None:
        with self.cond:
            self.aborted = exc
            self.cond.notify_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def drop(self) -> None:
        self.close()
        remove_path(self.path, ignore_errors=True)


class _SpoolReader:
    """The verified bytes of a spool, in order, waiting for more (a raw binary file)."""

    def __init__(self, spool: _Spool) -> None:
        self.spool = spool
        self.pos = 0

    def readinto(self, buf: Any) -> int:
        sp = self.spool
        with sp.cond:
            while sp.verified <= self.pos and not sp.complete and sp.aborted is None:
                sp.cond.wait()
            if sp.aborted is not None:
                raise TransportError("the transfer stopped") from sp.aborted
            avail = sp.verified - self.pos
        if avail <= 0:
            return 0
        view = memoryview(buf).cast("B")
        n = os.preadv(sp.fd, [view[: min(len(view), avail)]], self.pos)
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(n if n > 0 else 1 << 20)
        got = self.readinto(buf)
        return bytes(buf[:got])


def _checked(events: Iterator[Event], plan: Plan) -> Iterator[Event]:
    """``events`` after checking the stream is the planned one (first record, clones)."""
    first = True
    allowed = {plan.uuid, plan.parent_uuid}
    for ev in events:
        kind = type(ev)
        if kind is Subvol or kind is Snapshot:
            if not first:
                raise ProtocolError("a second subvolume in the stream")
            first = False
            rec: Any = ev
            want = Snapshot if plan.parent_uuid is not None else Subvol
            if kind is not want or rec.uuid != plan.uuid or \
                    os.fsdecode(rec.path) != plan.name or (
                    kind is Snapshot and rec.clone_uuid != plan.parent_uuid):
                raise ProtocolError("the stream is not the planned one (a stream for another "
                                    "base or subvolume)")
        elif isinstance(ev, Clone) and ev.clone_uuid not in allowed:
            raise ProtocolError("the stream clones from a subvolume outside its base")
        yield ev
        if kind is End:
            return


class _Applier(threading.Thread):
    def __init__(self, spool: _Spool, dest: Path, backend: str) -> None:
        super().__init__(name="btrdelta-replica-apply", daemon=True)
        self.spool, self.dest, self.backend = spool, dest, backend
        self.reader = _SpoolReader(spool)
        self.result: ReceivedSubvol | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            events = StreamReader(self.reader, source="replication stream").events()  # type: ignore[arg-type]
            got = receive(_checked(events, self.spool.plan), self.dest, stop_at_end=True,
                          backend=self.backend)
            if self.reader.readinto(bytearray(1)):
                raise ProtocolError("data after the stream's END")
            self.result = got[0] if got else None
            if self.result is None:
                raise ProtocolError("the stream held no subvolume")
        except BaseException as exc:  # handed to serve()
            self.error = exc


class Replica:
    """A replication destination.

    Args:
        dest: an existing directory.
        backend: ``"auto"``, ``"btrfs"`` or ``"dir"`` (as :func:`btrdelta.receive.receive`).
    """

    def __init__(self, dest: str | os.PathLike[str], *, backend: str = "auto") -> None:
        self.dest = Path(dest)
        if not self.dest.is_dir():
            raise BtrdeltaError(f"destination {dest} is not a directory")
        self.backend = backend
        self.btrfs = uses_btrfs(self.dest, backend)
        self.state = self._load()

    # -- state ----------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        p = self.dest / STATE_FILE
        try:
            doc = json.loads(p.read_bytes()[: 16 << 20])
            if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
                raise ValueError("no id")
            doc.setdefault("received", {})
            return doc
        except FileNotFoundError:
            doc = {"version": 1, "id": uuid4().hex, "received": {}}
            self._save(doc)
            return doc
        except ValueError as exc:
            raise BtrdeltaError(f"damaged replica state: {exc}", path=str(p)) from exc

    def _save(self, doc: dict[str, Any]) -> None:
        p = self.dest / STATE_FILE
        tmp = self.dest / f"{STATE_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, p)

    @property
    def ident(self) -> str:
        """This destination's id (the sender keeps a cursor per id)."""
        return str(self.state["id"])

    def _partial(self, version: int | None) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.dest / PARTIAL_DIR / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or (
                version is not None and doc.get("protocol", 1) != version):
            return None  # (its digests are another version's: it cannot be resumed)
        return doc

    def holdings(self, version: int | None = None) -> Holdings:
        """What DEST holds: its subvolumes and a partial transfer (one whose segments were
        digested as in protocol ``version``, when given)."""
        held: list[Held] = []
        received = self.state.get("received", {})
        if self.btrfs:
            for entry in sorted(os.scandir(self.dest), key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False) or \
                        entry.stat(follow_symlinks=False).st_ino != 256:
                    continue  # (readdir's inode of a subvolume is its id: stat it)
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    info = subvol_info(fd)
                finally:
                    os.close(fd)
                held.append(Held(entry.name, info.uuid, info.received_uuid, info.stransid,
                                 received.get(entry.name)))
        else:
            from ..receive import Registry

            held += [Held(e.name, e.uuid, e.uuid, e.ctransid, received.get(e.name))
                     for e in Registry(self.dest).entries() if (self.dest / e.name).is_dir()]
        part = self._partial(version)
        partial = None
        if part is not None:
            partial = Partial(part["session"], int(part["offset"]), int(part["segments"]),
                              str(part["chain"]))
        return Holdings(tuple(held), partial)

    # -- one conversation -----------------------------------------------------------------

    def _check_plan(self, plan: Plan, holdings: Holdings) -> Refuse | None:
        try:
            check_name(os.fsencode(plan.name), "subvolume name")
        except UnsafePathError as exc:
            return Refuse("refused", f"unsafe subvolume name: {exc}")
        if plan.name.startswith("."):
            return Refuse("refused", "hidden subvolume names are not allowed")
        if os.path.lexists(self.dest / plan.name):
            return Refuse("exists", f"{plan.name} already exists in the destination")
        if plan.parent_uuid is not None and not any(
                (h.received_uuid or h.uuid) == plan.parent_uuid for h in holdings.held):
            return Refuse("no-common-base", f"no subvolume {plan.parent_uuid} here")
        part = holdings.partial
        if plan.kind == "resume" and (part is None or part.session != plan.session
                                      or part.offset != plan.offset
                                      or part.segments != plan.segments):
            return Refuse("protocol", "no such partial transfer to resume")
        if plan.kind != "resume" and plan.offset:
            return Refuse("protocol", "a new transfer starts at offset 0")
        return None

    def serve(self, ch: Channel, *, peer: str = "peer") -> ServeResult:
        """Run one conversation on ``ch`` (see the module docstring)."""
        conn = Connection("receiver", source=peer)
        io = MessageIO(ch, conn)
        spool: _Spool | None = None
        applier: _Applier | None = None
        try:
            io.send(Hello("receiver", spoken(), ("encoded",), self.ident, str(self.dest)))
            io.expect(Hello)
            holdings = self.holdings(io.conn.version)
            io.send(holdings)
            msg = io.expect(Plan, Refuse)
            if isinstance(msg, Refuse):
                return ServeResult("refused", f"{msg.code}: {msg.message}")
            plan = msg
            refusal = self._check_plan(plan, holdings)
            if refusal is not None:
                io.send(refusal)
                return ServeResult("refused", f"{refusal.code}: {refusal.message}")
            part_dir = self.dest / PARTIAL_DIR
            resume = self._partial(io.conn.version) if plan.kind == "resume" else None
            if resume is None and part_dir.exists():
                remove_path(part_dir)  # an older transfer this sender abandoned
            self._sweep(plan.uuid)
            spool = _Spool(part_dir, plan, resume=resume, version=io.conn.version)
            applier = _Applier(spool, self.dest, self.backend)
            applier.start()
            io.send(Accept(plan.session))
            return self._stream(io, spool, applier)
        except PeerRefused as exc:
            if spool is not None:
                spool.abort(exc)
            return ServeResult("refused", str(exc))
        except (TransportError, PeerClosed) as exc:
            if spool is not None:
                spool.abort(exc)
            return ServeResult("interrupted", str(exc), received_bytes=spool.added if spool
                               else 0)
        except ProtocolError as exc:
            if spool is not None:
                spool.abort(exc)
                if applier is not None:
                    applier.join()
                spool.drop()
            with contextlib.suppress(BtrdeltaError):
                io.send_raw(Refuse("protocol", str(exc)[:2000]))
            return ServeResult("failed", str(exc))
        finally:
            if applier is not None:
                applier.join()
            if spool is not None:
                spool.close()

    def _stream(self, io: MessageIO, spool: _Spool, applier: _Applier) -> ServeResult:
        while True:
            msg = io.expect(Data, Checkpoint, Commit, Refuse)
            if applier.error is not None and not isinstance(applier.error, TransportError):
                raise ProtocolError(f"the stream cannot be applied: {applier.error}")
            if isinstance(msg, Data):
                spool.append(msg.data)
            elif isinstance(msg, Checkpoint):
                spool.checkpoint(msg)
                io.send(Ack(msg.index, msg.offset))
            elif isinstance(msg, Refuse):
                spool.abort(ProtocolError(msg.message))
                applier.join()
                spool.drop()
                return ServeResult("refused", f"{msg.code}: {msg.message}")
            else:
                spool.finish(msg)
                applier.join()
                if applier.error is not None or applier.result is None:
                    err = applier.error
                    spool.drop()
                    text = str(err) if err is not None else "nothing received"
                    io.send(Refuse("failed", text[:2000]))
                    return ServeResult("failed", text)
                got = applier.result
                self.state.setdefault("received", {})[got.name] = msg.sendshot or None
                self._save(self.state)
                spool.drop()
                io.send(Committed(got.name, got.uuid))
                return ServeResult("committed", received=got, received_bytes=spool.added)

    def _sweep(self, uuid: UUID) -> None:
        """Remove temporary subvolumes of ``uuid`` left by receivers that died."""
        prefix = f"{_TMP_PREFIX}{uuid.hex[:12]}-"
        for entry in os.scandir(self.dest):
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if self.btrfs:
                    with contextlib.suppress(OSError):
                        delete_subvolume(fd, entry.name.encode())
                        continue
                with contextlib.suppress(OSError):
                    remove_tree(fd, entry.name)  # any depth: an unfinished, untrusted tree
            finally:
                os.close(fd)


