"""The repository's metadata documents as values: index, bins, timestamp (pure).

``docs/formats/repository.md`` is the specification; this module encodes and decodes the
``signed`` parts (plain JSON values) and checks every field, so a caller gets either a
consistent document or a one-line :class:`~btrdelta.errors.StreamFormatError` naming the
file and the field. Signatures and freshness are :mod:`.signing` and :mod:`.freshness`.

* :class:`Index` (``index/<N>.json``, signed by the root key): every version in order with
  the size of its full and of each delta into it (all the planner needs), the bins that hold
  the rest, and the keys allowed to sign timestamps.
* :class:`Bin` (``bins/<blake3>.json``, named by its hash in the index): for up to
  :data:`BIN_SIZE` consecutive versions, the content identity and every artifact's path
  and length.
* :class:`Timestamp` (``timestamp.json``, short-lived, signed by a timestamp key): which
  index is current, by version, path, length and hash.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, NoReturn

from .._value import Value
from .canonical import HEX64, Fields
from .solid import Solid

__all__ = [
    "BIN_SIZE",
    "IDENTITY_ALGORITHM",
    "SPEC_VERSION",
    "ArtifactRef",
    "Bin",
    "BinRef",
    "DeltaRef",
    "Index",
    "IndexVersion",
    "Timestamp",
    "VersionRecord",
    "check_version_name",
    "format_time",
    "parse_time",
    "stream_uuid",
]

SPEC_VERSION = 1
#: versions per bin file (small: a client fetches the bins of the few versions it needs)
BIN_SIZE = 4
#: how a release's content identity is computed: ``btrdelta tree-sum`` (default options)
IDENTITY_ALGORITHM = "tree-sum-2"
#: namespace of the subvolume UUIDs a repository's streams carry (``stream_uuid``)
_UUID_NAMESPACE = uuid.UUID("8f3c2a4e-6b1d-5e7f-9a0b-c1d2e3f40516")

VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")
_ARTIFACT = re.compile(r"(deltas|fulls|packs|bins)/([0-9a-f]{64})\.(delta|fidx|pack|json)")
_KIND_EXT = {"deltas": "delta", "fulls": "fidx", "packs": "pack", "bins": "json"}
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")
_MAX_LEN = (1 << 53) - 1


def check_version_name(name: str) -> str:
    """``name`` if it is a valid version name (one safe path component), else ValueError."""
    if not VERSION_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"version name {name!r} must be 1-128 of A-Z a-z 0-9 . _ + ~ - "
            "and start with a letter or digit"
        )
    return name


def stream_uuid(identity: str) -> uuid.UUID:
    """The subvolume UUID every stream of the release with ``identity`` carries."""
    return uuid.uuid5(_UUID_NAMESPACE, identity)


def format_time(seconds: float) -> str:
    """UTC time as metadata writes it: ``2026-12-03T11:55:45Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(seconds)))


def parse_time(text: str) -> int:
    """Seconds since the epoch of a metadata time (ValueError if malformed)."""
    if not _TIME.fullmatch(text):
        raise ValueError(f"time {text!r} is not YYYY-MM-DDTHH:MM:SSZ")
    # (by hand, as calendar.timegm(time.strptime(...)) did: _strptime imports calendar,
    # locale and datetime and compiles its patterns, ~3 ms of every CLI update)
    y, mo, d, h, mi, sec = (int(text[a:b]) for a, b in _FIELDS)
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    if not (y and 1 <= mo <= 12 and 1 <= d <= _MONTH_DAYS[mo - 1] + (mo == 2 and leap)
            and h <= 23 and mi <= 59 and sec <= 61):
        raise ValueError(f"time {text!r} is out of range")
    y -= mo <= 2  # (days from the civil date: March-based years, 400-year eras)
    era, yoe = divmod(y, 400)
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return ((days * 24 + h) * 60 + mi) * 60 + sec


#: where the year, month, day, hour, minute and second are in a metadata time
_FIELDS = ((0, 4), (5, 7), (8, 10), (11, 13), (14, 16), (17, 19))
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _time_field(f: Fields, key: str) -> int:
    try:
        return parse_time(f.text(key))
    except ValueError as exc:
        f.fail(str(exc), key)


