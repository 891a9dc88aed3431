"""A delta stream expanded straight into records, for ``btrdelta receive``.

:func:`expand_batches` takes the outputs of :func:`.expand.expand_items` (which counts and
hashes every byte of the expanded stream for the DEND check) and hands on records, never
bytes to parse again: a stream header and the regenerated WRITE / ENCODED_WRITE records go
as they are; only the carried btrfs commands, which are bytes by nature (inflated and
unfolded from the zstd carrier), are decoded, a group at a time, by one
:class:`~btrdelta.stream.StreamParser` (the C batch decoder when it is live). The parser
also checks that the expanded stream is well formed: a command after END, a new stream
before END, a command the embedded version does not define. A batch ending with END is
held until the next output or the end of the expansion, so a single stream's END (where
the receiver commits the subvolume) reaches the receiver only after DEND was checked and
the input read to its end (bytes after DEND are refused). Before a patch of 1 MiB or more of
new content is applied (``expand_items(flush=True)``), the batch gathered so far goes out:
the receiver applies those records while the patch runs, instead of waiting for them
behind it (scipy's 35 MB OpenBLAS: ~30 ms).

With ``clone_same`` (``btrdelta receive`` on btrfs), the records of a file whose content is
its old file's become one CLONE from the parent snapshot per PWRITE range (or PENC extent),
consecutive CLONEs of adjacent ranges joined into one; a changed file's verified content
is written as data except its ranges equal to the old file's, cloned the same way
(:meth:`~.patching.Patcher._cloned_runs`).
With ``hash_clones=False`` too (an unsigned receive), such a PENC extent is not recompressed
just to be hashed: DEND's count and size are checked, its digest is not (see
``docs/formats/delta-stream.md`` §6).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from pathlib import Path

from .. import TYPE_CHECKING
from ..errors import BtrdeltaError, StreamFormatError
from ..stream.reader import EOF, NEED_DATA, Event, StreamParser
from ..stream.records import Clone, End, Write
from .expand import APPLY, FLUSH, HEADER, WRITE, OldRoot, expand_items, open_delta
from .format import DEFAULT_MAX_FILE_SIZE, DeltaItem
from .patching import SameEncodedWrite, SameWrite

if TYPE_CHECKING:
    from typing import BinaryIO

__all__ = ["DeltaEvents", "expand_batches", "expand_events"]

#: events (and bytes of regenerated file data) in one batch of :func:`expand_batches`;
#: the first batches are smaller (_FIRST_BATCH events, sizes doubling up to these) so the
#: receiver starts (its SNAPSHOT, the first records) while the rest is being expanded
_EVENTS_BATCH = 2048
_EVENTS_BYTES = 4 << 20
_FIRST_BATCH = 32
_BYTES_PER_EVENT = _EVENTS_BYTES // _EVENTS_BATCH


def _decode_group(parser: StreamParser, group: bytearray, batch: list[Event]) -> None:
    """Append the records of a group of carried commands, decoded in place, to ``batch``."""
    parser.feed(group)
    while True:
        got = parser.take_batch()
        if got:
            batch += got
            if not parser.buffered:  # all of it (most groups: the next batch would be
                return  # empty, then NEED_DATA)
            continue
        ev = parser.next_event()
        if ev is NEED_DATA or ev is EOF:  # EOF: never fed
            return
        batch.append(ev)


def _joined(a: Clone, b: Clone) -> Clone | None:
    """One CLONE for two consecutive ones that continue each other (the next range of
    the same file from the next range of the same source file), else ``None``: an
    unchanged file of several extents is then one FICLONERANGE, not one (with its
    source's open and close) per extent."""
    if (
        a.offset + a.length == b.offset and a.clone_offset + a.length == b.clone_offset
        and a.length > 0 and b.length > 0  # (0: "to the end of the source")
        and a.path == b.path and a.clone_path == b.clone_path
        and a.clone_uuid == b.clone_uuid and a.clone_ctransid == b.clone_ctransid
    ):
        return Clone(a.offset, a.length + b.length, a.path, a.clone_uuid, a.clone_ctransid,
                     a.clone_path, a.clone_offset)
    return None


def _add(batch: list[Event], rec: Clone | Write) -> None:
    """Append what ``receive`` applies instead of a regenerated record, a CLONE joined to
    the one before it where it continues it."""
    joined = _joined(batch[-1], rec) if batch and type(rec) is Clone \
        and type(batch[-1]) is Clone else None
    if joined is not None:
        batch[-1] = joined
    else:
        batch.append(rec)


def expand_batches(
    items: Iterable[DeltaItem],
    old_root: OldRoot,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
    clone_same: bool = False,
    hash_clones: bool = True,
    check_digest: bool = True,
) -> Generator[list[Event], None, None]:
    """The events of the expanded stream in lists (what ``receive`` applies a list at a
    time): headers and regenerated records as the expansion made them, carried commands
    decoded a group at a time.

    ``clone_same``: the WRITEs of a file whose content equals its old file (verified
    before) become one CLONE from the parent snapshot per PWRITE range (``old_root`` must
    then be a function of the stream's SNAPSHOT, as for ``receive``; consecutive CLONEs
    of adjacent ranges, a file's extents, are joined into one): the receiver
    reflinks the unchanged data instead of writing it again (and falls back to copying
    where it cannot). The tree is the same; the old and new versions share the extents.
    The expanded stream is still checked as a whole (DEND; its digest only with
    ``check_digest``: see :func:`.expand.expand_items`)."""
    parser = StreamParser(source=source, verify_crc=False)
    batch: list[Event] = []
    nbytes = 0
    limit = _FIRST_BATCH
    outputs = expand_items(items, old_root, max_file_size=max_file_size, source=source,
                           clone_same=clone_same, hash_clones=hash_clones,
                           check_digest=check_digest, flush=True, records_only=True)
    with closing(outputs):  # closing this generator stops the recompression threads
        for kind, pieces, rec in outputs:
            cls = rec.__class__
            if kind == FLUSH:  # a long patch next: what came before it goes out now
                if batch and type(batch[-1]) is not End:
                    yield batch
                    batch = []
                    nbytes = 0
                continue
            if kind == APPLY:  # an extent left out: what is applied instead
                if cls is Clone:
                    _add(batch, rec)  # type: ignore[arg-type]
                elif cls is tuple:  # WRITEs and CLONEs of a patched file's extent
                    for piece in rec:  # type: ignore[union-attr]
                        _add(batch, piece)  # type: ignore[arg-type]
                elif rec is not None:
                    _add(batch, rec)  # type: ignore[arg-type]
            elif cls is SameWrite or cls is SameEncodedWrite:
                apply = rec.apply  # type: ignore[union-attr]
                if type(apply) is tuple:  # WRITEs and CLONEs of a patched file's extent
                    for piece in apply:
                        _add(batch, piece)
                elif apply is not None:
                    _add(batch, apply)
            elif kind == WRITE:
                batch.append(rec)  # type: ignore[arg-type]
                nbytes += len(rec.data)  # type: ignore[union-attr]
            else:
                try:
                    if kind == HEADER:
                        # the expansion's own header (its offset counts regenerated WRITEs)
                        parser.begin(rec.version)  # type: ignore[union-attr]
                        batch.append(rec)  # type: ignore[arg-type]
                    else:  # the events are views of the group's bytes
                        _decode_group(parser, pieces[0], batch)
                        nbytes += len(pieces[0])
                except BtrdeltaError as exc:  # offsets and indexes of the parser's are not ours
                    raise StreamFormatError(f"a carried command does not decode: {exc.message}",
                                            source=source) from None
            if (len(batch) >= limit or nbytes >= limit * _BYTES_PER_EVENT) and (
                type(batch[-1]) is not End
            ):
                yield batch
                batch = []
                nbytes = 0
                limit = min(limit * 2, _EVENTS_BATCH)
    if batch:  # END goes out with what came after it: DEND checked, no data after it
        yield batch


class DeltaEvents:
    """The events of a delta stream's expansion: iterate over it for the events one by one,
    as :meth:`StreamReader.events` yields them, or call :meth:`batches` for lists of them
    (``receive`` does, like it does with a :class:`StreamReader`)."""

    def __init__(
        self, items: Iterable[DeltaItem], old_root: OldRoot, max_file_size: int,
        source: str | None, clone_same: bool = False, hash_clones: bool = True,
        check_digest: bool = True,
    ) -> None:
        self._args = (items, old_root, max_file_size, source, clone_same, hash_clones,
                      check_digest)

    def batches(self) -> Generator[list[Event], None, None]:
        """Lists of events (see :func:`expand_batches`); call it once."""
        items, old_root, max_file_size, source, clone_same, hash_clones, digest = self._args
        return expand_batches(items, old_root, max_file_size=max_file_size, source=source,
                              clone_same=clone_same, hash_clones=hash_clones,
                              check_digest=digest)

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch


def expand_events(
    delta_events: Iterable[DeltaItem] | BinaryIO,
    old_root: OldRoot | Path,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    source: str | None = None,
    clone_same: bool = False,
    hash_clones: bool = True,
    check_digest: bool = True,
) -> DeltaEvents:
    """The events of the expanded stream, as :meth:`StreamReader.events` yields them.

    Args:
        delta_events: delta items (:func:`open_delta`) or a binary file with a delta stream.
        old_root: the old snapshot's directory, or a function of the stream's SNAPSHOT
            (or SUBVOL) record returning it (``lambda s: find_parent(dest, s)``).
        max_file_size: largest old file / new content a patch may involve.
        source: input name for error messages.
        clone_same: unchanged content as CLONEs from the parent (see
            :func:`expand_batches`; ``btrdelta receive`` does this).
        hash_clones: with ``clone_same``, still recompress the compressed extents a CLONE
            stands for, to check the DEND digest (default; a signed receive needs it).
            ``False``: they are left out, and only DEND's count and size are checked once
            one was.
        check_digest: ``False``: the expanded stream is not hashed at all (DEND's count
            and size are checked), for a caller that checked the delta's bytes and checks
            the tree it makes (``update``; see :func:`.expand.expand_items`).

    Each patched file's new content is verified (its old content too where the new
    content has no digest, or when the patch fails: see
    :meth:`~.patching.Patcher._finish`) before any of its WRITE events is yielded. The
    result is iterable once; its ``batches()`` gives the events in lists.
    """
    items: Iterable[DeltaItem]
    if hasattr(delta_events, "read"):
        items = open_delta(delta_events, source=source)  # type: ignore[arg-type]
    else:
        items = delta_events
    return DeltaEvents(items, old_root, max_file_size, source, clone_same, hash_clones,
                       check_digest)
