"""`btrdelta replicate` over a pipe (the receiver a `replicate --serve` child): rounds of a
live btrfs subvolume (the plan's estimate of the data against the bytes changed), a cut
connection resumed (bytes resent at most one segment, nothing half-applied), a lying sender
refused with nothing applied, TCP peers refused before any subvolume is touched. Oracle:
tree-sum of the received subvolume equals the source."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from btrdelta.errors import TransportError
from btrdelta.protocol import Connection, Data, Hello, Holdings, Plan, Refuse
from btrdelta.protocol.messages import Accept, Ack, Checkpoint, Commit, Committed
from btrdelta.send.store import SendshotStore
from btrdelta.stream.records import End, Mkfile, Snapshot, Subvol, Write
from btrdelta.stream.writer import StreamWriter
from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs
from btrdelta.tree import tree_sum
from btrdelta.update.channels import (
    MessageIO,
    PeerClosed,
    PeerRefused,
    PipeChannel,
    spawn_local,
)
from btrdelta.update.outbox import Outbox
from btrdelta.update.partial import PartialTransfer
from btrdelta.update.replica import Replica, chain_next
from btrdelta.update.replicate import replicate
from tests.conftest import Children, require_btrfs, spy_fsync

SEG = 1 << 20


@pytest.fixture
def fs2() -> Iterator[tuple[Path, Path]]:
    require_btrfs()
    try:
        with loop_fs("btrfs", size="700M") as snd, loop_fs("btrfs", size="700M") as rcv:
            yield snd, rcv
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


def _kept_chain(store: SendshotStore) -> bool:
    """Whether the store holds its newest record and the bases it names (a patch record is
    read with its chain: ``docs/formats/sendshot.md`` §2b), and nothing else."""
    every = {r.digest: r for r in store.records_list()}
    chain, cur = set(), max(every.values(), key=lambda r: r.head.created_ns)
    while True:
        chain.add(cur.digest)
        if cur.head.base is None:
            return set(every) == chain
        cur = every[cur.head.base]


def _sh(*cmd: object) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def _over_a_socketpair(src: Path, dest: Path, store: Path) -> tuple[Any, list[object]]:
    """``replicate`` of ``src`` into ``dest`` over a socket pair (the ACK thread's path), the
    receiver a :class:`Replica` serving in a thread: the sender's result and the
    receiver's (one, or none when it raised)."""
    import threading

    from btrdelta.update.channels import SocketChannel

    a, b = socket.socketpair()
    served: list[object] = []
    receiver = threading.Thread(
        target=lambda: served.append(Replica(dest).serve(SocketChannel(a, "sender"))))
    receiver.start()
    try:
        res = replicate(src, SocketChannel(b, "receiver"), store=SendshotStore(store),
                        segment=SEG)
    finally:
        receiver.join(30)
        a.close()
        b.close()
    return res, served


def _visible(dest: Path) -> set[str]:
    return {n for n in os.listdir(dest) if not n.startswith(".")}


class _Cut:
    """A channel that fails after ``limit`` bytes written (a cut connection)."""

    def __init__(self, inner: PipeChannel, limit: int) -> None:
        self.inner, self.limit, self.written = inner, limit, 0

    def read(self, n: int) -> bytes:
        return self.inner.read(n)

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.limit:
            raise TransportError("cut by the test")
        self.written += len(data)
        self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


def _newest(dest: Path) -> Path:
    return dest / sorted(_visible(dest))[-1]


@pytest.mark.btrfs
def test_rounds_and_a_cut_over_a_pipe(fs2: tuple[Path, Path], tmp_path: Path) -> None:
    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    rng = random.Random(1)
    for i in range(8):
        (live / f"f{i}").write_bytes(rng.randbytes(700_000))
    store = SendshotStore(tmp_path / "store")
    dest = rcv / "backup"
    dest.mkdir()
    for rnd in range(3):
        if rnd:
            with open(live / f"f{rnd}", "r+b") as f:
                f.seek(100_000)
                f.write(rng.randbytes(50_000))
            (live / f"new{rnd}").write_bytes(rng.randbytes(20_000))
        ch = spawn_local(str(dest))
        res = replicate(live, ch, store=store, segment=SEG)
        ch.close()
        assert res.outcome == "committed", res
        assert res.kind == ("full" if not rnd else "incremental")
        assert tree_sum(_newest(dest)) == tree_sum(live)
        # the plan's estimate: every file's data, then the 4 KiB blocks overwritten (bytes
        # 100_000..150_000: blocks 24..36) and the new file
        assert res.estimate == (8 * 700_000 if not rnd else 13 * 4096 + 20_000), res
        assert res.estimate < res.size
        # the sender keeps nothing but the live subvolume; the store one sendshot
        assert [ln.split()[-1] for ln in _sh("btrfs", "subvolume", "list", snd).splitlines()] \
            == ["vol"]
        assert _kept_chain(store)  # the newest and, a patch record, its bases alone
    # a large change, cut after about 2.5 segments
    (live / "big").write_bytes(rng.randbytes(6 * SEG))
    before = _visible(dest)
    cut = _Cut(spawn_local(str(dest)), int(2.5 * SEG))
    with pytest.raises(TransportError):
        replicate(live, cut, store=store, segment=SEG)
    cut.close()
    assert _visible(dest) == before  # nothing under a final name
    assert (dest / ".btrdelta-partial" / "meta.json").exists()
    # a changed source does not matter: the session's snapshot is read again
    (live / "f7").write_bytes(b"changed after the cut")
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=store, segment=SEG)
    ch.close()
    assert res.outcome == "committed", res
    assert res.kind == "resume"
    assert res.resumed_from >= SEG
    assert res.estimate == 6 * SEG  # of the whole stream
    assert cut.written - res.resumed_from <= SEG + 64 * 1024  # resent at most one segment
    got = _newest(dest)
    assert (got / "big").read_bytes() == (live / "big").read_bytes()
    assert (got / "f7").read_bytes() != b"changed after the cut"
    assert not (dest / ".btrdelta-partial").exists()
    # and the next round is an incremental from it
    # f7 rewritten, and a new file with the content of another one: one CLONE, no data
    (live / "copy").write_bytes((live / "f6").read_bytes())
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=store, segment=SEG)
    ch.close()
    assert res.kind == "incremental"
    assert tree_sum(_newest(dest)) == tree_sum(live)
    assert res.estimate == len(b"changed after the cut"), res
    # (the atimes tree-sum changed go first) nothing changed since: already current; then a
    # write in place a moment ago (btrfs has not committed it, the subvolume's ctransid has
    # not moved): a change to send
    for step in ("atimes", "none", "write"):
        if step == "write":
            with open(live / "f5", "r+b") as f:
                f.write(b"fresh")
        ch = spawn_local(str(dest))
        res = replicate(live, ch, store=store, segment=SEG)
        ch.close()
        if step == "none":
            assert res.outcome == "refused", res
            assert "already-current" in res.message
        elif step == "write":
            assert (res.outcome, res.kind) == ("committed", "incremental"), res
            assert (_newest(dest) / "f5").read_bytes() == (live / "f5").read_bytes()


@pytest.mark.btrfs
def test_a_first_replication_scans_while_the_receiver_starts(
        fs2: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the session's snapshot is taken and scanned before the receiver's answer: the send
    # does not walk it again; refused, or resuming another session, the snapshot is deleted
    from btrdelta.send import walk as walk_mod

    walks: list[bytes] = []
    real = walk_mod.scan_tree

    def counted(path: object, **kw: object) -> object:
        walks.append(os.fsencode(path))  # type: ignore[arg-type]
        return real(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(walk_mod, "scan_tree", counted)
    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    (live / "d").mkdir()
    (live / "d" / "small").write_bytes(b"x" * 100)
    (live / "big").write_bytes(random.Random(3).randbytes(3 * SEG))

    def subvols() -> list[str]:
        return [ln.split()[-1] for ln in _sh("btrfs", "subvolume", "list", snd).splitlines()]

    dest = rcv / "backup"
    dest.mkdir()
    store = SendshotStore(tmp_path / "store")
    cut = _Cut(spawn_local(str(dest)), int(1.5 * SEG))
    with pytest.raises(TransportError):
        replicate(live, cut, store=store, segment=SEG)
    cut.close()
    assert walks == []  # the early scan's tree was the send's
    assert len(subvols()) == 2  # the session's snapshot, kept for the resume
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=store, segment=SEG)  # a new early snapshot, not used
    ch.close()
    assert (res.outcome, res.kind) == ("committed", "resume"), res
    assert subvols() == ["vol"]
    assert tree_sum(_newest(dest)) == tree_sum(live)
    # another sender's store (no sendshot of this source): the receiver holds other states
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=SendshotStore(tmp_path / "other"), segment=SEG)
    ch.close()
    assert res.outcome == "refused", res
    assert "no-common-base" in res.message
    assert subvols() == ["vol"]


