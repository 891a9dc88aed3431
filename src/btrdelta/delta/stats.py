"""What a delta stream contains: patched files and bytes saved per codec (``delta stat``).

Needs no old snapshot: patches are counted, not applied; the zstd carrier is inflated to
count the btrfs commands it carries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .codecs import CODECS
from .expand import _Expander
from .format import (
    BtrfsCommand,
    DeltaEnd,
    DeltaItem,
    DeltaParser,
    Patch,
    PatchData,
    PWrite,
    StreamStart,
    iter_items,
)
from .format import ZCommands as _Z

__all__ = ["DeltaStats", "collect_delta_stats", "delta_stats_of_file"]


@dataclass
class DeltaStats:
    """Counts over one delta stream."""

    size: int = 0
    streams: int = 0
    versions: list[int] = field(default_factory=list)
    carried_commands: int = 0
    #: btrfs command bytes carried, and what they take in the delta stream
    carried_raw_bytes: int = 0
    carried_stored_bytes: int = 0
    regenerated_writes: int = 0
    patched_files: Counter[str] = field(default_factory=Counter)
    #: WRITE data bytes the patches stand for, and the patches' size, by codec
    replaced_bytes: Counter[str] = field(default_factory=Counter)
    patch_bytes: Counter[str] = field(default_factory=Counter)
    expanded_size: int = 0
    expanded_commands: int = 0

    @property
    def saved_bytes(self) -> dict[str, int]:
        """Bytes saved by patching, per codec (replaced data minus patch size)."""
        return {k: self.replaced_bytes[k] - self.patch_bytes[k] for k in self.replaced_bytes}

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "size": self.size,
            "streams": self.streams,
            "versions": self.versions,
            "expanded_size": self.expanded_size,
            "expanded_commands": self.expanded_commands,
            "carried_commands": self.carried_commands,
            "carried_raw_bytes": self.carried_raw_bytes,
            "carried_stored_bytes": self.carried_stored_bytes,
            "regenerated_writes": self.regenerated_writes,
            "patched_files": sum(self.patched_files.values()),
            "codecs": {
                k: {
                    "files": self.patched_files[k],
                    "replaced_bytes": self.replaced_bytes[k],
                    "patch_bytes": self.patch_bytes[k],
                    "saved_bytes": self.saved_bytes[k],
                }
                for k in sorted(self.patched_files)
            },
        }


def collect_delta_stats(items: Iterable[DeltaItem], source: str | None = None) -> DeltaStats:
    """Fold delta items into a :class:`DeltaStats`.

    Raises:
        StreamFormatError: the delta stream is malformed (carrier included).
    """
    st = DeltaStats()
    ex = _Expander(".", 0, source)
    for item in items:
        ex.index += 1
        if isinstance(item, BtrfsCommand):
            st.carried_commands += 1
            st.carried_raw_bytes += len(item.raw)
            st.carried_stored_bytes += len(item.raw)
        elif isinstance(item, _Z):
            raw = ex.inflate(item)
            st.carried_commands += sum(1 for _ in ex.split(raw))
            st.carried_raw_bytes += len(raw)
            st.carried_stored_bytes += len(item.zdata)
        elif isinstance(item, Patch):
            codec = CODECS.get(item.codec)
            name = codec.name if codec is not None else f"id{item.codec}"
            st.patched_files[name] += 1
            st.replaced_bytes[name] += item.new_size
            st.patch_bytes[name] += item.patch_len
        elif isinstance(item, PWrite):
            st.regenerated_writes += -(-item.length // item.chunk)
        elif isinstance(item, StreamStart):
            st.streams += 1
            st.versions.append(item.version)
            ex.version = item.version
        elif isinstance(item, DeltaEnd):
            st.expanded_size = item.size
            st.expanded_commands = item.count
        elif isinstance(item, PatchData):
            pass
    return st


def delta_stats_of_file(f: BinaryIO, source: str | None = None) -> DeltaStats:
    """:func:`collect_delta_stats` of the delta stream in a binary file (size included)."""
    parser = DeltaParser(source=source)
    read = getattr(f, "read1", None) or f.read
    st = collect_delta_stats(iter_items(read, parser=parser), source=source)
    st.size = parser.offset
    return st
