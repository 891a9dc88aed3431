"""Freshness, rollback and mix-and-match checks, as TUF's client workflow makes them (pure).

A client keeps, per repository root key, the highest index and timestamp versions it has
trusted (:class:`TrustedState`, stored by the caller). With a new ``timestamp.json`` it
checks, in this order (TUF 1.0, §5.4 "Update the timestamp role", §5.5/§5.6 for the
metadata it names):

1. the timestamp's signature (by a key the trusted index, or the new index, lists);
2. its version is not below the trusted one (rollback of the timestamp);
3. it has not expired (freeze attack: a mirror serving an old, validly signed state);
4. the index it names is not older than the trusted index version (rollback of the index);

and with the index file it names:

5. length and BLAKE3 equal the timestamp's (a mirror mid-sync, or files of two index
   versions mixed, fail here), the root key's signature, the version equal to the one the
   timestamp names, and the index itself not expired.

Every failure is a :class:`~btrdelta.errors.SignatureError` (exit 5), one line naming the
file and what is wrong.
"""

from __future__ import annotations

from typing import Any

from .._value import Value
from ..errors import SignatureError
from .canonical import Fields
from .model import Index, Timestamp, format_time

__all__ = ["TrustedState", "check_index", "check_timestamp"]


class TrustedState(Value):
    """What a client has trusted before (versions only grow)."""

    index_version: int = 0
    timestamp_version: int = 0
    #: BLAKE3 of the trusted index file: the same version with other bytes is refused
    index_blake3: str = ""

    def encode(self) -> dict[str, Any]:
        return {"index_version": self.index_version,
                "timestamp_version": self.timestamp_version,
                "index_blake3": self.index_blake3}

    @classmethod
    def decode(cls, obj: Any, source: str) -> TrustedState:
        f = Fields(obj, source)
        blake = f.text("index_blake3")
        return cls(f.integer("index_version"), f.integer("timestamp_version"), blake)


def check_timestamp(ts: Timestamp, *, now: float, trusted: TrustedState,
                    source: str = "timestamp.json") -> None:
    """Checks 2-4 on a timestamp whose signature was verified."""
    if ts.version < trusted.timestamp_version:
        raise SignatureError(
            f"timestamp version {ts.version} is older than version "
            f"{trusted.timestamp_version} already seen (rollback attack or stale mirror)",
            source=source)
    if ts.expires <= now:
        raise SignatureError(
            f"expired at {format_time(ts.expires)} (freeze attack, or the publisher's "
            "timestamp cron stopped)", source=source)
    if ts.index_version < trusted.index_version:
        raise SignatureError(
            f"names index version {ts.index_version}, older than version "
            f"{trusted.index_version} already seen (rollback attack)", source=source)


def check_index(index: Index, ts: Timestamp, index_blake3: str, *, now: float,
                trusted: TrustedState, source: str) -> None:
    """Check 5 on an index whose root signature was verified and whose bytes hash to
    ``index_blake3`` (length and hash were checked against the timestamp by the caller)."""
    if index.version != ts.index_version:
        raise SignatureError(
            f"is index version {index.version}, timestamp.json names {ts.index_version} "
            "(files of different index versions mixed)", source=source)
    if index.version == trusted.index_version and trusted.index_blake3 and \
            index_blake3 != trusted.index_blake3:
        raise SignatureError(
            f"index version {index.version} differs from the one trusted before "
            "(a version number signed twice)", source=source)
    if index.expires <= now:
        raise SignatureError(f"index expired at {format_time(index.expires)}", source=source)