def test_the_cursor_names_a_new_session_before_its_first_checkpoint(
        fs2: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # written while the send sets up, the PLAN and the first DATA go out; before the first
    # CHECKPOINT (nothing is acknowledged before the session is named);
    # a send that fails before its PLAN leaves no snapshot behind (no cursor names it)
    from btrdelta.update import replicate as rep

    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    (live / "f").write_bytes(random.Random(4).randbytes(3 * SEG))
    dest = rcv / "backup"
    dest.mkdir()
    store = SendshotStore(tmp_path / "store")
    seen: list[str] = []
    checkpoint = Outbox.checkpoint

    def spy(out: Outbox, cp: Checkpoint) -> None:
        if not seen:  # the first CHECKPOINT: the cursor names the session already
            inflight = next(iter(store.cursors().values())).get("inflight") or {}
            seen.append(str(inflight.get("session")))
        checkpoint(out, cp)

    monkeypatch.setattr(Outbox, "checkpoint", spy)

    def subvols() -> list[str]:
        return [ln.split()[-1] for ln in _sh("btrfs", "subvolume", "list", snd).splitlines()]

    class _Early(Exception):
        pass

    def failing(*_a: object, **_kw: object) -> object:
        raise _Early()

    real = rep.send_with_sendshots
    monkeypatch.setattr(rep, "send_with_sendshots", failing)
    ch = spawn_local(str(dest))
    with pytest.raises(_Early):
        replicate(live, ch, store=store, segment=SEG)
    ch.close()
    assert subvols() == ["vol"]  # the session's snapshot dropped: never named
    assert seen == []
    # (the cursor, written while the send set up, taken back: no session in flight)
    assert not any(c.get("inflight") for c in store.cursors().values())
    monkeypatch.setattr(rep, "send_with_sendshots", real)
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind) == ("committed", "full"), res
    assert len(seen) == 1
    assert len(seen[0]) == 32  # (a session's hex)
    assert subvols() == ["vol"]
    assert tree_sum(_newest(dest)) == tree_sum(live)


def test_the_first_data_messages_are_small_then_double(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's header and first records go out at once (64 KiB), not after the first
    ~1 MiB was made: the receiver starts on them while the sender reads the next files; the
    messages then double up to the full size. Records are never split."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    for i in range(900):
        (src / f"f{i:03}").write_bytes(rng.randbytes(3000))
    dest = tmp_path / "dest"
    dest.mkdir()
    sizes: list[int] = []
    data = Outbox.data

    def spy(out: Outbox, offset: int, pieces: list[bytes]) -> None:
        sizes.append(sum(len(p) for p in pieces))
        data(out, offset, pieces)

    monkeypatch.setattr(Outbox, "data", spy)
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=SendshotStore(tmp_path / "store"), segment=8 << 20)
    ch.close()
    assert res.outcome == "committed", res
    assert sizes[0] < (64 << 10) + 4096  # (at most a record past 64 KiB)
    assert sizes[1] < (128 << 10) + 4096
    assert sizes[2] < (256 << 10) + 4096
    assert max(sizes) > 512 << 10
    assert tree_sum(_newest(dest)) == tree_sum(src)


@pytest.mark.btrfs
def test_the_commit_comes_while_the_receiver_seals(fs2: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver acknowledges END's segment before it seals the subvolume (its received
    UUID, read-only: a transaction commit), and the sender names the sendshot in its cursor
    while it waits for that ACK: the COMMIT comes during the seal, not a round trip and a
    cursor write after it."""
    import threading

    from btrdelta.receive import subvolumes

    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    rng = random.Random(5)
    for i in range(6):
        (live / f"f{i}").write_bytes(rng.randbytes(700_000))
    dest = rcv / "backup"
    dest.mkdir()
    commit_sent = threading.Event()
    during_seal: list[bool] = []
    send, seal = MessageIO.send, subvolumes.set_received

    def spy_send(io: MessageIO, msg: object) -> None:
        send(io, msg)  # type: ignore[arg-type]
        if isinstance(msg, Commit):
            commit_sent.set()

    def spy_seal(*args: object) -> None:
        during_seal.append(commit_sent.wait(5))
        seal(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(MessageIO, "send", spy_send)
    monkeypatch.setattr(subvolumes, "set_received", spy_seal)
    res, served = _over_a_socketpair(live, dest, tmp_path / "store")
    assert res.outcome == "committed", res
    assert served
    assert served[0].outcome == "committed", served  # type: ignore[attr-defined]
    assert during_seal == [True]
    got = dest / res.name
    assert tree_sum(got) == tree_sum(live)
    info = _sh("btrfs", "subvolume", "show", got)
    assert "readonly" in info
    # the cursor moved to the new sendshot (named before the COMMIT, in flight no longer)
    cursor = next(iter(SendshotStore(tmp_path / "store").cursors().values()))
    assert cursor["digest"] == res.sendshot
    assert not cursor.get("inflight")


@pytest.mark.parametrize("kind", ["dir", pytest.param("btrfs", marks=pytest.mark.btrfs)])
def test_the_receiver_is_written_out_before_the_final_name_and_the_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A commit survives a power cut on the receiver: DEST is written out (``syncfs``: the
    files' data, the seal) before the state names the sendshot and the subvolume takes its
    final name, and again before COMMITTED moves the sender's cursor (which lets prune
    delete the base the receiver held before). Before, a power cut after COMMITTED could
    take back the final name, or leave it on a tree whose data was still in memory."""

    from btrdelta.receive import subvolumes
    from btrdelta.update import replica as replica_mod
    from tests.conftest import btrfs_loop

    events: list[str] = []
    real_sync, real_rename, real_save = (replica_mod.syncfs, subvolumes.rename_noreplace,
                                         replica_mod.write_atomic)
    send = MessageIO.send

    def spy_sync(fd: int) -> None:
        real_sync(fd)
        events.append("syncfs")

    def spy_rename(*args: object) -> None:
        real_rename(*args)  # type: ignore[arg-type]
        events.append("rename")

    def spy_save(path: object, data: bytes, **kw: object) -> None:
        real_save(path, data, **kw)  # type: ignore[arg-type]
        events.append("state")

    def spy_send(io: MessageIO, msg: object) -> None:
        if isinstance(msg, Committed):
            events.append("COMMITTED")
        send(io, msg)  # type: ignore[arg-type]

    monkeypatch.setattr(replica_mod, "syncfs", spy_sync)
    monkeypatch.setattr(subvolumes, "rename_noreplace", spy_rename)
    monkeypatch.setattr(replica_mod, "write_atomic", spy_save)
    monkeypatch.setattr(MessageIO, "send", spy_send)
    with contextlib.ExitStack() as stack:
        top = tmp_path if kind == "dir" else stack.enter_context(btrfs_loop("300M"))
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(os.urandom(300_000))
        dest = top / "dest"
        dest.mkdir()
        res, _ = _over_a_socketpair(src, dest, tmp_path / "store")
        assert res.outcome == "committed", res
        assert events[-5:] == ["syncfs", "state", "rename", "syncfs", "COMMITTED"], events
        assert tree_sum(dest / res.name) == tree_sum(src)


@pytest.mark.btrfs
def test_the_receiver_writes_a_large_file_out_while_it_comes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver starts writing a large file's data out as it applies it (every 8 MiB:
    receive's ``write_behind``), so that its write-out of DEST before the commit
    (``syncfs``) finds little left: at that ``syncfs`` the kernel already has a place on
    the disk for the file's first 16 MiB (FIEMAP: not delayed allocation)."""

    from btrdelta import _native
    from btrdelta.receive.applier import WRITE_BEHIND
    from btrdelta.update import replica as replica_mod
    from tests.conftest import btrfs_loop
    from tests.receive.helpers import written_out_bytes

    if not _native.available("fastapply"):
        pytest.skip("the C fast path (receive/_fastapply.c) is not built")
    placed: list[int] = []
    real_sync = replica_mod.syncfs

    def spy_sync(fd: int) -> None:
        if not placed:  # the first write-out: the tree as the stream left it
            big = [os.path.join(d, "big") for d, _, names in os.walk(dest) if "big" in names]
            placed.extend(written_out_bytes(b, 2 * WRITE_BEHIND) for b in big)
        real_sync(fd)

    monkeypatch.setattr(replica_mod, "syncfs", spy_sync)
    with _native.use_backend("c", "fastapply"), btrfs_loop("400M") as top:
        src = tmp_path / "src"
        src.mkdir()
        (src / "big").write_bytes(os.urandom(2 * WRITE_BEHIND + 1_000_000))
        dest = top / "dest"
        dest.mkdir()
        res, _ = _over_a_socketpair(src, dest, tmp_path / "store")
        assert res.outcome == "committed", res
        assert placed == [2 * WRITE_BEHIND]
        assert tree_sum(dest / res.name) == tree_sum(src)


