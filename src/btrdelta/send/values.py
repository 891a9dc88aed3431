"""The values every send path shares: what a stream names (:class:`StreamIds`) and what
a send reports as it goes (:class:`SendStats`).

A module of their own so that a send that does not build records from trees in
:mod:`.emit`'s way can name them without importing it (and what it imports).
"""

from __future__ import annotations

from uuid import UUID

from .._value import Value

__all__ = ["SendStats", "StreamIds"]


class StreamIds(Value, frozen=True):
    """UUIDs and ctransids a stream names, when they are not derived from the trees: the
    new subvolume's (a btrfs snapshot's, a record's) and the parent's (what the receiver
    knows the parent by: a received UUID, a record's stream UUID, ``--parent-uuid``), and
    the clone sources' (``send -c``), in their order, as btrfs send names them (else each
    source is named by the UUID a full stream of it by btrdelta names)."""

    uuid: UUID | None = None
    ctransid: int = 0
    parent_uuid: UUID | None = None
    parent_ctransid: int = 0
    clone_ids: tuple[tuple[UUID, int], ...] = ()


class SendStats(Value):
    """Counters for progress reports."""

    files_scanned: int = 0
    bytes_scanned: int = 0
    bytes_read: int = 0
    data_bytes: int = 0
    cloned_bytes: int = 0
    records: int = 0
    phase: str = "scan"
