"""Userspace send: btrfs send streams made from plain directory trees.

``send_records(new_dir, parent_dir)`` yields the records of a stream that recreates
``new_dir`` (full) or turns ``parent_dir`` into ``new_dir`` (incremental) on any receiver of
btrfs send streams, the kernel's ``btrfs receive`` included; ``send_stream`` writes them.
Modules: :mod:`.full` (full streams, directory by directory: bounded memory, each file read
once), :mod:`.changes` (incremental sends: both trees walked in lockstep, only what changed
kept), :mod:`.scan` (walking and hashing trees, identity), :mod:`.diff` (matching inodes,
comparing content), :mod:`.order` (namespace changes in a valid order, orphans), :mod:`.emit`
(records, data), :mod:`.values` (stream UUIDs, progress counters), :mod:`.encode`
(compressed data), :mod:`.kernel` (handing read-only btrfs snapshots to ``btrfs send``),
:mod:`.live` (temporary snapshots of live subvolumes), :mod:`.record`, :mod:`.store` and
:mod:`.sendshot` (sendshot records: the old side of an incremental send without the old
tree).

Importing this package is cheap: :mod:`.scan`, :mod:`.emit` (and with it the stream encoder)
and :mod:`.kernel` load on first use, so a caller can start a :class:`TreeScan` (child
process, hashing threads) first and import the rest while the trees are being read, or
freeze a live subvolume (:mod:`.live`) and import the rest while the kernel snapshots it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

from .. import TYPE_CHECKING, _import_module

if TYPE_CHECKING:
    from typing import Any

    from ..stream.records import Record
    from ..stream.writer import StreamWriter
    from .emit import COMPRESSORS, Sender
    from .kernel import is_readonly_snapshot, kernel_send
    from .scan import Tree, TreeScan, hash_contents
    from .values import SendStats, StreamIds
    from .walk import scan_tree

__all__ = [
    "COMPRESSORS",
    "SendStats",
    "Sender",
    "StreamIds",
    "Tree",
    "TreeScan",
    "hash_contents",
    "is_readonly_snapshot",
    "kernel_send",
    "scan_tree",
    "send_records",
    "send_stream",
]

_LAZY = {
    "COMPRESSORS": ".emit",
    "SendStats": ".values",
    "Sender": ".emit",
    "StreamIds": ".values",
    "Tree": ".scan",
    "TreeScan": ".scan",
    "hash_contents": ".scan",
    "is_readonly_snapshot": ".kernel",
    "kernel_send": ".kernel",
    "scan_tree": ".walk",
}

PathArg = str | bytes | os.PathLike[str]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_import_module(__name__ + module), name)


def send_records(
    new_dir: PathArg,
    parent_dir: PathArg | None = None,
    *,
    version: int = 1,
    compress: str | None = None,
    quick: bool = False,
    workers: int | None = None,
    name: bytes | None = None,
    on_progress: Callable[[SendStats], None] | None = None,
    scan: TreeScan | None = None,
    ids: StreamIds | None = None,
    clone_sources: Sequence[PathArg] = (),
    no_data: bool = False,
    tmpdir: str | None = None,
) -> Iterator[Record]:
    """Yield the records of a send stream of ``new_dir`` (incremental from ``parent_dir``).

    Args:
        new_dir: the tree to send.
        parent_dir: the tree the receiver has already (``None``: a full stream).
        version: stream version the records must fit (1, 2 or 3).
        compress: ``"zstd"`` or ``"zlib"`` to send data as ``ENCODED_WRITE`` (v2+).
        quick: trust equal size and mtime at the same path as unchanged content.
        workers: threads reading and hashing file contents (default: CPU count, at most 4).
        name: subvolume name in the stream (default: basename of ``new_dir``).
        on_progress: called with :class:`SendStats` now and then.
        scan: a :class:`TreeScan` of the same trees the caller started already.
        ids: UUIDs/ctransids to name instead of the derived ones (``--parent-uuid``; its
            ``clone_ids``, one per clone source, only in an incremental stream).
        clone_sources: more trees the receiver has (``btrfs send -c``): files found there
            whole are sent as ``CLONE`` from them (the receiver finds them by the UUID a full
            stream of each names).
        no_data: ``UPDATE_EXTENT`` markers instead of file data (``btrfs send --no-data``,
            the kernel's ``NO_FILE_DATA``): a stream that shows what changed, not how.
        tmpdir: where temporary files go (default: Python's, ``$TMPDIR`` or ``/tmp``).

    A full stream (no parent, no ``scan``/``ids``) is made by :class:`~.full.FullSend`; an
    incremental one without ``scan`` from what :func:`~.changes.find_changes` keeps of
    both trees: both in bounded memory, each file read once (the blocks of a changed file
    that differ are read again to send them). With ``scan`` both trees are held whole.

    Yields:
        ``Subvol``/``Snapshot`` first, ``End`` last. ``Write.data`` is only valid until the
        next record is requested.
    """
    if parent_dir is None and scan is None and ids is None:
        from .full import FullSend

        yield from FullSend(new_dir, version=version, compress=compress, no_data=no_data,
                            name=name, on_progress=on_progress, tmpdir=tmpdir,
                            clone_sources=clone_sources).records()
        return
    from .emit import Sender

    sender = Sender(
        new_dir, parent_dir, version=version, compress=compress, quick=quick, workers=workers,
        name=name, on_progress=on_progress, scan=scan, ids=ids, clone_sources=clone_sources,
        no_data=no_data, tmpdir=tmpdir,
    )
    if ids is not None and ids.clone_ids:  # the sources named as the receiver knows them
        from .._value import replace

        sender.sources = [replace(src, uuid=uuid, ctransid=ctransid) for src, (uuid, ctransid)
                          in zip(sender.sources, ids.clone_ids, strict=True)]
    yield from sender.records()


def send_stream(
    write: Callable[[Any], object],
    new_dir: PathArg,
    parent_dir: PathArg | None = None,
    *,
    version: int = 1,
    **kwargs: Any,
) -> StreamWriter:
    """Write the stream of :func:`send_records` to ``write``; returns the writer."""
    from ..stream.writer import StreamWriter

    writer = StreamWriter(write, version)
    for rec in send_records(new_dir, parent_dir, version=version, **kwargs):
        writer.write(rec)
    return writer