def test_already_current_and_refusals(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    dest = tmp_path / "dest"
    dest.mkdir()
    store = SendshotStore(tmp_path / "store")
    ch = spawn_local(str(dest))
    assert replicate(src, ch, store=store).outcome == "committed"
    ch.close()
    # a receiver with states of this source that the sender does not know
    other = SendshotStore(tmp_path / "other")
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=other)
    ch.close()
    assert res.outcome == "refused"
    assert "no-common-base" in res.message
    ch = spawn_local(str(dest))
    assert replicate(src, ch, store=other, allow_full=True).outcome == "committed"
    ch.close()
    assert len(_visible(dest)) == 2


def test_a_name_the_destination_cannot_take_is_refused_before_the_stream(
        tmp_path: Path) -> None:
    """A source whose name (240 bytes) with the time stamp replicate adds is longer than the
    destination's filesystem takes a name: the whole stream was sent and applied, then
    refused at its end ("File name too long"), and every run sent it whole again. It is
    refused at the PLAN now, saying why; nothing is left in DEST."""
    src = tmp_path / ("s" * 240)
    src.mkdir()
    (src / "a").write_bytes(os.urandom(2 << 20))
    dest = tmp_path / "dest"
    dest.mkdir()
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=SendshotStore(tmp_path / "store"))
    ch.close()
    assert res.outcome == "refused", res
    assert "longer than the destination's filesystem takes" in res.message, res.message
    assert _visible(dest) == set()
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


@pytest.mark.btrfs
def test_a_destination_of_many_subvolumes_still_receives(tmp_path: Path) -> None:
    """The HOLDINGS list every subvolume of DEST (67 bytes each here, 100 with the sendshot
    a replication received it as: 11,400 of those, 16 months of hourly replication kept):
    past 1,114,112 bytes, the largest any message could be, every replication to that DEST
    failed ("message length ... exceeds 1114112"). A sender now reads a HOLDINGS of up to
    64 MiB."""
    from btrdelta.fs.btrfs import create_subvolume

    require_btrfs()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    with loop_fs("btrfs", size="1G") as rcv:
        dest = rcv / "backup"
        dest.mkdir()
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i in range(18_000):  # (3 s)
                create_subvolume(fd, f"other.20250101T{i:06d}".encode())
        finally:
            os.close(fd)
        ch = spawn_local(str(dest))
        res = replicate(src, ch, store=SendshotStore(tmp_path / "store"))
        ch.close()
        assert (res.outcome, res.kind) == ("committed", "full"), res
        assert tree_sum(dest / res.name) == tree_sum(src)
        assert len(_visible(dest)) == 18_001


def test_an_unchanged_directory_is_already_current(tmp_path: Path) -> None:
    """A plain directory sent again unchanged: its incremental carries no change, so it is
    not committed (the receiver would hold the same tree twice): exit 0, `nothing to
    send`, no new subvolume, no temporary left, the store keeps no record of it and the
    cursor stays; a change then goes as an incremental from the state held."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(os.urandom(5000))
    dest = tmp_path / "dest"
    dest.mkdir()
    cli = [sys.executable, "-m", "btrdelta", "replicate", str(src), str(dest), "--store",
           str(tmp_path / "store")]
    first = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    store = SendshotStore(tmp_path / "store")
    records = [r.digest for r in store.records_list()]
    again = subprocess.run(cli, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert again.stderr.startswith("replicate: nothing to send: the receiver holds "
                                   f"{first['name']}, the current state"), again.stderr
    assert _visible(dest) == {first["name"]}
    assert [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp")] == []
    assert [r.digest for r in store.records_list()] == records
    cursor = store.cursors()[first["receiver"]]
    assert (cursor["digest"], cursor["name"], cursor.get("inflight")) == \
        (first["sendshot"], first["name"], None)
    os.utime(src / "d" / "a", (1, 1))  # (a change of metadata only is a change)
    changed = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True,
                                        check=True).stdout)
    assert (changed["outcome"], changed["kind"], changed["base"]) == \
        ("committed", "incremental", first["sendshot"]), changed
    assert tree_sum(dest / changed["name"]) == tree_sum(src)


def _stream(records: list[object]) -> bytes:
    out = bytearray()
    w = StreamWriter(out.extend, 1)
    for r in records:
        w.write(r)  # type: ignore[arg-type]
    return bytes(out)


def _lying_sender(dest: Path, stream: bytes, plan_parent: object, *,
                  corrupt_digest: bool = False, versions: tuple[int, ...] = (1,),
                  spoke: list[int] | None = None,
                  after_end: str = "commit",
                  resume: bool = False, err: list[str] | None = None) -> tuple[str, int, str]:
    """Speak the protocol by hand to a `replicate --serve` child; (outcome, exit, stderr).
    ``after_end``: what follows the last ACK: "commit", "refuse" (a REFUSE), "close" (the
    connection closed) or "lie" (a COMMIT with another chain). ``resume``: the receiver
    holds the whole stream as a partial transfer: a PLAN resuming at its end, then
    ``after_end`` (no DATA, no CHECKPOINT). ``err``: gets the receiver's stderr."""
    ch = spawn_local(str(dest))
    io = MessageIO(ch, Connection("sender"))
    io.send(Hello("sender", versions, (), "liar", "/x"))
    io.expect(Hello)
    holdings = io.expect(Holdings)
    if resume:
        part = holdings.partial  # type: ignore[attr-defined]
        assert part is not None
        assert (part.offset, part.segments) == (len(stream), 1), part
    import io as _io

    import blake3

    from btrdelta.stream import StreamHeader, StreamReader

    first = next(ev for ev in StreamReader(_io.BytesIO(stream)).events()
                 if type(ev) is not StreamHeader)
    kind = "resume" if resume else "incremental" if plan_parent else "full"
    plan = Plan(kind, "ab" * 16, os.fsdecode(first.path), first.uuid, 1,  # type: ignore[attr-defined]
                plan_parent, "", len(stream), 1 << 20, len(stream) if resume else 0,
                1 if resume else 0)
    io.send(plan)
    got = io.expect(Accept, Refuse)
    if isinstance(got, Refuse):
        ch.close()
        return "refused-plan", ch.proc.returncode if ch.proc else -1, got.message
    if spoke is not None:
        spoke.append(io.conn.version)
    # the segment digest of the version both speak: BLAKE3 (1), XXH3-128 (2 and later)
    digest = blake3.blake3(stream).hexdigest() if io.conn.version == 1 else \
        xxhash.xxh3_128_hexdigest(stream)
    chain = chain_next("00" * 32, digest)
    if resume:  # (the chain the receiver holds: a resumed stream's own when it is the same)
        chain = part.chain
    answer: object = Ack(0, len(stream))
    if not resume:
        try:
            io.send(Data(0, stream))
            io.send(Checkpoint(0, len(stream), "00" * 32 if corrupt_digest else digest, chain))
        except PeerClosed:  # (it refused from the stream's first record and ended: its
            pass  # REFUSE is in the pipe; under load before the checkpoint was written)
        answer = io.next()
    if not isinstance(answer, Refuse):
        if after_end == "refuse":
            io.send(Refuse("refused", "the sender changed its mind"))
        elif after_end != "close":
            io.send(Commit(len(stream), "00" * 32 if after_end == "lie" else chain, ""))
            answer = io.next()
    ch.close()
    assert ch.proc is not None
    if err is not None:
        err.append(ch.err)
    return type(answer).__name__, ch.proc.returncode, getattr(answer, "message", "")


