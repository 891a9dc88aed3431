"""Receive whatever the input is: a btrfs send stream, or a delta stream against the local
parent.

:func:`receive_any` looks at the input once (:func:`~btrdelta.update.identify.identify`),
then hands the receiver the events to apply: a plain stream's
:class:`~btrdelta.stream.StreamReader` as it is (its decoded batches go straight to the
applier), or a delta stream's expansion against the parent subvolume the stream names,
found below the destination like ``btrfs receive`` finds it. The expansion produces records
(regenerated WRITEs, CLONEs of unchanged data on btrfs, carried commands decoded a group at
a time); it runs in a read-ahead thread so expanding overlaps applying. The compressed
extents a CLONE stands for are not recompressed (``hash_clones=False``: DEND's count and size
are checked, not its digest); a signed receive (:mod:`.signed`) keeps the full check.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import UUID

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, MissingBaseError
from ..receive import ReceivedSubvol, find_parent, receive, uses_btrfs
from ..stream.reader import Event, StreamReader
from .identify import Kind, identify

if TYPE_CHECKING:
    from typing import IO, Any, BinaryIO

    #: what can be received: a path, ``"-"`` (standard input) or a binary file
    Source = str | os.PathLike[str] | BinaryIO | IO[bytes]

__all__ = ["delta_parent", "open_events", "receive_any"]


def delta_parent(dest: Path, backend: str = "auto", search_root: Path | None = None,
                 parents: dict[UUID, Path] | None = None) -> Callable[[Any], Path]:
    """The old-root function for receiving a delta stream below ``dest``: the local parent
    subvolume of the stream's SNAPSHOT (a full stream has no old files to patch against),
    found below ``dest`` or ``search_root`` (see :func:`btrdelta.receive.receive`), or
    taken from ``parents`` (the receive's: the parent is looked up once, by whichever of
    the expansion and the applier asks first).
    """
    from ..stream.records import Snapshot

    def resolve(head: Any) -> Path:
        if not isinstance(head, Snapshot):
            raise MissingBaseError("a delta of a full stream needs an old tree (delta expand)")
        return find_parent(dest, head, backend=backend, search_root=search_root,
                           parents=parents)

    return resolve


def open_events(
    f: BinaryIO, dest: Path, *, backend: str = "auto", source: str | None = None,
    search_root: Path | None = None, max_file_size: int | None = None,
    parents: dict[UUID, Path] | None = None, check_digest: bool = True,
) -> Iterable[Event]:
    """The events to apply from input ``f`` (the one place an input is sniffed).

    A plain stream is its :class:`StreamReader` (``receive`` takes its decoded batches
    whole). A delta stream is expanded on the fly against the parent of its snapshot below
    ``dest`` (``max_file_size``: the expansion's memory limit, see
    :func:`~btrdelta.delta.events.expand_events`; ``parents``: see :func:`delta_parent`,
    to share with the receive; ``check_digest``: see
    :func:`~btrdelta.delta.events.expand_events`). Anything else is refused with one line
    saying what it is.
    """
    what, f = identify(f)
    if what.kind is Kind.SEND_STREAM:
        return StreamReader(f, source=source)
    if what.kind is Kind.DELTA_STREAM:
        from ..delta.events import expand_events
        from ..delta.format import DEFAULT_MAX_FILE_SIZE

        # reflinks where the destination has them (a clone that must be copied costs more
        # than the write it stands for)
        return expand_events(f, delta_parent(dest, backend, search_root, parents),
                             source=source,
                             clone_same=uses_btrfs(dest, backend), hash_clones=False,
                             max_file_size=max_file_size or DEFAULT_MAX_FILE_SIZE,
                             check_digest=check_digest)
    if what.kind is Kind.UNKNOWN:
        # let the stream parser name the bad magic and its offset, as `btrfs receive` does
        return StreamReader(f, source=source)
    raise what.refuse("a btrfs send stream or a delta stream", source=source)


def receive_any(stream: Source, dest: str | os.PathLike[str], *, source: str | None = None,
                **options: Any) -> list[ReceivedSubvol]:
    """Receive a send stream or a delta stream from ``stream`` below ``dest``.

    Args:
        stream: a path, ``"-"`` for standard input, or a binary file.
        dest: an existing directory (btrfs: real subvolumes; elsewhere: directories).
        source: the input's name in error messages (default: the path, or the file's name).
        options: keyword options of :func:`btrdelta.receive.receive` (``backend``,
            ``stop_at_end``, ``max_errors``, ``dry_run``, ``on_progress``...), and
            ``max_file_size`` for a delta stream (the expansion's memory limit).

    Returns:
        The subvolumes received, in stream order.
    """
    dest = Path(dest)
    backend = options.get("backend", "auto")
    if isinstance(stream, (str, os.PathLike)):
        name = os.fspath(stream)
        if name == "-":
            return _receive_file(sys.stdin.buffer, source or "-", dest, backend, options)
        with open(name, "rb", buffering=0) as f:
            return _receive_file(f, source or name, dest, backend, options)
    if source is None:
        given = getattr(stream, "name", None)
        source = given if isinstance(given, str) else None
    return _receive_file(stream, source, dest, backend, options)


def _receive_file(f: Any, source: str | None, dest: Path, backend: str,
                  options: dict[str, Any]) -> list[ReceivedSubvol]:
    parents = options.setdefault("parents", {})  # looked up once: expansion or applier
    events = open_events(f, dest, backend=backend, source=source,
                         search_root=options.get("search_root"),
                         max_file_size=options.pop("max_file_size", None), parents=parents)
    # a delta stream is expanded in a helper thread while C applies records
    options.setdefault("read_ahead", not isinstance(events, StreamReader))
    try:
        return receive(events, dest, **options)
    except BtrdeltaError as exc:
        if exc.index is not None or exc.offset is not None:  # (a record's: of this input)
            raise exc.located(source=source) from exc.__cause__
        raise
