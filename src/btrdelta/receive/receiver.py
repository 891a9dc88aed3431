"""The receive loop: feed an iterator of stream events to an :class:`~.applier.Applier`.

This is the public entry point other stages use (``delta expand`` feeds it directly):
``receive(StreamReader(f).events(), Path("/target"))``. It follows ``btrfs receive``:
several concatenated streams are received one after the other (``stop_at_end`` stops
after the first END, like ``-e``), a failing command stops the run unless ``max_errors``
allows more (0 = never stop), and an unfinished subvolume is removed on any failure,
including ``KeyboardInterrupt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import BtrdeltaError, StreamFormatError
from ..stream.reader import Event, StreamHeader
from ..stream.records import End, Snapshot, Subvol
from .applier import Applier, ReceivedSubvol

__all__ = ["receive"]


def receive(
    events: Iterable[Event],
    dest: Path,
    *,
    stop_at_end: bool = False,
    max_errors: int = 1,
    dry_run: bool = False,
    backend: str = "auto",
    apply_fileattr: bool = False,
    force_decompress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_subvol: Callable[[ReceivedSubvol], None] | None = None,
) -> list[ReceivedSubvol]:
    """Apply a stream of events (stream headers and records) below ``dest``.

    Args:
        events: stream headers and records, e.g. ``StreamReader(f).events()``; plain
            records work too.
        dest: existing directory; each subvolume becomes ``dest/<name>``.
        stop_at_end: stop after the first END (``btrfs receive -e``).
        max_errors: stop after this many failed commands (0: never stop); a failure in
            SUBVOL/SNAPSHOT always stops. With more than one allowed, failed commands are
            skipped and the first error is raised after the stream was applied.
        dry_run: check paths, find parents and clone sources, write nothing.
        backend: ``"auto"`` (real subvolumes on btrfs, directories elsewhere), ``"btrfs"``
            or ``"dir"``.
        apply_fileattr: apply FILEATTR flags (btrfs-progs ignores them).
        force_decompress: never pass ENCODED_WRITE through to btrfs.
        on_progress: called now and then with ``(records done, file bytes written)``.
        on_warning: called with a message for anything skipped (default: warnings.warn).
        on_subvol: called with each finished subvolume.

    Returns:
        The finished subvolumes, in stream order.

    Raises:
        BtrdeltaError: subclasses naming the record index, command and path.
    """
    errors: list[BtrdeltaError] = []
    index = -1
    data_bytes = 0
    with Applier(
        Path(dest), backend=backend, dry_run=dry_run, apply_fileattr=apply_fileattr,
        force_decompress=force_decompress, on_warning=on_warning,
    ) as applier:
        for ev in events:
            if type(ev) is StreamHeader:
                continue
            index += 1
            is_start = type(ev) is Subvol or type(ev) is Snapshot
            before = len(applier.received)
            try:
                applier.apply(ev, index)  # type: ignore[arg-type]
            except BtrdeltaError as exc:
                errors.append(exc)
                if is_start or (max_errors and len(errors) >= max_errors):
                    raise
            if on_subvol is not None and len(applier.received) > before:
                for done in applier.received[before:]:
                    on_subvol(done)
            if on_progress is not None and index % 512 == 0:
                cur = applier._cur
                on_progress(index + 1, data_bytes + (cur.data_bytes if cur else 0))
            if type(ev) is End:
                data_bytes += sum(r.data_bytes for r in applier.received[before:])
                if stop_at_end:
                    break
        if applier.in_subvolume:
            raise StreamFormatError("stream ended without END", index=index)
        if on_progress is not None:
            on_progress(index + 1, data_bytes)
        if not applier.received and not errors and index < 0:
            raise StreamFormatError("empty stream: nothing to receive")
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.message += f" (and {len(errors) - 1} more errors)"
            first.args = (first.message,)
        raise first
    return applier.received