def test_a_lying_sender_gets_a_typed_refusal_and_nothing_is_applied(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    import uuid as _uuid

    u = _uuid.uuid4()
    # 1. a path that leaves the destination
    hostile = _stream([Subvol(path=b"evil", uuid=u, ctransid=1),
                       Mkfile(path=b"../../escaped", ino=257), End()])
    what, code, text = _lying_sender(dest, hostile, None)
    assert what == "Refuse"
    assert code == 9
    assert not (tmp_path / "escaped").exists()
    # 2. a segment whose digest is not the announced one
    good = _stream([Subvol(path=b"ok", uuid=u, ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x"), End()])
    what, code, text = _lying_sender(dest, good, None, corrupt_digest=True)
    assert what == "Refuse"
    assert "does not match its checkpoint" in text
    # 3. a stream for another base than the plan's
    other = _stream([Snapshot(path=b"inc", uuid=u, ctransid=2, clone_uuid=_uuid.uuid4(),
                              clone_ctransid=1), End()])
    what, code, text = _lying_sender(dest, other, None)
    assert what == "Refuse"
    assert "not the planned one" in text
    assert _visible(dest) == set()
    assert not (dest / ".btrdelta-partial").exists()
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


@pytest.mark.parametrize("after_end", ["refuse", "lie"])
def test_no_final_name_without_a_commit(tmp_path: Path, after_end: str) -> None:
    """The whole stream arrived and its last segment was acknowledged, but the sender
    refuses or sends a COMMIT that does not match: the receiver shows no subvolume under
    the final name (it used to rename it at END, before the COMMIT) and removes it."""
    import uuid as _uuid

    dest = tmp_path / "dest"
    dest.mkdir()
    good = _stream([Subvol(path=b"ok", uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 9000),
                    End()])
    what, code, text = _lying_sender(dest, good, None, after_end=after_end)
    assert what == ("Refuse" if after_end == "lie" else "Ack"), text
    assert code == (9 if after_end == "lie" else 0)
    assert _visible(dest) == set()
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
    assert not (dest / ".btrdelta-partial").exists()
    state = json.loads((dest / ".btrdelta-replica.json").read_text())
    assert state["received"] == {}
    # and the same sender, honest this time, commits under that name
    what, code, text = _lying_sender(dest, good, None)
    assert (what, code) == ("Committed", 0), text
    assert (dest / "ok" / "f").read_bytes() == b"x" * 9000


def _complete_partial(dest: Path) -> list[str]:
    """The temporary names of a partial transfer left complete (asserted so), and written
    out by the receiver the cut left alive (syncfs, then no boot id in meta.json: it is
    resumed after a restart too)."""
    meta = json.loads((dest / ".btrdelta-partial" / "meta.json").read_text())
    assert meta["complete"] is True, meta
    assert "boot" in meta, meta
    assert meta["boot"] is None, meta
    return [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


@pytest.mark.parametrize("then", ["commit", "refuse", "lie", "close"])
def test_a_cut_before_the_commit_is_resumed_without_resending(tmp_path: Path,
                                                             then: str) -> None:
    """The whole stream arrived and its last segment was acknowledged, then the connection
    is cut: nothing under the final name, but the complete subvolume stays as a partial
    transfer acknowledged to the stream's end (it used to be removed: the whole stream
    again). The next PLAN resumes at the end: no DATA, the COMMIT, the final name; a REFUSE
    or a COMMIT that does not match then removes it; another cut keeps it."""
    import uuid as _uuid

    dest = tmp_path / "dest"
    dest.mkdir()
    good = _stream([Subvol(path=b"ok", uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 9000),
                    End()])
    what, code, text = _lying_sender(dest, good, None, after_end="close")
    assert (what, code) == ("Ack", 0), text
    assert _visible(dest) == set()
    [tmp] = _complete_partial(dest)
    assert (dest / tmp / "f").read_bytes() == b"x" * 9000
    state = json.loads((dest / ".btrdelta-replica.json").read_text())
    assert state["received"] == {}
    what, code, text = _lying_sender(dest, good, None, after_end=then, resume=True)
    if then == "commit":
        assert (what, code) == ("Committed", 0), text
        assert _visible(dest) == {"ok"}
        assert (dest / "ok" / "f").read_bytes() == b"x" * 9000
        assert not (dest / ".btrdelta-partial").exists()
        assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
        state = json.loads((dest / ".btrdelta-replica.json").read_text())
        assert state["received"] == {"ok": None}
        return
    assert _visible(dest) == set()
    if then == "close":
        assert _complete_partial(dest) == [tmp]
        what, code, text = _lying_sender(dest, good, None, resume=True)
        assert (what, code) == ("Committed", 0), text
    else:
        assert what == ("Refuse" if then == "lie" else "Ack"), text
        assert not (dest / ".btrdelta-partial").exists()
        assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
        what, code, text = _lying_sender(dest, good, None)
        assert (what, code) == ("Committed", 0), text
    assert (dest / "ok" / "f").read_bytes() == b"x" * 9000


def _ok_stream(name: bytes = b"ok") -> bytes:
    import uuid as _uuid

    return _stream([Subvol(path=name, uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 9000),
                    End()])


def test_a_resume_must_name_the_stream_the_partial_transfer_holds(tmp_path: Path) -> None:
    """The session id is in the HOLDINGS any peer allowed to connect reads, and a resumed
    stream's first record (name, UUID, base: checked against the first PLAN) is not sent
    again: a PLAN resuming that session under another name and UUID (with the chain the
    HOLDINGS gave) was taken, and the partial transfer of the first stream was committed
    as the second (its name, its received UUID). It is refused now (``diverged``: what an
    honest sender's stream made again from a changed directory gets too) and dropped."""
    dest = tmp_path / "dest"
    dest.mkdir()
    good = _ok_stream()
    assert _lying_sender(dest, good, None, after_end="close")[0] == "Ack"
    _complete_partial(dest)
    other = _ok_stream(b"no")  # as long: the PLAN's resume point matches
    what, _code, text = _lying_sender(dest, other, None, resume=True)
    assert what == "refused-plan", text
    assert "not the partial transfer's" in text, text
    assert _visible(dest) == set()
    assert not (dest / ".btrdelta-partial").exists()
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
    what, code, text = _lying_sender(dest, good, None)
    assert (what, code) == ("Committed", 0), text
    assert _visible(dest) == {"ok"}
    assert (dest / "ok" / "f").read_bytes() == b"x" * 9000


def test_a_directory_changed_after_a_cut_is_sent_again_whole(tmp_path: Path) -> None:
    """A plain directory's stream is made again for a resume from the directory as it is
    now: changed after the cut, the stream has another UUID (a digest of the content) and
    the receiver refuses its PLAN (``diverged``; the partial transfer dropped); the sender
    forgets the session and says ``diverged`` (the CLI then starts a new conversation),
    and the next run sends the directory whole. (A receiver refusing the PLAN as a
    ``protocol`` error left the sender resuming that session at every run.)"""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "big").write_bytes(random.Random(7).randbytes(6 * SEG))
    store = SendshotStore(tmp_path / "store")
    cut = _Cut(spawn_local(str(dest)), int(2.5 * SEG))
    with pytest.raises(TransportError):
        replicate(src, cut, store=store, segment=SEG)
    cut.close()
    (src / "small").write_bytes(b"changed after the cut")
    outcomes = []
    for _ in range(2):
        ch = spawn_local(str(dest))
        res = replicate(src, ch, store=store, segment=SEG)
        ch.close()
        outcomes.append((res.outcome, res.kind))
    assert outcomes == [("diverged", "resume"), ("committed", "full")], outcomes
    assert tree_sum(_newest(dest)) == tree_sum(src)
    assert not (dest / ".btrdelta-partial").exists()


@pytest.mark.parametrize("damage", ["torn", "empty", "not-an-object", "no-offset"])
def test_a_damaged_partial_meta_is_discarded_with_a_warning(
        tmp_path: Path, damage: str) -> None:
    """meta.json torn by a power cut (it was written in place of a temporary name, without
    fsync) or otherwise not one the receiver wrote: the partial transfer and its temporary
    subvolume are discarded and a warning names the file (it was read as "no partial
    transfer" silently, and its temporary subvolume stayed behind when the next transfer was
    of another stream); the next transfer commits."""
    dest = tmp_path / "dest"
    dest.mkdir()
    what, _code, text = _lying_sender(dest, _ok_stream(), None, after_end="close")
    assert what == "Ack", text
    [tmp] = _complete_partial(dest)
    meta = dest / ".btrdelta-partial" / "meta.json"
    text = meta.read_text()
    meta.write_text({"torn": text[:len(text) // 2], "empty": "", "not-an-object": "[1]",
                     "no-offset": text.replace('"offset"', '"offzet"')}[damage])
    errs: list[str] = []
    what, code, text = _lying_sender(dest, _ok_stream(b"other"), None, err=errs)
    assert (what, code) == ("Committed", 0), text
    [err] = errs
    assert "discarded a damaged partial transfer" in err, err
    assert str(meta) in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (dest / tmp).exists()
    assert _visible(dest) == {"other"}
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


def test_a_partial_meta_never_names_a_path_outside_its_temporary_names(tmp_path: Path) -> None:
    """A meta.json that parses but names another path as its temporary subvolume (here a
    directory beside DEST) is damaged: discarded, and that path left alone (dropping the
    partial transfer removed whatever it named)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    assert _lying_sender(dest, _ok_stream(), None, after_end="close")[0] == "Ack"
    meta = dest / ".btrdelta-partial" / "meta.json"
    doc = json.loads(meta.read_text())
    doc["tmp"] = "../victim"
    meta.write_text(json.dumps(doc))
    what, code, text = _lying_sender(dest, _ok_stream(b"other"), None)
    assert (what, code) == ("Committed", 0), text
    assert (victim / "keep").read_text() == "mine"
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


@pytest.mark.btrfs
def test_no_final_name_without_a_commit_on_btrfs(fs2: tuple[Path, Path]) -> None:
    """The same on btrfs: the complete subvolume (read-only, received UUID set) is deleted."""
    import uuid as _uuid

    _snd, dest = fs2
    good = _stream([Subvol(path=b"ok", uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 9000),
                    End()])
    what, code, text = _lying_sender(dest, good, None, after_end="refuse")
    assert (what, code) == ("Ack", 0), text
    assert _visible(dest) == set()
    assert _sh("btrfs", "subvolume", "list", dest).strip() == ""
    what, code, text = _lying_sender(dest, good, None)
    assert (what, code) == ("Committed", 0), text
    assert (dest / "ok" / "f").read_bytes() == b"x" * 9000


@pytest.mark.btrfs
@pytest.mark.parametrize("then", ["refuse", "lie"])
def test_a_cut_kept_subvolume_refused_is_deleted_on_btrfs(fs2: tuple[Path, Path],
                                                          then: str) -> None:
    """On btrfs, a complete subvolume a cut kept (read-only, received UUID set) is deleted
    when the resuming sender refuses or sends a COMMIT that does not match."""
    import uuid as _uuid

    _snd, dest = fs2
    good = _stream([Subvol(path=b"ok", uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 9000),
                    End()])
    what, code, text = _lying_sender(dest, good, None, after_end="close")
    assert (what, code) == ("Ack", 0), text
    [tmp] = _complete_partial(dest)
    assert _sh("btrfs", "property", "get", "-ts", dest / tmp, "ro").strip() == "ro=true"
    assert _visible(dest) == set()
    what, code, text = _lying_sender(dest, good, None, after_end=then, resume=True)
    assert what == ("Refuse" if then == "lie" else "Ack"), text
    assert _visible(dest) == set()
    assert _sh("btrfs", "subvolume", "list", dest).strip() == ""
    assert not (dest / ".btrdelta-partial").exists()


def test_the_replica_state_is_replaced_whole_and_durably(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """DEST/.btrdelta-replica.json was written with write_text under a predictable temporary
    name (followed if planted as a symlink) and never fsync-ed: a power cut could leave a
    torn state that refuses every later transfer. Now as fs.atomic writes files."""
    from btrdelta.update.replica import Replica

    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (dest / f".btrdelta-replica.json.tmp-{os.getpid()}").symlink_to(victim)
    synced = spy_fsync(monkeypatch)
    replica = Replica(dest)  # a new destination: its state is written
    assert victim.read_text() == "untouched"
    state = json.loads((dest / ".btrdelta-replica.json").read_text())
    assert state == {"version": 1, "id": replica.ident, "received": {}}
    # the file's bytes, again once linked (btrfs persists nothing of a file without links:
    # fs.atomic), then the directory: those two by a thread, waited for before the ACCEPT
    replica._durable()
    assert len(synced) == 3
    assert synced[0] != str(dest)
    assert synced[1] == str(dest / ".btrdelta-replica.json")
    assert synced[2] == str(dest)
    replica._durable()  # (once)
    assert len(synced) == 3


def test_a_new_destinations_state_is_durable_before_the_accept_not_the_hello(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new DEST's state file is named at once (its id is what the HELLO says) and made
    durable by a thread, waited for before the ACCEPT (``_durable``), not before the HELLO
    and the HOLDINGS; what its ``fsync`` raised is raised there."""
    import errno
    import threading

    from btrdelta.update.replica import Replica

    dest = tmp_path / "dest"
    dest.mkdir()
    gate, fail = threading.Event(), []
    fsync = os.fsync

    def slow(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(dest):
            assert gate.wait(5)
            if fail:
                raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow)
    replica = Replica(dest)  # returns while DEST's fsync waits
    assert replica.holdings().held == ()  # (what the HELLO and the HOLDINGS need)
    assert replica._syncing is not None
    gate.set()
    replica._durable()
    assert replica._syncing is None
    # a failing fsync: raised before the ACCEPT (the conversation fails, nothing applied)
    other = tmp_path / "other"
    other.mkdir()
    dest, fail[:] = other, [True]
    replica = Replica(other)
    with pytest.raises(OSError, match="Input/output error"):
        replica._durable()


@pytest.mark.parametrize("versions", [(1,), (1, 2), (2,), (3,), (2, 3, 4), (4, 5), (5,)])
def test_segment_digests_of_each_protocol_version(tmp_path: Path,
                                                  versions: tuple[int, ...]) -> None:
    import uuid as _uuid

    dest = tmp_path / "dest"
    dest.mkdir()
    good = _stream([Subvol(path=b"ok", uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x" * 9000),
                    End()])
    spoke: list[int] = []
    what, code, text = _lying_sender(dest, good, None, versions=versions, spoke=spoke)
    assert (what, code, spoke) == ("Committed", 0, [max(versions)]), text
    assert (dest / "ok" / "f").read_bytes() == b"x" * 9000
    # a partial transfer is offered for resuming only under the version it was digested in
    part = dest / ".btrdelta-partial"
    part.mkdir()
    (part / "meta.json").write_text(json.dumps({"version": 2, "session": "ab" * 16,
                                                "offset": 0, "segments": 0,
                                                "chain": "00" * 32, "protocol": 1}))
    from btrdelta.update.replica import Replica

    assert Replica(dest).holdings(1).partial is not None
    assert Replica(dest).holdings(2).partial is None


def test_a_receiver_without_xxhash_speaks_version_1(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare install (no [make] extra) receives with BLAKE3 segment digests."""
    import uuid as _uuid

    from btrdelta.protocol import messages

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\nclass _B:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'xxhash':\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, _B())\n")
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), str(root)]))
    dest = tmp_path / "dest"
    dest.mkdir()
    good = _stream([Subvol(path=b"ok", uuid=_uuid.uuid4(), ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"y" * 5000),
                    End()])
    spoke: list[int] = []
    what, code, text = _lying_sender(dest, good, None, versions=(1, 2), spoke=spoke)
    assert (what, code, spoke) == ("Committed", 0, [1]), text
    assert json.loads((dest / ".btrdelta-replica.json").read_text())["received"] == {"ok": None}
    assert messages.spoken() == (1, 2, 3, 4, 5)

    def missing(name: str) -> None:
        raise messages.MissingDependencyError(name, "make")

    monkeypatch.setattr(messages, "need", missing)
    assert messages.spoken() == (1,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keys(tmp: Path, name: str) -> tuple[Path, Path]:
    subprocess.run([sys.executable, "-m", "btrdelta", "key", "generate", "-o",
                    str(tmp / name)], check=True, capture_output=True)
    return tmp / f"{name}.key", tmp / f"{name}.pub"


def _cli(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "btrdelta", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=timeout)


def _listen(children: Children, port: int, dest: Path, *extra: object
            ) -> subprocess.Popen[str]:
    proc = children.start([sys.executable, "-m", "btrdelta", "replicate", "--listen",
                           f"127.0.0.1:{port}", *map(str, extra), str(dest)],
                          stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert "listening" in proc.stderr.readline()
    return proc


def test_tcp_peers_must_authenticate(tmp_path: Path, children: Children) -> None:
    skey, spub = _keys(tmp_path, "server")
    ckey, cpub = _keys(tmp_path, "client")
    okey, _opub = _keys(tmp_path, "other")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"data" * 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    port = _free_port()
    srv = _listen(children, port, dest, "--key", skey, "--allow", cpub)
    try:
        store = ["--store", tmp_path / "store"]
        url = f"tcp://127.0.0.1:{port}"
        wrong_key = _cli("replicate", src, url, "--key", okey, "--peer", spub, *store)
        assert wrong_key.returncode == 5, wrong_key.stderr
        assert "does not allow key" in wrong_key.stderr
        wrong_pin = _cli("replicate", src, url, "--key", ckey, "--peer", cpub, *store)
        assert wrong_pin.returncode == 5, wrong_pin.stderr
        assert "is not the pinned key" in wrong_pin.stderr
        plain = _cli("replicate", src, url, "--no-auth", *store, timeout=30)
        assert plain.returncode != 0
        assert sorted(os.listdir(dest)) == [".btrdelta-replica.json"]  # nothing touched
        ok = _cli("replicate", src, url, "--key", ckey, "--peer", spub, *store)
        assert ok.returncode == 0, ok.stderr
        (got,) = _visible(dest)
        assert tree_sum(dest / got) == tree_sum(src)
    finally:
        srv.terminate()
        _, said = srv.communicate()
    # the server's lines: each names the client once, and says why in words (it said the
    # address twice, and the TLS library's 'EOF occurred in violation of protocol' for a
    # client pinning another server key, '[SSL: WRONG_VERSION_NUMBER]' for one without TLS)
    lines = [line for line in said.splitlines() if line.startswith("replicate: 127.0.0.1:")]
    assert all(line.count("127.0.0.1:") == 1 for line in lines), lines
    assert any(line.endswith(" is not allowed") for line in lines), lines
    assert any(line.endswith("authentication failed: the client hung up (does it pin another "
                             "server key with --peer?)") for line in lines), lines
    assert any(line.endswith("TLS handshake failed: the client does not speak TLS (a "
                             "--no-auth client?)") for line in lines), lines
    # --no-auth off loopback is a usage mistake (exit 2; it was 1)
    nonloop = _cli("replicate", "--listen", "0.0.0.0:1", "--no-auth", dest)
    assert nonloop.returncode == 2
    assert "only allowed on a loopback address" in nonloop.stderr
    assert _cli("replicate", src, "tcp://10.1.2.3:9", "--no-auth").returncode == 2


def test_unauthenticated_loopback(tmp_path: Path, children: Children) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 10)
    dest = tmp_path / "dest"
    dest.mkdir()
    port = _free_port()
    srv = _listen(children, port, dest, "--no-auth", "--once")
    ok = _cli("replicate", src, f"tcp://127.0.0.1:{port}", "--no-auth", "--store",
              tmp_path / "store", "--json")
    assert ok.returncode == 0, ok.stderr
    assert srv.wait(timeout=30) == 0
    srv.communicate()
    assert '"outcome": "committed"' in ok.stdout


@pytest.mark.btrfs
def test_a_listener_with_nothing_to_receive_says_so(fs2: tuple[Path, Path],
                                                    tmp_path: Path, children: Children) -> None:
    """A subvolume replicated again unchanged: the sender says 'nothing to send' and exits
    0; the listener said 'refused, 0 bytes received already-current: ...' and with --once
    exited 9. It says 'nothing to receive' and exits 0."""
    snd, rcv = fs2
    live = snd / "live"
    _sh("btrfs", "-q", "subvolume", "create", live)
    (live / "a").write_bytes(os.urandom(10_000))
    dest = rcv / "dest"
    dest.mkdir()
    store = ["--store", tmp_path / "store"]
    for round_ in ("first", "again"):
        port = _free_port()
        srv = _listen(children, port, dest, "--no-auth", "--once")
        sent = _cli("replicate", live, f"tcp://127.0.0.1:{port}", "--no-auth", *store)
        assert sent.returncode == 0, sent.stderr
        assert srv.wait(timeout=30) == 0
        said = srv.communicate()[1]
        if round_ == "again":
            assert "replicate: nothing to send: the receiver holds " in sent.stderr
            (got,) = _visible(dest)
            assert said.startswith("replicate: 127.0.0.1:"), said
            assert f"(anonymous): nothing to receive: the receiver holds {got}" in said
        else:
            assert "committed" in said


def test_receivers_keep_their_own_cursors(tmp_path: Path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    for d in (src, other):
        d.mkdir()
        (d / "a").write_bytes(os.urandom(40_000))
    store = SendshotStore(tmp_path / "store")
    from btrdelta.send.sendshot import send_with_sendshots

    mine = send_with_sendshots(bytearray().extend, other, store=store).recorded
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()

    def rep(dest: Path) -> object:
        ch = spawn_local(str(dest))
        try:
            return replicate(src, ch, store=store)
        finally:
            ch.close()

    assert rep(d1).kind == "full"  # type: ignore[attr-defined]
    (src / "b").write_bytes(b"b" * 30_000)
    assert rep(d2).kind == "full"  # type: ignore[attr-defined]
    (src / "c").write_bytes(b"c" * 30_000)
    r1 = rep(d1)
    assert r1.kind == "incremental"  # type: ignore[attr-defined]
    assert tree_sum(_newest(d1)) == tree_sum(src)
    r2 = rep(d2)
    assert r2.kind == "incremental"  # type: ignore[attr-defined]
    cursors = store.cursors()
    assert len(cursors) == 2
    kept = {s.digest for s in store.records_list()}
    assert {c["digest"] for c in cursors.values()} <= kept
    assert mine is not None
    assert mine.digest in kept  # another source's sendshot is not pruned
    assert len(kept) == 3  # one held by each receiver, and the other source's


def test_cursors_are_replaced_whole_and_durably(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """cursors.json was written under a predictable temporary name and renamed without an
    fsync of the store: a power cut could take a cursor back (and then prune what the
    receiver holds). Now as fs.atomic writes files: the file, then the directory."""
    store = SendshotStore(tmp_path / "store")
    store.edit_cursor("r1", lambda _: ("ab" * 32, {}))
    synced = spy_fsync(monkeypatch)
    store.edit_cursor("r2", lambda _: ("cd" * 32, {"inflight": {"session": "s"}}))
    assert len(synced) == 2, synced
    assert synced[1] == store.path
    assert {k: v["digest"] for k, v in store.cursors().items()} == \
        {"r1": "ab" * 32, "r2": "cd" * 32}
    assert sorted(os.listdir(store.path)) == [".lock", "cursors.json", "records"]


def test_a_durable_record_is_named_durably(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A record replicate writes (durable) was fsync-ed and renamed, but records/ was never
    fsync-ed: the cursor written after it could name a record a power cut took back."""
    from btrdelta.send.sendshot import send_with_sendshots

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    store = SendshotStore(tmp_path / "store")
    synced = spy_fsync(monkeypatch)
    got = send_with_sendshots(bytearray().extend, src, store=store).recorded
    assert got is not None
    assert synced[-1] == store.records, synced


class _Kill(_Cut):
    """A channel whose receiver is killed (SIGKILL) once ``limit`` bytes were written."""

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.limit:
            assert self.inner.proc is not None
            self.inner.proc.kill()
            self.inner.proc.wait()
            raise TransportError("receiver killed by the test")
        self.written += len(data)
        self.inner.write(data)


def _cut_transfer(tmp_path: Path, small: int, big: int
                  ) -> tuple[Path, SendshotStore, Path, _Kill]:
    """A replication of ``small`` small files and a file of ``big`` segments whose receiver
    is killed after 2.5 segments (records being applied): source, store, DEST, the cut
    channel."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(small):
        (src / "d" / f"s{i}").write_bytes(os.urandom(i * 997))
    (src / "big").write_bytes(os.urandom(big * SEG))
    store = SendshotStore(tmp_path / "store")
    dest = tmp_path / "dest"
    dest.mkdir()
    kill = _Kill(spawn_local(str(dest)), int(2.5 * SEG))
    with pytest.raises(TransportError):
        replicate(src, kill, store=store, segment=SEG)
    kill.close()
    return src, store, dest, kill


def test_a_killed_receiver_resumes_with_one_segment_resent(tmp_path: Path) -> None:
    src, store, dest, kill = _cut_transfer(tmp_path, 40, 5)
    assert _visible(dest) == set()
    # the records applied are counted in the partial transfer, the subvolume left for it
    meta = json.loads((dest / ".btrdelta-partial" / "meta.json").read_text())
    assert PartialTransfer(dest, "dir").applied() >= meta["records"] > 0
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind) == ("committed", "resume"), res
    assert res.resumed_from >= SEG
    assert kill.written - res.resumed_from <= SEG + 64 * 1024  # resent at most one segment
    assert tree_sum(_newest(dest)) == tree_sum(src)
    assert not (dest / ".btrdelta-partial").exists()
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


def test_a_partial_transfer_of_an_earlier_boot_is_discarded(tmp_path: Path) -> None:
    """A receiver killed (or without power) leaves a partial transfer whose records were
    applied and counted but not necessarily written out: meta.json names the boot it was
    written in, and after a restart (another boot id) the partial transfer is discarded
    with a warning and sent again whole; before, it was resumed after the records its
    progress file counted, which a power cut may have lost from the disk."""
    src, store, dest, _kill = _cut_transfer(tmp_path, 20, 3)
    meta_path = dest / ".btrdelta-partial" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["offset"] >= SEG, meta
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert meta["boot"] == f.read().strip()
    meta["boot"] = "0" * 8 + "-0000-4000-8000-" + "0" * 12  # the machine restarted
    meta_path.write_text(json.dumps(meta))
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind, res.resumed_from) == ("committed", "full", 0), res
    assert "earlier boot" in ch.err, ch.err
    assert tree_sum(_newest(dest)) == tree_sum(src)
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]


def test_leftovers_deeper_than_the_recursion_limit_are_removed(deep_tmp_path: Path) -> None:
    """An abandoned partial transfer and a dead receiver's temporary tree, both deeper than
    Python's recursion limit (``shutil.rmtree`` dies on them), go before a new transfer."""
    import uuid as _uuid

    from tests.fs.test_remove import _deep

    dest = deep_tmp_path / "dest"
    dest.mkdir()
    u = _uuid.uuid4()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in (".btrdelta-partial", f".btrdelta-tmp-{u.hex[:12]}-{dead}"):
        (dest / name).mkdir()
        _deep(dest / name, sys.getrecursionlimit() + 200)
    good = _stream([Subvol(path=b"ok", uuid=u, ctransid=1),
                    Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x"), End()])
    what, code, text = _lying_sender(dest, good, None)
    assert (what, code) == ("Committed", 0), text
    assert (dest / "ok" / "f").read_bytes() == b"x"
    assert not [n for n in os.listdir(dest) if n.startswith((".btrdelta-tmp-",
                                                               ".btrdelta-partial"))]


def _cut_before_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender's connection is cut as it would send the COMMIT (every ACK read)."""
    real = MessageIO.send

    def send(self: MessageIO, msg: object) -> None:
        if isinstance(msg, Commit):
            raise TransportError("cut by the test before the COMMIT")
        real(self, msg)  # type: ignore[arg-type]

    monkeypatch.setattr(MessageIO, "send", send)


def _replicate_cut_before_commit(src: Path, dest: Path, store: SendshotStore) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _cut_before_commit(mp)
        ch = spawn_local(str(dest))
        with pytest.raises(TransportError):
            replicate(src, ch, store=store, segment=SEG)
        ch.close()


def _resume_after_a_cut_before_commit(src: Path, dest: Path, store: SendshotStore) -> None:
    before = _visible(dest)
    _replicate_cut_before_commit(src, dest, store)
    assert _visible(dest) == before  # nothing under a final name
    assert len(_complete_partial(dest)) == 1
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind) == ("committed", "resume"), res
    assert res.sent == 0, res  # nothing resent
    assert res.resumed_from == res.size > 0, res
    assert tree_sum(_newest(dest)) == tree_sum(src)
    assert not (dest / ".btrdelta-partial").exists()
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
    # the cursor names the committed sendshot, nothing in flight; the state the same
    [cursor] = store.cursors().values()
    assert cursor["digest"] == res.sendshot, cursor
    assert not cursor.get("inflight"), cursor
    state = json.loads((dest / ".btrdelta-replica.json").read_text())
    assert state["received"][res.name] == res.sendshot


def test_a_sender_cut_before_its_commit_resumes_with_nothing_resent(tmp_path: Path) -> None:
    """`replicate` cut after the last ACK, before its COMMIT: the next one resumes at the
    stream's end (no byte resent), commits, and the cursor and state name the sendshot;
    the incremental after it too."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 * SEG))
    (src / "small").write_bytes(b"s" * 5000)
    store = SendshotStore(tmp_path / "store")
    dest = tmp_path / "dest"
    dest.mkdir()
    _aged(src)
    _resume_after_a_cut_before_commit(src, dest, store)
    (src / "small").write_bytes(b"t" * 7000)
    _aged(src)
    _resume_after_a_cut_before_commit(src, dest, store)


def _aged(src: Path) -> None:
    """Atimes two days before the mtimes, which relatime moves at the next read: a send
    that moved them would make another stream on the resume (the sender would say diverged:
    a plain directory is read live, not from a snapshot); a send reads without moving them."""
    for p in [src, *src.iterdir()]:
        st = p.stat()
        os.utime(p, ns=(st.st_mtime_ns - 2 * 86_400 * 10**9, st.st_mtime_ns))


@pytest.mark.btrfs
def test_a_sender_cut_before_its_commit_resumes_on_btrfs(fs2: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """The same on loop btrfs, a writable source subvolume (read from the session's
    snapshot): the complete subvolume is kept read-only with its received UUID set, then
    renamed; the sender keeps no snapshot after."""
    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    (live / "big").write_bytes(os.urandom(3 * SEG))
    store = SendshotStore(tmp_path / "store")
    dest = rcv / "backup"
    dest.mkdir()
    _replicate_cut_before_commit(live, dest, store)
    [tmp] = _complete_partial(dest)
    assert _sh("btrfs", "property", "get", "-ts", dest / tmp, "ro").strip() == "ro=true"
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind, res.sent) == ("committed", "resume", 0), res
    got = _newest(dest)
    assert tree_sum(got) == tree_sum(live)
    assert _sh("btrfs", "property", "get", "-ts", got, "ro").strip() == "ro=true"
    assert [ln.split()[-1] for ln in _sh("btrfs", "subvolume", "list", snd).splitlines()] \
        == ["vol"]
    (live / "more").write_bytes(b"m" * 10000)
    _resume_after_a_cut_before_commit(live, dest, store)


def _replicate_cut_before_committed(src: Path, dest: Path, store: SendshotStore) -> str:
    """`replicate` whose connection is cut after its COMMIT went out, before COMMITTED
    came back: the receiver commits (the subvolume under its final name, the state naming
    its sendshot), the sender never hears it. Returns the sendshot that run recorded."""
    real = MessageIO.expect

    def expect(self: MessageIO, *kinds: type) -> object:
        if Committed in kinds:
            raise TransportError("cut by the test after the COMMIT")
        return real(self, *kinds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MessageIO, "expect", expect)
        ch = spawn_local(str(dest))
        with pytest.raises(TransportError):
            replicate(src, ch, store=store, segment=SEG)
        ch.close()  # (waits for the receiver: it read the COMMIT before the cut)
    newest = store.records_list()[-1].digest
    state = json.loads((dest / ".btrdelta-replica.json").read_text())
    assert newest in state["received"].values(), state  # the receiver committed it
    return newest


def _rep(src: Path, dest: Path, store: SendshotStore) -> object:
    ch = spawn_local(str(dest))
    try:
        return replicate(src, ch, store=store, segment=SEG)
    finally:
        ch.close()


def test_a_cut_after_the_commit_is_adopted_not_resent(tmp_path: Path) -> None:
    """The connection drops after the receiver gave the subvolume its final name, before
    the sender saw COMMITTED: the sender's cursor had not moved, so another receiver's
    commit pruned the sendshot this receiver now holds and the next run was refused
    (diverged: a subvolume newer than the base, unknown to the sender). Now the cursor
    names that sendshot before the COMMIT (prune keeps it), and the next run adopts it from
    the HOLDINGS: the cursor moves to it, the next stream is an incremental from it, the
    receiver holds each state once."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 * SEG))
    store = SendshotStore(tmp_path / "store")
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    first = _rep(src, d1, store)
    assert first.outcome == "committed", first  # type: ignore[attr-defined]
    (src / "small").write_bytes(b"s" * 5000)
    cut = _replicate_cut_before_committed(src, d1, store)
    assert len(_visible(d1)) == 2
    held = tree_sum(_newest(d1))
    assert held == tree_sum(src)
    # meanwhile another receiver commits twice (each commit prunes)
    for i in range(2):
        assert _rep(src, d2, store).outcome == "committed"  # type: ignore[attr-defined]
        (src / f"d2-{i}").write_bytes(b"x" * (1000 + i))
    assert cut in {s.digest for s in store.records_list()}  # kept for the first receiver
    res = _rep(src, d1, store)
    assert (res.outcome, res.kind, res.base) == ("committed", "incremental", cut), res
    assert res.adopted == sorted(_visible(d1))[1], res  # type: ignore[attr-defined]
    assert res.size < SEG, res  # type: ignore[attr-defined]  # not the whole tree again
    assert len(_visible(d1)) == 3
    assert tree_sum(_newest(d1)) == tree_sum(src)
    assert tree_sum(d1 / res.adopted) == held  # type: ignore[attr-defined]
    cursor = store.cursors()[Replica(d1).ident]
    assert cursor["digest"] == res.sendshot, cursor  # type: ignore[attr-defined]
    assert not cursor.get("inflight"), cursor


@pytest.mark.btrfs
def test_a_cut_after_the_commit_is_adopted_on_btrfs(fs2: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """The same on loop btrfs, a writable source subvolume: the next run (nothing written
    since) adopts the committed subvolume, says already-current, and the sender keeps no
    session snapshot; it used to keep the cursor behind and the session's snapshot (a
    whole subvolume) for good. Then an incremental from the adopted state."""
    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    (live / "big").write_bytes(os.urandom(3 * SEG))
    store = SendshotStore(tmp_path / "store")
    dest = rcv / "backup"
    dest.mkdir()
    cut = _replicate_cut_before_committed(live, dest, store)
    [name] = _visible(dest)
    assert _sh("btrfs", "property", "get", "-ts", dest / name, "ro").strip() == "ro=true"
    res = _rep(live, dest, store)
    assert res.outcome == "refused", res  # type: ignore[attr-defined]
    assert "already-current" in res.message, res  # type: ignore[attr-defined]
    assert res.adopted == name, res  # type: ignore[attr-defined]
    assert _visible(dest) == {name}
    cursor = store.cursors()[Replica(dest).ident]
    assert cursor["digest"] == cut, cursor
    assert not cursor.get("inflight"), cursor
    assert [ln.split()[-1] for ln in _sh("btrfs", "subvolume", "list", snd).splitlines()] \
        == ["vol"]
    # the CLI: nothing to send is said as such, exit 0 (it said "refused: already-current")
    again = _cli("replicate", live, dest, "--store", store.path)
    assert again.returncode == 0, again.stderr
    assert again.stderr == (f"replicate: nothing to send: the receiver holds {name}, the "
                            "current state\n"), again.stderr
    (live / "more").write_bytes(b"m" * 10000)
    res = _rep(live, dest, store)
    assert (res.outcome, res.kind, res.base) == ("committed", "incremental", cut), res
    assert res.size < SEG, res  # type: ignore[attr-defined]
    assert tree_sum(_newest(dest)) == tree_sum(live)


def test_one_conversation_at_a_time_on_a_destination(tmp_path: Path,
                                                     children: Children) -> None:
    """Two receivers on one DEST (a `--serve` in a conversation, then another `--serve` or a
    `--listen`) would share its partial transfer: the second is refused (`busy`, exit 9,
    one line naming the process that holds DEST), nothing is touched; once the first ends
    (here killed: the lock goes with it) the next replication commits."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"data" * 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    store = ["--store", tmp_path / "store"]
    first = spawn_local(str(dest))
    try:
        _busy(children, first, src, dest, store)
    finally:
        assert first.proc is not None
        first.proc.kill()
        first.close()
    ok = _cli("replicate", src, dest, *store)
    assert ok.returncode == 0, ok.stderr
    (got,) = _visible(dest)
    assert tree_sum(dest / got) == tree_sum(src)


def test_two_new_receivers_agree_on_the_destinations_id(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Two receivers starting on a new DEST at once each made an id and wrote it over the
    other's: the one that lost said its own id in its HELLO, so the sender's cursor for it
    named a receiver that no longer exists. The state file is created, never replaced, and
    the loser reads the winner's id."""
    from btrdelta.fs.atomic import create_file
    from btrdelta.update import replica as mod

    dest = tmp_path / "dest"
    dest.mkdir()
    first = json.dumps({"version": 1, "id": "f" * 32, "received": {}}).encode()
    link = mod.link_written

    def racing(fd: int, tmp: str | None, dir_fd: int, name: str, **kw: bool) -> bool:
        assert create_file(dir_fd, name, first)  # the other receiver was faster
        return link(fd, tmp, dir_fd, name, **kw)

    monkeypatch.setattr(mod, "link_written", racing)
    assert mod.Replica(dest).ident == "f" * 32
    assert json.loads((dest / ".btrdelta-replica.json").read_text())["id"] == "f" * 32


def test_a_receiver_waits_for_one_that_is_closing(tmp_path: Path) -> None:
    """A receiver whose sender was cut off writes its partial transfer out (a syncfs) while
    it still holds DEST: it says `closing` in the lock file, and a sender re-run at once
    is served when it is done instead of being refused `busy` (test_replicate_kill's
    re-runs after a kill -9 were refused so at load 12)."""
    import fcntl
    import threading
    import time

    from btrdelta.update.replicalock import LOCK_FILE

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"data" * 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    fd = os.open(dest / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()} closing\n".encode(), 0)
    timer = threading.Timer(1.5, os.close, (fd,))
    timer.start()
    t0 = time.monotonic()
    ok = _cli("replicate", src, dest, "--store", tmp_path / "store")
    timer.join()
    assert ok.returncode == 0, ok.stderr
    assert time.monotonic() - t0 >= 1.5
    (got,) = _visible(dest)
    assert tree_sum(dest / got) == tree_sum(src)


def test_a_closing_mark_left_by_a_full_disk_is_not_waited_for(tmp_path: Path) -> None:
    """A receiver in a conversation whose lock file still says `PID closing` (its process's
    previous conversation wrote it; on a full disk this one could not write its pid over
    it): a second receiver is refused `busy` at once, not after CLOSING_WAIT (60 s)."""
    import time

    from btrdelta.update.replicalock import CLOSING_WAIT, LOCK_FILE

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"data" * 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    first = spawn_local(str(dest))
    try:
        io = MessageIO(first, Connection("sender", source="test"))
        io.send(Hello("sender", (1, 2, 3), (), "test", str(src)))
        io.expect(Hello)
        io.expect(Holdings)  # the first receiver holds DEST, waiting for a PLAN
        assert first.proc is not None
        (dest / LOCK_FILE).write_text(f"{first.proc.pid} closing\n")  # (what a full disk left)
        t0 = time.monotonic()
        second = _cli("replicate", src, dest, "--store", tmp_path / "store")
        took = time.monotonic() - t0
        assert second.returncode == 9, second.stderr
        assert f"busy: {dest} is receiving another transfer (process {first.proc.pid})" \
            in second.stderr, second.stderr
        assert took < CLOSING_WAIT / 3, took
    finally:
        assert first.proc is not None
        first.proc.kill()
        first.close()


def _busy(children: Children, first: PipeChannel, src: Path, dest: Path,
          store: list[object]) -> None:
    io = MessageIO(first, Connection("sender", source="test"))
    io.send(Hello("sender", (1, 2, 3), (), "test", str(src)))
    io.expect(Hello)
    io.expect(Holdings)  # the first receiver holds DEST, waiting for a PLAN
    assert first.proc is not None
    before = sorted(os.listdir(dest))
    second = _cli("replicate", src, dest, *store)
    assert second.returncode == 9, second.stderr
    assert len(second.stderr.splitlines()) == 1, second.stderr
    [line] = second.stderr.splitlines()
    assert line.startswith("btrdelta replicate: error: "), line
    assert f"busy: {dest} is receiving another transfer (process {first.proc.pid})" in line
    port = _free_port()
    srv = _listen(children, port, dest, "--no-auth", "--once")
    listened = _cli("replicate", src, f"tcp://127.0.0.1:{port}", "--no-auth", *store)
    assert listened.returncode == 9, listened.stderr
    assert "busy" in listened.stderr
    assert srv.wait(timeout=30) == 9
    srv.communicate()
    served = spawn_local(str(dest))  # the receiving side's own line and exit code
    io = MessageIO(served, Connection("sender", source="test"))
    io.send(Hello("sender", (1, 2, 3), (), "test", str(src)))
    io.expect(Hello)
    with pytest.raises(PeerRefused, match="busy"):
        io.expect(Holdings)
    served.close()
    assert served.proc is not None
    assert served.proc.returncode == 9, served.err
    assert served.err.startswith("btrdelta replicate: error: busy: ")
    assert len(served.err.splitlines()) == 1, served.err
    assert sorted(os.listdir(dest)) == before


def test_a_full_destination_is_an_error_not_a_killed_receiver(tmp_path: Path) -> None:
    """DEST on a btrfs with too little space for the tree: the replicate fails with one
    line naming ENOSPC (the record counter was a mapping of a file in DEST: on a full btrfs
    a store into it, after a write-back, made the kernel kill the receiver with SIGBUS,
    and the sender said only `the peer closed the connection`). The full disk is not the
    peer's fault: the partial transfer is kept (it was dropped), and once space is made
    the next run resumes it (oracle: bytes sent, tree-sum). The sender hears `failed`
    and that the transfer is kept (until session 32 the REFUSE said `protocol: the stream
    cannot be applied`, which reads as the sender's fault and a transfer dropped)."""
    require_btrfs()
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(150 << 20))
    try:
        with loop_fs("btrfs", size="400M") as mnt:
            (mnt / "fill").write_bytes(os.urandom(250 << 20))
            os.sync()
            dest = mnt / "dest"
            dest.mkdir()
            proc = subprocess.run(
                [sys.executable, "-m", "btrdelta", "replicate", str(src), str(dest),
                 "--store", str(tmp_path / "store")],
                capture_output=True, text=True, check=False, timeout=300)
            assert proc.returncode not in (0, 7), proc.stderr  # (7: the peer closed)
            assert proc.stderr.count("\n") == 1, proc.stderr
            assert "No space left on device" in proc.stderr, proc.stderr
            # the receiver's own failure, not the peer's: `failed` (`protocol` says the
            # sender broke the protocol, whose partial transfer is dropped), and kept
            assert ": failed: " in proc.stderr, proc.stderr
            assert "protocol" not in proc.stderr, proc.stderr
            assert "the next run resumes it" in proc.stderr, proc.stderr
            assert _visible(dest) == set()
            acked = json.loads((dest / ".btrdelta-partial/meta.json").read_text())["offset"]
            assert acked > 0
            (mnt / "fill").unlink()
            proc = subprocess.run(
                [sys.executable, "-m", "btrdelta", "replicate", str(src), str(dest),
                 "--store", str(tmp_path / "store"), "--json"],
                capture_output=True, text=True, check=False, timeout=300)
            assert proc.returncode == 0, proc.stderr
            res = json.loads(proc.stdout)
            assert res["resumed_from"] == acked, res
            assert res["sent"] == res["size"] - acked, res
            assert tree_sum(dest / res["name"]) == tree_sum(src)
            assert [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp")] == []
            assert not (dest / ".btrdelta-partial").exists()
            counters = f"btrdelta-progress-{os.stat(dest).st_dev:x}-"  # (this filesystem's)
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(counters)]
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


def test_an_interrupted_serve_says_whether_a_transfer_is_kept(tmp_path: Path) -> None:
    """`replicate --serve` cut before a transfer began said "the transfer can resume" as
    one cut in the middle of it did (session 32's trial): each now says what it keeps."""
    dest = tmp_path / "dest"
    dest.mkdir()
    # 1. the sender's side closes before its HELLO: nothing begun, nothing kept
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "replicate", "--serve",
                           str(dest)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=False, timeout=60, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.startswith("replicate --serve: interrupted ("), err
    assert err.endswith("); no transfer had begun, nothing is kept\n"), err
    assert not (dest / ".btrdelta-partial").exists()
    # 2. cut after the whole stream was acknowledged, before its COMMIT: kept, and resumed
    errs: list[str] = []
    good = _ok_stream()
    assert _lying_sender(dest, good, None, after_end="close", err=errs)[0] == "Ack"
    [err] = errs
    assert err.startswith("replicate --serve: interrupted ("), err
    from btrdelta.cli._common import human_bytes

    assert err.rstrip("\n").endswith(f"); the partial transfer is kept ({human_bytes(len(good))} "
                                      "received in this connection): the next run resumes it")
    assert (dest / ".btrdelta-partial").exists()
    what, code, text = _lying_sender(dest, good, None, resume=True)
    assert (what, code) == ("Committed", 0), text
    assert _visible(dest) == {"ok"}
