"""The publisher's catalog (``REPO/.btrdelta/catalog.json``) and its projection onto the
public metadata (pure).

The catalog is the publisher's own record of the repository: chunker parameters, the pack
space, every version with its artifacts, and the delta jobs still to run. ``repo add``
updates it (atomically, after the artifacts it names are in place); ``repo sign`` projects
it onto bins and an index (:func:`build_metadata`). Clients never read it.

The chunk map (``REPO/.btrdelta/chunks.bin``) lists where each stored chunk is: 48-byte
records (BLAKE3 id, u64 pack-space offset, u32 compressed size, u32 size), appended in
pack-space order. Records past the catalog's pack-space end belong to an interrupted
``repo add`` and are dropped on load.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import blake3

from ..chunk.chunker import ChunkerParams
from .canonical import Fields, canonical
from .model import (
    BIN_SIZE,
    ArtifactRef,
    Bin,
    BinRef,
    DeltaRef,
    Index,
    IndexVersion,
    VersionRecord,
)
from .solid import DEFAULT_SOLID_LEVEL, Solid

__all__ = [
    "CHUNK_RECORD",
    "Catalog",
    "CatalogVersion",
    "PackEntry",
    "build_metadata",
    "decode_chunk_map",
]

CATALOG_FORMAT = 1
CHUNK_RECORD = struct.Struct("<32sQII")
_FIRST_BASE = 160


@dataclass(slots=True)
class PackEntry:
    """One pack file: id (hex BLAKE3 of its bytes), base in the pack space, length."""

    id: str
    base: int
    length: int


@dataclass(slots=True)
class CatalogVersion:
    """One version as the publisher records it."""

    name: str
    identity: str
    stream_size: int
    #: the full index: hex BLAKE3 and length
    full_id: str
    full_length: int
    #: bytes a client downloads for the full from nothing (full index + its chunks)
    full_bytes: int
    #: ids of the packs this version added
    packs: list[str] = field(default_factory=list)
    #: source position -> (hex BLAKE3, length) of the delta from it
    deltas: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: source positions whose delta is still to be made
    pending: list[int] = field(default_factory=list)
    #: the measured extra deltas were tried (``repo.layout.next_trial``)
    measured: bool = True
    #: the solid full (None: added before solid fulls, or with ``--solid-level 0``)
    solid: Solid | None = None

    def encode(self) -> dict[str, Any]:
        out = {
            "name": self.name, "identity": self.identity, "stream_size": self.stream_size,
            "full": {"id": self.full_id, "length": self.full_length},
            "full_bytes": self.full_bytes, "packs": self.packs,
            "deltas": [{"from": a, "id": h, "length": n}
                       for a, (h, n) in sorted(self.deltas.items(), reverse=True)],
            "pending": sorted(self.pending, reverse=True), "measured": self.measured,
        }
        if self.solid is not None:
            out["solid"] = self.solid.encode()
        return out

    @classmethod
    def decode(cls, f: Fields) -> CatalogVersion:
        full = f.sub("full")
        deltas = {d.integer("from", 1): (d.hex64("id"), d.integer("length"))
                  for d in f.items("deltas")}
        pending = [int(x) for x in f.array("pending")]
        packs = [str(x) for x in f.array("packs")]
        raw = f.get("measured") if "measured" in f.obj else True  # older catalogs: done
        solid = Solid.decode(f.sub("solid")) if "solid" in f.obj else None
        return cls(f.text("name"), f.hex64("identity"), f.integer("stream_size"),
                   full.hex64("id"), full.integer("length"), f.integer("full_bytes"),
                   packs, deltas, pending, raw is True, solid)


@dataclass(slots=True)
class Catalog:
    """The publisher's state."""

    params: ChunkerParams
    level: int
    packs: list[PackEntry] = field(default_factory=list)
    versions: list[CatalogVersion] = field(default_factory=list)
    index_version: int = 0
    timestamp_version: int = 0
    index_expires: int = 0
    timestamp_expires: int = 0
    #: versions the signed index holds
    signed_versions: int = 0
    #: zstd level of each new release's solid full (0: none)
    solid_level: int = DEFAULT_SOLID_LEVEL

    @property
    def pack_end(self) -> int:
        """First free pack-space offset."""
        return self.packs[-1].base + self.packs[-1].length if self.packs else _FIRST_BASE

    def position(self, name: str) -> int | None:
        """1-based position of version ``name``, or None."""
        for i, v in enumerate(self.versions):
            if v.name == name:
                return i + 1
        return None

    def encode(self) -> bytes:
        p = self.params
        doc = {
            "type": "btrdelta-catalog", "format": CATALOG_FORMAT,
            "chunker": {"min_size": p.min_size, "avg_size": p.avg_size,
                        "max_size": p.max_size, "normalization": p.normalization,
                        "seed": p.seed},
            "level": self.level,
            "packs": [{"id": k.id, "base": k.base, "length": k.length} for k in self.packs],
            "versions": [v.encode() for v in self.versions],
            "index_version": self.index_version,
            "timestamp_version": self.timestamp_version,
            "index_expires": self.index_expires,
            "timestamp_expires": self.timestamp_expires,
            "signed_versions": self.signed_versions,
            "solid_level": self.solid_level,
        }
        return canonical(doc) + b"\n"

    @classmethod
    def decode(cls, obj: Any, source: str) -> Catalog:
        f = Fields(obj, source)
        f.expect("type", "btrdelta-catalog")
        f.expect("format", CATALOG_FORMAT)
        c = f.sub("chunker")
        params = ChunkerParams(c.integer("min_size"), c.integer("avg_size"),
                               c.integer("max_size"), c.integer("normalization"),
                               c.integer("seed"))
        packs = [PackEntry(k.hex64("id"), k.integer("base"), k.integer("length"))
                 for k in f.items("packs")]
        versions = [CatalogVersion.decode(v) for v in f.items("versions")]
        return cls(params, f.integer("level", -100, 22), packs, versions,
                   f.integer("index_version"), f.integer("timestamp_version"),
                   f.integer("index_expires"), f.integer("timestamp_expires"),
                   f.integer("signed_versions"),
                   # (a catalog made before solid fulls: its next releases get one)
                   f.integer("solid_level", -100, 22) if "solid_level" in f.obj
                   else DEFAULT_SOLID_LEVEL)


