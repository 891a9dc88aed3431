"""A client's view of a repository: the verified index, its bins and full indexes.

:func:`load_index` runs TUF's update steps (``freshness``) on each mirror in turn until one
serves a consistent, fresh, signed state: ``timestamp.json``, then the index it names (from
the local cache when the hash is one already verified, else downloaded and checked against
the timestamp's length and hash), the root key's signature on the index, the timestamp's
signature by a key the index lists, then versions and expiry. Bins and full indexes are
immutable and named by their hash: they are fetched once, checked, and kept in a
:class:`MetaCache`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3

from .. import trust
from .._value import Value
from ..errors import BtrdeltaError, ChecksumError, StreamFormatError, TransportError
from ..fs.atomic import write_atomic
from .canonical import Fields, parse_json
from .freshness import TrustedState, check_index, check_timestamp
from .fullindex import FullIndex, decode_full_index
from .mirror import Mirrors
from .model import ArtifactRef, Bin, Index, Timestamp, VersionRecord
from .signing import CONTEXT_INDEX, CONTEXT_TIMESTAMP, open_document

__all__ = ["MetaCache", "Verified", "get_timestamp", "keep_timestamp", "load_index",
           "version_records"]

_MAX_TIMESTAMP = 64 << 10


class MetaCache:
    """Verified metadata files kept by their BLAKE3 (``None`` directory: no cache;
    ``readonly``: what is there is used, nothing is added, as on a dry run)."""

    def __init__(self, directory: Path | None, *, readonly: bool = False) -> None:
        self.dir = directory
        self.readonly = readonly

    def get(self, digest: str) -> bytes | None:
        if self.dir is None:
            return None
        try:
            data = (self.dir / digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if blake3.blake3(data).hexdigest() == digest else None

    def put(self, digest: str, data: bytes) -> None:
        """Keep ``data`` (whose BLAKE3 is ``digest``). Not ``fsync``-ed: :meth:`get` hashes
        what it reads, so a file a power cut left short or empty is a miss (fetched
        again), never used; an update's 3-4 cached documents cost 6-8 ``fsync``s before
        (~0.5 ms each on ext4)."""
        if self.dir is None or self.readonly:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / digest, data, durable=False)

    def fetch(self, mirrors: Mirrors, ref: ArtifactRef) -> bytes:
        data = self.get(ref.blake3)
        if data is None:
            data = mirrors.fetch(ref.path, length=ref.length, digest=ref.blake3)
            self.put(ref.blake3, data)
        return data


class Verified(Value):
    """The repository state a client trusts now."""

    index: Index
    timestamp: Timestamp
    index_blake3: str
    index_bytes: int
    timestamp_bytes: int
    #: metadata bytes downloaded (timestamp, index unless cached, bins, full indexes)
    downloaded: int = 0


def get_timestamp(mirrors: Mirrors, url: str) -> bytes:
    """The bytes of ``timestamp.json`` on mirror ``url``; its absence (HTTP 404, no such
    file) named as what it means to a person who mistyped the URL or has not signed."""
    try:
        return mirrors.get(url, "timestamp.json", _MAX_TIMESTAMP)
    except TransportError as exc:
        if exc.status != 404:
            raise
        raise TransportError(f"{exc.message}: no signed repository here (a wrong URL, or "
                             "not signed yet: `btrdelta repo sign` writes timestamp.json)",
                             url=exc.url, status=404) from None


def load_index(mirrors: Mirrors, keys: Sequence[trust.PublicKey], trusted: TrustedState,
               cache: MetaCache, *, now: float | None = None,
               on_newer: Callable[[int], None] | None = None) -> Verified:
    """The verified index (see the module docstring); ``trusted`` is not modified.

    A mirror's ``timestamp.json`` newer than the trusted one whose index cannot be had
    (a mirror that synced it first) still counts once its signature verifies with the
    timestamp keys of the trusted index (in ``cache``): no later mirror's older timestamp
    is taken in this run (TUF 1.0 §5.4.3), and ``on_newer(version)`` is told, for the
    caller to keep it (§5.4.5: the next run refuses an older one too)."""
    when = time.time() if now is None else now
    before = mirrors.stats.bytes_received
    newest = [trusted.timestamp_version]

    def attempt(url: str) -> Verified:
        ts_bytes = get_timestamp(mirrors, url)
        claimed = Timestamp.decode(Fields(parse_json(ts_bytes, "timestamp.json"),
                                          "timestamp.json").get("signed"), "timestamp.json")
        floor = TrustedState(trusted.index_version, newest[0], trusted.index_blake3)
        # an expired or rolled-back timestamp is refused before anything it names is fetched
        check_timestamp(claimed, now=when, trusted=floor)
        try:
            return _verify(mirrors, keys, floor, cache, ts_bytes, claimed, when)
        except (TransportError, ChecksumError, StreamFormatError):
            if claimed.version > newest[0] and _signed_as_trusted(ts_bytes, keys, trusted,
                                                                   cache):
                newest[0] = claimed.version
                if on_newer is not None:
                    on_newer(claimed.version)
            raise

    out = mirrors.each("timestamp.json", attempt)
    out.downloaded = mirrors.stats.bytes_received - before
    return out


def _verify(mirrors: Mirrors, keys: Sequence[trust.PublicKey], trusted: TrustedState,
            cache: MetaCache, ts_bytes: bytes, claimed: Timestamp, when: float) -> Verified:
    """The index ``claimed`` names (cached, or fetched from any mirror), verified, and the
    timestamp verified with the keys it lists. A fetched index is cached once verified; a
    cached one is not written again (a file rewritten under its name each update: ~0.9 ms
    of the regex path's start on ext4, where a rename over a file starts its writeback)."""
    data = cache.get(claimed.index_blake3)
    cached = data is not None
    if data is None:
        data = mirrors.fetch(claimed.index_path, length=claimed.index_length,
                             digest=claimed.index_blake3)
    source = claimed.index_path
    index = Index.decode(open_document(data, source, keys, CONTEXT_INDEX), source)
    ts = Timestamp.decode(open_document(ts_bytes, "timestamp.json", _timestamp_keys(index),
                                        CONTEXT_TIMESTAMP), "timestamp.json")
    check_timestamp(ts, now=when, trusted=trusted)
    check_index(index, ts, claimed.index_blake3, now=when, trusted=trusted, source=source)
    if not cached:
        cache.put(claimed.index_blake3, data)
    return Verified(index, ts, claimed.index_blake3, len(data), len(ts_bytes))


def _timestamp_keys(index: Index) -> list[trust.PublicKey]:
    return [trust.parse_public_key(k.encode(), source=f"index/{index.version}.json")
            for k in index.timestamp_keys]


def _signed_as_trusted(ts_bytes: bytes, keys: Sequence[trust.PublicKey],
                       trusted: TrustedState, cache: MetaCache) -> bool:
    """Whether ``ts_bytes`` is signed by a timestamp key of the trusted index (kept in
    ``cache``): false without one, or when the keys changed since."""
    data = cache.get(trusted.index_blake3) if trusted.index_blake3 else None
    if data is None:
        return False
    try:
        source = f"index/{trusted.index_version}.json"
        index = Index.decode(open_document(data, source, keys, CONTEXT_INDEX), source)
        open_document(ts_bytes, "timestamp.json", _timestamp_keys(index), CONTEXT_TIMESTAMP)
    except StreamFormatError:  # (ChecksumError, SignatureError: subclasses)
        return False
    return True


def version_records(mirrors: Mirrors, index: Index, cache: MetaCache,
                    positions: Sequence[int]) -> dict[int, VersionRecord]:
    """The bin records of ``positions``, each bin checked against the index."""
    out: dict[int, VersionRecord] = {}
    for ref in sorted({index.bin_of(p) for p in positions}, key=lambda b: b.first):
        data = cache.fetch(mirrors, ref.ref)
        b = Bin.decode(parse_json(data, ref.ref.path), ref.ref.path)
        if b.first != ref.first or len(b.versions) != ref.count:
            raise ChecksumError("bin does not cover the versions the index says",
                                source=ref.ref.path)
        for k, rec in enumerate(b.versions):
            pos = ref.first + k
            iv = index.versions[pos - 1]
            edges = tuple((d.source, d.ref.length) for d in rec.deltas)
            if rec.name != iv.name or sorted(edges) != sorted(iv.deltas):
                raise ChecksumError(f"record of {rec.name!r} disagrees with the index",
                                    source=ref.ref.path)
            out[pos] = rec
    return out


def full_index(mirrors: Mirrors, rec: VersionRecord, cache: MetaCache) -> FullIndex:
    """The verified full index of a version."""
    data = cache.fetch(mirrors, rec.full)
    full = decode_full_index(data, source=rec.full.path)
    if full.header.image_size != rec.stream_size:
        raise StreamFormatError("full index disagrees with the bin on the stream size",
                                source=rec.full.path)
    return full


def save_trusted(path: Path, verified: Verified | TrustedState) -> None:
    """Remember ``verified`` as the newest trusted state (atomic, durable). A state equal to
    the one kept is not written again (an update against an unchanged index: its two
    ``fsync``s were ~2-5 ms of a short update on ext4)."""
    import json

    state = verified if isinstance(verified, TrustedState) else TrustedState(
        verified.index.version, verified.timestamp.version, verified.index_blake3)
    with contextlib.suppress(BtrdeltaError, OSError):  # (unreadable: written again)
        if read_trusted(path) == state and path.exists():
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(state.encode()) + "\n").encode())


def keep_timestamp(path: Path, version: int) -> None:
    """Remember timestamp ``version`` as seen (``load_index``'s ``on_newer``), the trusted
    index unchanged."""
    old = read_trusted(path)
    if version > old.timestamp_version:
        save_trusted(path, TrustedState(old.index_version, version, old.index_blake3))


def read_trusted(path: Path) -> TrustedState:
    """The trusted state kept at ``path`` (fresh when absent)."""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        return TrustedState.decode(parse_json(data, str(path)), str(path))
    return TrustedState()