class ArtifactRef(Value, frozen=True):
    """A content-addressed file of the repository: the hex in its name is the BLAKE3-256
    of its bytes."""

    path: str
    length: int

    @property
    def blake3(self) -> str:
        """The file's BLAKE3-256 (hex), from its name."""
        return self.path.split("/", 1)[1].split(".", 1)[0]

    @classmethod
    def make(cls, kind: str, digest_hex: str, length: int) -> ArtifactRef:
        """``kind`` is ``deltas``, ``fulls``, ``packs`` or ``bins``."""
        return cls(f"{kind}/{digest_hex}.{_KIND_EXT[kind]}", length)

    def encode(self) -> dict[str, Any]:
        return {"path": self.path, "length": self.length}

    @classmethod
    def decode(cls, f: Fields, kind: str) -> ArtifactRef:
        path = f.text("path")
        m = _ARTIFACT.fullmatch(path)
        if m is None or m.group(1) != kind or m.group(3) != _KIND_EXT[kind]:
            f.fail(f"not a {kind}/<blake3>.{_KIND_EXT[kind]} name", "path")
        return cls(path, f.integer("length", 0, _MAX_LEN))


class IndexVersion(Value, frozen=True):
    """One version as the index lists it (position = list index + 1)."""

    name: str
    full_bytes: int
    #: (position of the older version, bytes of the delta from it)
    deltas: tuple[tuple[int, int], ...]


class BinRef(Value, frozen=True):
    """Where the records of versions ``first .. first + count - 1`` are."""

    first: int
    count: int
    ref: ArtifactRef


class Index(Value, frozen=True):
    """The signed part of ``index/<N>.json``."""

    version: int
    expires: int
    timestamp_keys: tuple[str, ...]
    versions: tuple[IndexVersion, ...]
    bins: tuple[BinRef, ...]

    def positions(self) -> dict[str, int]:
        """Version name -> 1-based position."""
        return {v.name: i + 1 for i, v in enumerate(self.versions)}

    def bin_of(self, position: int) -> BinRef:
        """The bin holding version ``position``."""
        for b in self.bins:
            if b.first <= position < b.first + b.count:
                return b
        raise KeyError(position)

    def encode(self) -> dict[str, Any]:
        return {
            "type": "btrdelta-index",
            "spec": SPEC_VERSION,
            "version": self.version,
            "expires": format_time(self.expires),
            "identity": IDENTITY_ALGORITHM,
            "timestamp_keys": list(self.timestamp_keys),
            "versions": [
                [v.name, v.full_bytes, [[a, n] for a, n in v.deltas]] for v in self.versions
            ],
            "bins": [[b.count, b.ref.length, b.ref.blake3] for b in self.bins],
        }

    @classmethod
    def decode(cls, obj: Any, source: str) -> Index:
        f = Fields(obj, source)
        f.expect("type", "btrdelta-index")
        f.expect("spec", SPEC_VERSION)
        f.expect("identity", IDENTITY_ALGORITHM)
        keys = f.array("timestamp_keys", 16)
        if not keys or not all(isinstance(k, str) and _KEY.fullmatch(k) for k in keys):
            f.fail("not a list of base64 Ed25519 public keys", "timestamp_keys")
        versions = _decode_versions(f)
        bins = []
        expect_first = 1
        for i, b in enumerate(f.array("bins")):
            if not (isinstance(b, list) and len(b) == 3 and type(b[0]) is int
                    and 1 <= b[0] <= BIN_SIZE and type(b[1]) is int and 0 < b[1] <= _MAX_LEN
                    and isinstance(b[2], str) and HEX64.fullmatch(b[2])):
                f.fail("not [count, length, blake3]", f"bins[{i}]")
            bins.append(BinRef(expect_first, b[0], ArtifactRef.make("bins", b[2], b[1])))
            expect_first += b[0]
        if expect_first != len(versions) + 1:
            f.fail(f"bins cover {expect_first - 1} versions, the index has {len(versions)}",
                   "bins")
        return cls(f.integer("version", 1), _time_field(f, "expires"), tuple(keys),
                   tuple(versions), tuple(bins))


