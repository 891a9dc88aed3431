"""The receive loop: feed an iterator of stream events to an :class:`~.applier.Applier`.

This is the public entry point other stages use (``delta expand`` feeds it directly):
``receive(StreamReader(f).events(), Path("/target"))``. It follows ``btrfs receive``:
several concatenated streams are received one after the other (``stop_at_end`` stops
after the first END, like ``-e``), a failing command stops the run unless ``max_errors``
allows more (0 = never stop), and an unfinished subvolume is removed on any failure,
including ``KeyboardInterrupt``.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from uuid import UUID

from .. import TYPE_CHECKING
from .._pool import StartedThread
from ..errors import BtrdeltaError, StreamFormatError
from ..stream.reader import Event, StreamHeader
from ..stream.records import End, Snapshot, Subvol
from .applier import Applier
from .resume import ResumePoint, resumed
from .subvolumes import Ahead, PreCommit, ReceivedSubvol

if TYPE_CHECKING:
    from typing import Any, Protocol, runtime_checkable

__all__ = ["BatchedEvents", "prefetch", "receive"]


#: records (and bytes of file data) handed to the applier at a time, from sources other
#: than a StreamReader (the C fast path runs through a batch)
_APPLY_BATCH = 256
_APPLY_BYTES = 1 << 20
_BATCH_EVENTS = 256
_BATCH_BYTES = 4 << 20
_QUEUE_BATCHES = 4
_DONE = object()
#: entries of the fd table made before the helper thread starts (a delta stream's expansion
#: holds up to ~300 files open: the old files being checked, its directory caches)
_FD_TABLE = 512


def _grow_fd_table(size: int = _FD_TABLE) -> None:
    """The process's fd table grown to ``size`` entries now, while it has one thread: Linux
    grows it by doubling from 64 and, in a process with several threads, each growth waits
    for an RCU grace period, stalling the thread that opens a file and any other that does
    meanwhile (~7 ms each, the receiving thread and the reader alike, measured). Nothing
    is grown where ``RLIMIT_NOFILE`` is lower (it is then grown as needed)."""
    try:
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, size - 1))
    except OSError:
        pass
    finally:
        os.close(fd)


if TYPE_CHECKING:
    @runtime_checkable
    class BatchedEvents(Protocol):
        """Events that also come in lists (a :class:`StreamReader`, an expanded delta
        stream): ``receive`` takes the lists and saves the per-event iteration."""

        def batches(self) -> Generator[list[Event], None, None]:
            """The events, in lists."""
            ...
else:
    class _HasBatches(type):
        def __instancecheck__(cls, obj: object) -> bool:
            return callable(getattr(obj, "batches", None))

    class BatchedEvents(metaclass=_HasBatches):
        """Events that also come in lists (a :class:`StreamReader`, an expanded delta
        stream): ``receive`` takes the lists and saves the per-event iteration.
        ``isinstance(x, BatchedEvents)``: ``x`` has a ``batches()`` method (what the
        ``runtime_checkable`` protocol type checkers see checks, without ``typing``, which
        a receive does not import)."""


def prefetch(batches: Iterable[list[Event]]) -> Iterator[list[Event]]:
    """Pull ``batches`` (lists of events) in a helper thread, a few ahead of the consumer.

    Producing them (reading, CRC, decoding, expanding a delta stream) then overlaps the
    receiver's system calls: the C fast path releases the GIL once for each run of records.
    Memory stays bounded: at most ``_QUEUE_BATCHES`` batches are in flight. An exception
    in the producer is re-raised in the consumer; closing the generator (an error or Ctrl-C
    in the consumer) stops the producer.
    """
    q: queue.Queue[object] = queue.Queue(_QUEUE_BATCHES)
    stop = threading.Event()
    _grow_fd_table()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = StartedThread(produce, "btrdelta-receive-reader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def _batched(
    events: Iterator[Event], count: int = _APPLY_BATCH, size: int = _APPLY_BYTES
) -> Generator[list[Event], None, None]:
    """Lists of at most ``count`` events and about ``size`` bytes of file data."""
    batch: list[Event] = []
    nbytes = 0
    for ev in events:
        batch.append(ev)
        data = getattr(ev, "data", None)
        if data is not None:
            nbytes += len(data)
        if len(batch) >= count or nbytes >= size:
            yield batch
            batch = []
            nbytes = 0
    if batch:
        yield batch


def _event_batches(
    events: Iterable[Event], *, read_ahead: bool
) -> Generator[list[Event], None, None]:
    """``events`` in lists: a :class:`BatchedEvents`' own, else gathered here (bigger ones
    when a helper thread reads ahead)."""
    if isinstance(events, BatchedEvents):  # a StreamReader is one
        return events.batches()  # decoded lists as they are (about one block each)
    if read_ahead:
        return _batched(iter(events), _BATCH_EVENTS, _BATCH_BYTES)
    return _batched(iter(events))


class _Run:
    """One :func:`receive`: the apply loop, the errors it keeps and the progress it reports."""

    def __init__(
        self, applier: Applier, *, max_errors: int, stop_at_end: bool,
        on_progress: Callable[[int, int], None] | None,
        on_subvol: Callable[[ReceivedSubvol], None] | None,
        progress: Any = None,
    ) -> None:
        self.applier = applier
        #: the count of records applied is stored in progress[0] after each one
        self.progress = memoryview(progress).cast("B").cast("Q") if progress is not None \
            else None
        if progress is not None:
            applier.track(progress)
        self.max_errors = max_errors
        self.stop_at_end = stop_at_end
        self.on_progress = on_progress
        self.on_subvol = on_subvol
        self.errors: list[BtrdeltaError] = []
        #: index of the last record applied (or failed)
        self.index = -1
        #: file bytes of the finished subvolumes
        self.data_bytes = 0
        self._reported = 0

    def apply(self, source: Iterable[list[Event]]) -> None:
        """Apply every batch of ``source`` (the hot loop: the C fast path takes the common
        commands, Python the others) up to the end or the END that stops the run."""
        applier = self.applier
        apply = applier.apply
        fast = applier.fast
        errors = self.errors
        max_errors = self.max_errors
        on_progress = self.on_progress
        progress = self.progress
        index = self.index
        try:
            for batch in source:
                i, n = 0, len(batch)
                while i < n:
                    if fast:  # the common commands in C, up to one it hands back
                        j = applier.apply_fast(batch, i, index + 1)
                        index += j - i
                        i = j
                        if i == n:
                            break
                    ev = batch[i]
                    i += 1
                    kind = type(ev)
                    if kind is StreamHeader:
                        continue
                    index += 1
                    try:
                        apply(ev, index)  # type: ignore[arg-type]
                        if progress is not None:
                            progress[0] = index + 1
                    except BtrdeltaError as exc:
                        errors.append(exc)
                        if kind is Subvol or kind is Snapshot or (
                            max_errors and len(errors) >= max_errors
                        ):
                            raise
                    if kind is End or kind is Subvol or kind is Snapshot:
                        self._report_finished()
                        if kind is End and self.stop_at_end:
                            return
                if on_progress is not None:
                    cur = applier.current
                    on_progress(index + 1, self.data_bytes + (cur.data_bytes if cur else 0))
        finally:
            self.index = index

    def _report_finished(self) -> None:
        received = self.applier.received
        for done in received[self._reported:]:
            self.data_bytes += done.data_bytes
            if self.on_subvol is not None:
                self.on_subvol(done)
        self._reported = len(received)

    def check_end(self) -> None:
        """After the last event: the stream must have ended its subvolume and had one.

        Raises:
            StreamFormatError: a subvolume without END, or nothing at all.
        """
        if self.applier.in_subvolume:
            raise StreamFormatError("stream ended without END", index=self.index)
        if self.on_progress is not None:
            self.on_progress(self.index + 1, self.data_bytes)
        if not self.applier.received and not self.errors and self.index < 0:
            raise StreamFormatError("empty stream: nothing to receive")

    def raise_errors(self) -> None:
        """Raise the first error kept (naming how many more there were), if any."""
        if self.errors:
            first = self.errors[0]
            if len(self.errors) > 1:
                first.message += f" (and {len(self.errors) - 1} more errors)"
                first.args = (first.message,)
            raise first


def receive(
    events: Iterable[Event], dest: Path, *, stop_at_end: bool = False, max_errors: int = 1,
    dry_run: bool = False, backend: str = "auto", apply_fileattr: bool = False,
    force_decompress: bool = False, on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None, read_ahead: bool = False,
    on_subvol: Callable[[ReceivedSubvol], None] | None = None, write_behind: bool = False,
    pre_commit: PreCommit | None = None, search_root: Path | None = None,
    progress: Any = None, resume: ResumePoint | None = None, temp_name: bytes | None = None,
    detach_on: tuple[type[BaseException], ...] = (), parents: dict[UUID, Path] | None = None,
    snapshot_ahead: Ahead | None = None, detach_if: Callable[[BaseException], bool] | None = None,
) -> list[ReceivedSubvol]:
    """Apply a stream of events (stream headers and records) below ``dest``.

    Args:
        events: stream headers and records, e.g. ``StreamReader(f).events()``; plain
            records work too. A :class:`StreamReader` itself, or any
            :class:`BatchedEvents`, is read a decoded batch at a time (the fastest way).
        dest: existing directory; each subvolume becomes ``dest/<name>``.
        stop_at_end: stop after the first END (``btrfs receive -e``).
        max_errors: stop after this many failed commands (0: never stop); a failure in
            SUBVOL/SNAPSHOT always stops. With more than one allowed, failed commands are
            skipped and the first error is raised after the stream was applied.
        dry_run: check paths, find parents and clone sources, write nothing.
        backend: ``"auto"`` (subvolumes on btrfs, else directories), ``"btrfs"``, ``"dir"``.
        apply_fileattr: apply FILEATTR flags (btrfs-progs ignores them).
        force_decompress: never pass ENCODED_WRITE through to btrfs.
        on_progress: called now and then with ``(records done, file bytes written)``.
        on_warning: called with a message for anything skipped (default: warnings.warn).
        on_subvol: called with each finished subvolume.
        read_ahead: pull ``events`` in a helper thread (:func:`prefetch`) so producing
            them overlaps applying (worth it when that costs CPU: expanding a delta).
        pre_commit: called with each complete subvolume, read-only under its temporary
            name, before its final name; raising aborts it (not ``detach_on``) and receive.
        search_root: find parents and clone sources below this directory of ``dest``'s
            btrfs, not below ``dest`` (``btrfs receive -m``).
        progress, resume, detach_on, detach_if, temp_name: a resumable receive of one
            stream (see :mod:`.resume`: records applied counted, the subvolume kept where
            the apply raised ``detach_on`` or what ``detach_if`` is true of, gone on with).
        parents: parents by (received) UUID, taken as found, shared with a delta
            stream's expansion (see :class:`.subvolumes.Subvolumes`).
        write_behind: write large files' data out as it comes (see
            :class:`.applier.Applier`), for a caller that writes ``dest`` out after.
        snapshot_ahead: the SNAPSHOT to come (:meth:`.subvolumes.Subvolumes.snapshot_ahead`).

    Returns:
        The finished subvolumes, in stream order.

    Raises:
        BtrdeltaError: subclasses naming the record index, command and path.
    """
    read_ahead = read_ahead and not dry_run
    with Applier(
        Path(dest), backend=backend, dry_run=dry_run, apply_fileattr=apply_fileattr,
        force_decompress=force_decompress, on_warning=on_warning, pre_commit=pre_commit,
        search_root=search_root, temp_name=temp_name, parents=parents,
        detach_on=detach_on, write_behind=write_behind,
    ) as applier:
        applier.subvols.snapshot_ahead(snapshot_ahead)
        run = _Run(applier, max_errors=max_errors, stop_at_end=stop_at_end,
                   on_progress=on_progress, on_subvol=on_subvol, progress=progress)
        batches = _event_batches(events, read_ahead=read_ahead)
        if resume is not None:  # (the next record's index: the count applied)
            run.index, batches = resume.applied - 1, resumed(batches, resume, applier)
        source = prefetch(batches) if read_ahead else batches
        try:
            run.apply(source)
        except BaseException as exc:
            if isinstance(exc, detach_on) or (detach_if is not None and detach_if(exc)):
                applier.detach()
            raise
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            if source is not batches:
                batches.close()
        run.check_end()
    run.raise_errors()
    return applier.received
