"""The sendshot store's cursor file (``STORE/cursors.json``): reading and checking it.

A cursor says which records a receiver holds (its ``digest``, one per source in
``sources``) and which transfer to it is in flight (``inflight``: its session, its snapshot
on this side, its base and the record it recorded); ``docs/formats/sendshot.md`` §4. The
store keeps every record a cursor names and a sender deletes the snapshot a transfer in
flight names, so a damaged file is refused whole with one line naming it and the receiver
(never read as "no cursors", nor a field of another type used), and a snapshot that is not
named as a session's is not a transfer's.
"""

from __future__ import annotations

import os

from .. import TYPE_CHECKING
from ..errors import StreamFormatError

if TYPE_CHECKING:
    from typing import Any

__all__ = ["SESSION_PREFIX", "cursor_digests", "read_cursors"]

#: how the name of a replication session's snapshot begins (``update/replicate.py``)
SESSION_PREFIX = b".btrdelta-replicate-"


def read_cursors(path: str) -> dict[str, dict[str, Any]]:
    """``{receiver id: {"digest": ..., "updated": ..., ...}}`` of the cursor file ``path``
    (none when there is no file).

    Raises:
        StreamFormatError: not JSON, not a version 1 cursor object, or a cursor damaged
            (:func:`_cursor_damage`).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 20)
    except FileNotFoundError:
        return {}
    import json  # only with receivers (replicate): not on every send's start

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # (json's messages are one line)
        raise StreamFormatError(f"damaged cursor file: not JSON ({exc})", source=path) from None
    # a cursor file read as empty would let prune delete what receivers hold: refuse it
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise StreamFormatError("damaged cursor file: not a version 1 cursor object",
                                source=path)
    receivers = doc.get("receivers", {})
    if not isinstance(receivers, dict) or not all(
            isinstance(v, dict) for v in receivers.values()):
        raise StreamFormatError("damaged cursor file: 'receivers' is not an object of "
                                "objects", source=path)
    for rid, cursor in receivers.items():
        if (why := _cursor_damage(cursor)) is not None:
            raise StreamFormatError(f"damaged cursor file: receiver {rid[:40]!r}: {why}",
                                    source=path)
    return {str(k): v for k, v in receivers.items()}


def cursor_digests(cursor: dict[str, Any]) -> set[str]:
    """The records a receiver's cursor holds: its ``digest`` (the last sent to it) and, in
    ``sources``, the one it holds of each source sent to it (a DEST receiving two)."""
    out = {str(cursor["digest"])} if cursor.get("digest") else set()
    sources = cursor.get("sources")
    if isinstance(sources, dict):
        out |= {str(d) for d in sources.values() if d}
    return out


def _digest(v: object) -> bool:
    return v is None or (type(v) is str and len(v) == 64
                         and not v.strip("0123456789abcdef"))


def _text(v: object) -> bool:
    return v is None or type(v) is str


def _cursor_damage(cursor: dict[str, Any]) -> str | None:
    """What makes ``cursor`` (one receiver's, as read) unusable, or None: a record it names
    that is not a digest (it would be kept, deleted or opened by that name), a text field
    that is not text, a transfer in flight that is not an object of its fields or whose
    snapshot (which the sender deletes) is not a session snapshot's name."""
    if not _digest(cursor.get("digest")):
        return f"'digest' is not a record's digest: {cursor.get('digest')!r:.80}"
    for key in ("name", "uuid", "dest"):
        if not _text(cursor.get(key)):
            return f"{key!r} is not text"
    if not isinstance(cursor.get("updated", 0), (int, float)):
        return "'updated' is not a time"
    sources = cursor.get("sources") or {}
    if not isinstance(sources, dict) or not all(_digest(v) for v in sources.values()):
        return "'sources' is not an object of records' digests"
    flight = cursor.get("inflight") or {}
    if not isinstance(flight, dict):
        return "'inflight' is not an object"
    if not all(_digest(flight.get(k)) for k in ("base", "sendshot")) or not all(
            _text(flight.get(k)) for k in ("session", "name", "snapshot")):
        return "'inflight' names its base, record, session, name or snapshot wrongly"
    segment = flight.get("segment")
    if segment is not None and (type(segment) is not int or segment < 1):
        return "'inflight': 'segment' is not a size"
    snap = flight.get("snapshot")
    if snap and not os.path.basename(os.fsencode(snap)).startswith(SESSION_PREFIX):
        return f"'inflight': {snap!r:.80} is not a replication session's snapshot"
    return None