def _decode_versions(f: Fields) -> list[IndexVersion]:
    """The ``versions`` array, every field checked (one pass, plain type checks: a client
    decodes a 1,000-version index before every plan)."""
    out: list[IndexVersion] = []
    seen: set[str] = set()
    fullmatch = VERSION_NAME.fullmatch
    for i, item in enumerate(f.array("versions")):
        if not (type(item) is list and len(item) == 3 and type(item[0]) is str
                and type(item[1]) is int and type(item[2]) is list):
            f.fail("not [name, full bytes, [[from, bytes], ...]]", f"versions[{i}]")
        name, full, deltas = item
        if not fullmatch(name) or name in seen or not 0 <= full <= _MAX_LEN:
            _bad_version(f, i, name, seen)
        seen.add(name)
        edges = []
        sources = set()
        for d in deltas:
            if not (type(d) is list and len(d) == 2 and type(d[0]) is int
                    and type(d[1]) is int and 1 <= d[0] <= i and 0 <= d[1] <= _MAX_LEN):
                f.fail("a delta is not [older position, bytes]", f"versions[{i}]")
            if d[0] in sources:
                f.fail("two deltas from the same version", f"versions[{i}]")
            sources.add(d[0])
            edges.append((d[0], d[1]))
        out.append(IndexVersion(name, full, tuple(edges)))
    return out


def _bad_version(f: Fields, i: int, name: str, seen: set[str]) -> NoReturn:
    """The error for version ``i`` whose name or full size did not check."""
    where = f"versions[{i}]"
    try:
        check_version_name(name)
    except ValueError as exc:
        f.fail(str(exc), where)
    if name in seen:
        f.fail(f"version {name!r} listed twice", where)
    f.fail("full bytes out of range", where)


class DeltaRef(Value, frozen=True):
    """A delta into a version, from the version at ``source`` (position)."""

    source: int
    ref: ArtifactRef


class VersionRecord(Value, frozen=True):
    """What a bin says about one version."""

    name: str
    #: content identity (``tree-sum`` of the release tree, hex)
    identity: str
    #: bytes of the release's plain send stream
    stream_size: int
    #: the full index (chunk description + pack table)
    full: ArtifactRef
    deltas: tuple[DeltaRef, ...]
    #: the solid full (``repo/solid.py``); None in releases added before it existed (a
    #: reader that does not know the key ignores it and fetches the chunked full)
    solid: Solid | None = None

    def encode(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "identity": self.identity,
            "stream_size": self.stream_size,
            "full": self.full.encode(),
            "deltas": [{"from": d.source, **d.ref.encode()} for d in self.deltas],
        }
        if self.solid is not None:
            out["solid"] = self.solid.encode()
        return out

    @classmethod
    def decode(cls, f: Fields) -> VersionRecord:
        deltas = tuple(DeltaRef(d.integer("from", 1), ArtifactRef.decode(d, "deltas"))
                       for d in f.items("deltas"))
        name = f.text("name")
        try:
            check_version_name(name)
        except ValueError as exc:
            f.fail(str(exc), "name")
        solid = Solid.decode(f.sub("solid")) if "solid" in f.obj else None
        return cls(name, f.hex64("identity"), f.integer("stream_size", 0, _MAX_LEN),
                   ArtifactRef.decode(f.sub("full"), "fulls"), deltas, solid)


class Bin(Value, frozen=True):
    """A bin file: the records of consecutive versions from position ``first``."""

    first: int
    versions: tuple[VersionRecord, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {
            "type": "btrdelta-bin",
            "spec": SPEC_VERSION,
            "first": self.first,
            "versions": [v.encode() for v in self.versions],
        }

    @classmethod
    def decode(cls, obj: Any, source: str) -> Bin:
        f = Fields(obj, source)
        f.expect("type", "btrdelta-bin")
        f.expect("spec", SPEC_VERSION)
        records = tuple(VersionRecord.decode(v) for v in f.items("versions"))
        return cls(f.integer("first", 1), records)


class Timestamp(Value, frozen=True):
    """The signed part of ``timestamp.json``."""

    version: int
    expires: int
    index_version: int
    index_length: int
    index_blake3: str

    @property
    def index_path(self) -> str:
        return f"index/{self.index_version}.json"

    def encode(self) -> dict[str, Any]:
        return {
            "type": "btrdelta-timestamp",
            "spec": SPEC_VERSION,
            "version": self.version,
            "expires": format_time(self.expires),
            "index": {"version": self.index_version, "path": self.index_path,
                      "length": self.index_length, "blake3": self.index_blake3},
        }

    @classmethod
    def decode(cls, obj: Any, source: str) -> Timestamp:
        f = Fields(obj, source)
        f.expect("type", "btrdelta-timestamp")
        f.expect("spec", SPEC_VERSION)
        ix = f.sub("index")
        out = cls(f.integer("version", 1), _time_field(f, "expires"), ix.integer("version", 1),
                  ix.integer("length", 1, 64 << 20), ix.hex64("blake3"))
        ix.expect("path", out.index_path)
        return out
