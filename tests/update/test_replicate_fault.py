"""`replicate`: a receiver failing mid-stream keeps the partial transfer when the fault is
its own (a bug, a full disk: the next run resumes it, as after a cut) and drops it when it
is the peer's (a damaged stream, a lying sender: the next run starts again). It dropped it
for every error, and a bug's progress was sent again whole. Oracles: the next run's
``resumed_from`` and bytes sent, tree-sum of the received tree against the source's, the
partial transfer's directory."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from btrdelta.errors import BtrdeltaError, ProtocolError
from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from btrdelta.update import replica
from btrdelta.update.channels import SocketChannel
from btrdelta.update.replica import Replica
from btrdelta.update.replicate import ReplicateResult, replicate
from tests.conftest import btrfs_loop

SEG = 1 << 20
MIB = 1 << 20


def _run(src: Path, dest: Path, store: Path) -> tuple[ReplicateResult | BaseException,
                                                       object]:
    """One ``replicate`` over a socket pair, the receiver a :class:`Replica` in a thread:
    each side's result, or what it raised."""
    a, b = socket.socketpair()
    served: list[object] = []

    def serve() -> None:
        try:
            served.append(Replica(dest).serve(SocketChannel(a, "sender")))
        except BaseException as exc:  # (the test looks at it)
            served.append(exc)
        finally:
            a.close()  # (the sender hears the end)

    receiver = threading.Thread(target=serve)
    receiver.start()
    sent: ReplicateResult | BaseException
    try:
        sent = replicate(src, SocketChannel(b, "receiver"), store=SendshotStore(store),
                         segment=SEG)
    except BtrdeltaError as exc:
        sent = exc
    finally:
        receiver.join(60)
        b.close()
    return sent, served[0]


def _dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The source (32 MiB in four files), an empty DEST, the sender's store."""
    src, dest, store = tmp_path / "src", tmp_path / "dest", tmp_path / "store"
    src.mkdir()
    dest.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(8 * MIB))
    return src, dest, store


def _fail_when(monkeypatch: pytest.MonkeyPatch,
               fault: Callable[[Any, bool], BaseException | None]) -> list[str]:
    """The receiver's batches raise what ``fault(events, resumed)`` gives before each one
    (None: on); returns the list of what the receiver warns."""
    batches = replica._Events.batches

    def failing(self: Any) -> Iterator[Any]:
        resumed = not self.first  # (a resumed stream starts after its SUBVOL)
        for batch in batches(self):
            exc = fault(self, resumed)
            if exc is not None:
                raise exc
            yield batch

    monkeypatch.setattr(replica._Events, "batches", failing)
    warned: list[str] = []
    monkeypatch.setattr(replica, "warn", warned.append)
    return warned


@pytest.mark.parametrize(("fault", "text", "kept"), [
    (RuntimeError, "a bug of the receiver", True),
    (ProtocolError, "a second subvolume in the stream", False),  # (a lying peer's)
])
def test_a_receiver_failing_mid_stream_keeps_its_partial_only_when_the_fault_is_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: type[Exception], text: str,
        kept: bool) -> None:
    src, dest, store = _dirs(tmp_path)
    _fail_when(monkeypatch, lambda ev, _resumed: fault(text) if ev.inbox.added > 20 * MIB
               else None)
    sent, served = _run(src, dest, store)
    assert isinstance(sent, ReplicateResult), sent
    assert sent.outcome == "refused", sent
    # (the REFUSE's code: `failed` for this side's fault, kept; `protocol` for the peer's)
    assert sent.message.endswith(f"failed: {text} (its partial transfer is kept: the next "
                                 "run resumes it)" if kept else f"protocol: {text}"), sent
    if kept:  # (a bug is raised, after the peer was told)
        assert (type(served), str(served)) == (fault, text)
    else:
        assert getattr(served, "outcome", None) == "failed", served
    served = None  # (the bug's traceback holds the receive's frames in a cycle, and in
    gc.collect()  # them the record counter's mapping: its descriptor, until collected)
    assert (dest / ".btrdelta-partial").exists() == kept
    monkeypatch.undo()
    res, served = _run(src, dest, store)
    assert isinstance(res, ReplicateResult), res
    assert res.outcome == "committed", res
    if kept:  # (resumed after what was acknowledged: at least two thirds of it not sent)
        assert res.resumed_from > 12 * MIB, res
        assert res.sent < res.size - 12 * MIB, res
    else:
        assert (res.resumed_from, res.sent) == (0, res.size), res
    assert tree_sum(dest / res.name) == tree_sum(src)
    assert not (dest / ".btrdelta-partial").exists()