def decode_chunk_map(data: bytes, pack_end: int) -> tuple[dict[bytes, tuple[int, int, int]], int]:
    """The chunk map's valid records (``id -> (offset, compressed, size)``) and the byte
    length of the valid prefix (records inside the pack space)."""
    out: dict[bytes, tuple[int, int, int]] = {}
    size = CHUNK_RECORD.size
    valid = 0
    for pos in range(0, len(data) - len(data) % size, size):
        digest, offset, comp, raw = CHUNK_RECORD.unpack_from(data, pos)
        if offset + comp > pack_end:
            break
        out[digest] = (offset, comp, raw)
        valid = pos + size
    return out, valid


def build_metadata(
    catalog: Catalog, *, version: int, expires: int, timestamp_keys: tuple[str, ...],
) -> tuple[Index, list[tuple[ArtifactRef, bytes]]]:
    """The index and the bin files (reference and bytes) for the catalog's versions."""
    records = [
        VersionRecord(
            v.name, v.identity, v.stream_size,
            ArtifactRef.make("fulls", v.full_id, v.full_length),
            tuple(DeltaRef(a, ArtifactRef.make("deltas", h, n))
                  for a, (h, n) in sorted(v.deltas.items(), reverse=True)),
            v.solid,
        )
        for v in catalog.versions
    ]
    bins: list[tuple[ArtifactRef, bytes]] = []
    refs: list[BinRef] = []
    for first in range(0, len(records), BIN_SIZE):
        chunk = tuple(records[first : first + BIN_SIZE])
        data = canonical(Bin(first + 1, chunk).encode())
        ref = ArtifactRef.make("bins", blake3.blake3(data).hexdigest(), len(data))
        bins.append((ref, data))
        refs.append(BinRef(first + 1, len(chunk), ref))
    versions = tuple(
        IndexVersion(v.name, v.full_bytes,
                     tuple((a, n) for a, (_h, n) in sorted(v.deltas.items(), reverse=True)))
        for v in catalog.versions
    )
    return Index(version, expires, timestamp_keys, versions, tuple(refs)), bins
