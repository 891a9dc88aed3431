"""Where records go: one interface for every consumer of a stream.

btrfs-progs parses a stream once and calls a table of callbacks (``struct btrfs_send_ops``);
``cmds/receive.c`` and ``cmds/receive-dump.c`` are two such tables. Here a consumer is one
object with three methods, :class:`RecordSink`: :meth:`~RecordSink.start` at each stream
header (a file may hold concatenated streams), :meth:`~RecordSink.apply` per record with its
index, :meth:`~RecordSink.close` at the end (also after an error: a sink flushes what it
holds). The receiver's ``Applier``, the text and JSON dumpers (:mod:`.dump`), the
:class:`~btrdelta.stream.writer.StreamWriter` and :class:`VerifySink` implement it; so will
a sendshot recorder. :func:`feed` drives any of them from any source of events.

(``btrdelta receive`` does not go through :func:`feed`: its loop hands the common commands
of a decoded batch to C at once; the ``Applier`` is still a sink, for every other source.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Protocol, runtime_checkable

from .reader import Event, StreamHeader, StreamReader
from .records import End, Record

__all__ = ["RecordSink", "VerifySink", "feed"]


@runtime_checkable
class RecordSink(Protocol):
    """A consumer of stream events."""

    def start(self, header: StreamHeader) -> None:
        """A stream begins (its 17-byte header was read)."""

    def apply(self, rec: Record, index: int) -> None:
        """Record number ``index`` (counted from 0 across concatenated streams)."""

    def close(self) -> None:
        """No more events (also called after an error)."""


class VerifySink:
    """Counts what passes: the reader already checked framing and every CRC."""

    def __init__(self) -> None:
        self.streams = 0
        self.records = 0
        self.versions: list[int] = []

    def start(self, header: StreamHeader) -> None:
        self.streams += 1
        self.versions.append(header.version)

    def apply(self, rec: Record, index: int) -> None:
        self.records += 1

    def close(self) -> None:
        pass


def feed(events: Iterable[Event] | StreamReader, sink: RecordSink, *,
         stop_at_end: bool = False) -> int:
    """Hand ``events`` (headers and records, e.g. ``StreamReader(f).events()``) to ``sink``;
    returns the number of records applied. The caller closes the sink.

    ``stop_at_end``: stop after the first END (what ``btrfs receive --dump`` and ``-e`` do).

    When ``events`` is a :class:`~.reader.StreamReader` itself (its events come in decoded
    lists) and the sink takes lists (an optional ``apply_batch(records, index)``),
    whole decoded batches go to the sink: the dumpers render them at once, without a call
    per record.
    """
    if isinstance(events, StreamReader):
        apply_batch = getattr(sink, "apply_batch", None)
        if apply_batch is not None:
            return _feed_batches(events.batches(), sink.start, apply_batch, stop_at_end)
        events = chain.from_iterable(events.batches())  # headers included
    index = 0
    start, apply = sink.start, sink.apply
    for ev in events:
        if type(ev) is StreamHeader:
            start(ev)
            continue
        apply(ev, index)  # type: ignore[arg-type]
        index += 1
        if stop_at_end and type(ev) is End:
            break
    return index


def _feed_batches(batches: Iterable[list[Event]], start: Callable[[StreamHeader], None],
                  apply_batch: Callable[[list[Record], int], None], stop_at_end: bool) -> int:
    index = 0
    for batch in batches:
        if type(batch[0]) is StreamHeader:  # a header comes alone, never inside a batch
            start(batch[0])
            continue
        if stop_at_end:
            end = next((i for i, rec in enumerate(batch) if type(rec) is End), None)
            if end is not None:
                apply_batch(batch[: end + 1], index)  # type: ignore[arg-type]
                return index + end + 1
        apply_batch(batch, index)  # type: ignore[arg-type]
        index += len(batch)
    return index