def test_a_partial_that_fails_the_same_way_each_resume_is_dropped_after_the_third(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of this side's that a resume meets each time (here: the resumed conversation's
    first batch) kept the partial transfer for ever, every run resuming it and failing. The
    third failure in a row at the same acknowledged offset drops it, says so to both sides,
    and the next run starts again (and, the bug gone, commits the source's tree)."""
    src, dest, store = _dirs(tmp_path)
    warned = _fail_when(monkeypatch, lambda ev, resumed: RuntimeError("a bug of the resume")
                        if resumed or ev.inbox.added > 20 * MIB else None)
    partial = dest / ".btrdelta-partial"
    offsets = []
    for run in range(1, 4):
        sent, served = _run(src, dest, store)
        assert isinstance(sent, ReplicateResult), sent
        assert sent.outcome == "refused", sent
        assert (type(served), str(served)) == (RuntimeError, "a bug of the resume")
        served = None
        gc.collect()  # (see above: the record counter's mapping)
        if run < 3:
            assert sent.message.endswith(": a bug of the resume (its partial transfer is "
                                         "kept: the next run resumes it)"), sent
            assert not warned
            meta = json.loads((partial / "meta.json").read_bytes())
            assert meta["offset"] > 12 * MIB, meta
            assert meta["failed"] == [meta["offset"], run], meta
            offsets.append(meta["offset"])
        else:
            assert "failed 3 times in a row at the same point" in sent.message, sent
            assert "dropped, the next run starts again" in sent.message, sent
            assert len(warned) == 1, warned
            assert "a bug of the resume (failed 3 times" in warned[0], warned
            assert not partial.exists()
            assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
    assert offsets[0] == offsets[1]
    monkeypatch.undo()
    res, served = _run(src, dest, store)
    assert isinstance(res, ReplicateResult), res
    assert res.outcome == "committed", res
    assert (res.resumed_from, res.sent) == (0, res.size), res
    assert tree_sum(dest / res.name) == tree_sum(src)
    assert not partial.exists()


@pytest.mark.parametrize("how", ["progressing", "disk full"])
def test_failures_that_progress_or_are_the_machines_never_drop_the_partial(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The count of OWN_FAILURES is of failures at one acknowledged offset in a row: a bug
    met after each resume acknowledged more starts it again at 1, and a full disk (ENOSPC,
    the machine's: room is made, the same point fails until then) is not counted at all;
    four such failures keep the partial transfer, and the run after them resumes it."""
    src, dest, store = _dirs(tmp_path)

    def fault(ev: Any, resumed: bool) -> BaseException | None:
        if how == "progressing" and ev.inbox.added > 5 * MIB:
            return RuntimeError("a bug met further on each time")
        if how == "disk full" and (resumed or ev.inbox.added > 12 * MIB):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return None

    warned = _fail_when(monkeypatch, fault)
    partial = dest / ".btrdelta-partial"
    offsets = []
    for _ in range(4):
        sent, served = _run(src, dest, store)
        assert isinstance(sent, ReplicateResult), sent
        assert sent.outcome == "refused", sent
        del served  # (see above: the record counter's mapping)
        gc.collect()
        meta = json.loads((partial / "meta.json").read_bytes())
        offsets.append(meta["offset"])
        if how == "progressing":
            assert meta["failed"] == [meta["offset"], 1], meta
        else:
            assert "failed" not in meta, meta
    assert not warned, warned
    if how == "progressing":
        assert offsets == sorted(set(offsets)), offsets  # (each run acknowledged more)
    else:
        assert len(set(offsets)) == 1, offsets
        assert offsets[0] > 6 * MIB, offsets
    monkeypatch.undo()
    res, _served = _run(src, dest, store)
    assert isinstance(res, ReplicateResult), res
    assert res.outcome == "committed", res
    assert res.resumed_from == offsets[-1], (res, offsets)
    assert tree_sum(dest / res.name) == tree_sum(src)
    assert not partial.exists()


def _fill(fs: Path) -> None:
    """Fill btrfs ``fs`` up (``fs/fill``): a write of a few bytes to a file there fails."""
    fd = os.open(fs / "fill", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        block = os.urandom(MIB)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, block)
    finally:
        os.close(fd)
    os.sync()


@pytest.mark.btrfs
def test_a_receiver_that_met_a_full_disk_serves_the_next_conversation(
        tmp_path: Path) -> None:
    """One receiving process (a --listen's), its DEST's filesystem full: each conversation
    fails naming ENOSPC, and once room is made the next one commits. Before, the lock
    taken for a conversation whose pid could not be written in the lock file (ENOSPC) was
    never released: every later conversation was refused 'busy: ... receiving another
    transfer (process ?)' until the process ended, room made or not."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(MIB))
    with btrfs_loop() as fs:
        dest = fs / "dest"
        dest.mkdir()
        res, _served = _run(src, dest, tmp_path / "store")
        assert isinstance(res, ReplicateResult), res
        assert res.outcome == "committed", res
        (src / "b").write_bytes(os.urandom(2 * MIB))
        _fill(fs)
        for _ in range(2):
            sent, served = _run(src, dest, tmp_path / "store")
            assert isinstance(sent, ReplicateResult), sent
            assert sent.outcome == "refused", sent
            assert getattr(served, "outcome", None) == "failed", served
            assert "No space left on device" in sent.message, sent
        (fs / "fill").unlink()
        os.sync()
        res, _served = _run(src, dest, tmp_path / "store")
        assert isinstance(res, ReplicateResult), res
        assert res.outcome == "committed", res
        assert tree_sum(dest / res.name) == tree_sum(src)
