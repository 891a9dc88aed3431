"""Summaries of a stream: what a user asks first (``btrdelta stat``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .reader import Event, StreamHeader
from .records import Clone, EncodedWrite, Snapshot, Subvol, Write

__all__ = ["StreamStats", "collect_stats"]


@dataclass
class StreamStats:
    """Counts over every record of one input (all concatenated streams)."""

    streams: int = 0
    versions: list[int] = field(default_factory=list)
    subvolumes: list[dict[str, Any]] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    #: bytes of plain WRITE data
    write_bytes: int = 0
    #: ENCODED_WRITE payload bytes as carried (compressed) and as they land in files
    encoded_bytes: int = 0
    encoded_file_bytes: int = 0
    #: encoded bytes by compression number
    encoded_by_compression: Counter[int] = field(default_factory=Counter)
    #: bytes referenced by CLONE (not carried)
    clone_bytes: int = 0
    paths: set[bytes] = field(default_factory=set)
    size: int = 0

    @property
    def records(self) -> int:
        """Number of commands."""
        return sum(self.commands.values())

    @property
    def files_touched(self) -> int:
        """Distinct paths named by commands (inside each subvolume)."""
        return len(self.paths)

    @property
    def data_bytes(self) -> int:
        """File bytes the stream produces from carried data (plain + decompressed)."""
        return self.write_bytes + self.encoded_file_bytes

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "streams": self.streams,
            "versions": self.versions,
            "subvolumes": self.subvolumes,
            "records": self.records,
            "commands": dict(sorted(self.commands.items())),
            "write_bytes": self.write_bytes,
            "encoded_bytes": self.encoded_bytes,
            "encoded_file_bytes": self.encoded_file_bytes,
            "encoded_by_compression": {str(k): v for k, v in self.encoded_by_compression.items()},
            "clone_bytes": self.clone_bytes,
            "data_bytes": self.data_bytes,
            "files_touched": self.files_touched,
            "size": self.size,
        }


def collect_stats(events: Iterable[Event]) -> StreamStats:
    """Fold events (headers and records) into a :class:`StreamStats`."""
    st = StreamStats()
    cmds = st.commands
    paths = st.paths
    prefix = b""
    for ev in events:
        cls = type(ev)
        if cls is StreamHeader:
            st.streams += 1
            st.versions.append(ev.version)  # type: ignore[union-attr]
            continue
        cmds[ev.cmd.name.lower()] += 1  # type: ignore[union-attr]
        if cls is Write:
            st.write_bytes += len(ev.data)  # type: ignore[union-attr]
        elif cls is EncodedWrite:
            st.encoded_bytes += len(ev.data)  # type: ignore[union-attr]
            st.encoded_file_bytes += ev.unencoded_file_len  # type: ignore[union-attr]
            st.encoded_by_compression[ev.compression] += len(ev.data)  # type: ignore[union-attr]
        elif cls is Clone:
            st.clone_bytes += ev.length  # type: ignore[union-attr]
        elif cls is Subvol or cls is Snapshot:
            prefix = ev.path + b"/"  # type: ignore[union-attr]
            info: dict[str, Any] = {
                "name": ev.path.decode("utf-8", "backslashreplace"),  # type: ignore[union-attr]
                "uuid": str(ev.uuid),  # type: ignore[union-attr]
                "ctransid": ev.ctransid,  # type: ignore[union-attr]
            }
            if cls is Snapshot:
                info["parent_uuid"] = str(ev.clone_uuid)  # type: ignore[union-attr]
                info["parent_ctransid"] = ev.clone_ctransid  # type: ignore[union-attr]
            st.subvolumes.append(info)
            continue
        path = getattr(ev, "path", None)
        if path is not None:
            paths.add(prefix + path)
    return st
