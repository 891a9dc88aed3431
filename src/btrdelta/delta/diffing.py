"""``delta make``'s diffing: which old file a new file is diffed against, the diff itself
(in a worker thread), and the records a patched file becomes.

A *group* is the data records of one file (consecutive WRITE / CLONE / ENCODED_WRITE /
FALLOCATE / UPDATE_EXTENT on one path), buffered by :mod:`.make`. Its *base* is the old
file it is diffed against: its origin in the old snapshot, else (:class:`OldIndex`) the old
file with the same name whose path is most alike. :func:`diff_group` runs in a worker
thread (the codec libraries release the GIL): the group's new content is the concatenated
data of its WRITEs and of the ENCODED_WRITEs :mod:`.recompress` regenerates bit for bit; a
new content equal to the old file is a ``same`` patch, found by comparing the two block by
block without a copy of either; other files are diffed with at most ``_BIG`` bytes of old +
new content in flight across the workers, and with the carrier on, an uncompressed
HDiffPatch diff (``hdiff-raw``, compressed by the carrier with everything around it)
competes with the compressed patches. A patch is kept only if it is smaller than the data
it replaces, and only after applying it gave the new content back. :func:`patched_items`
turns the result into PATCH (or CPATCH) + PDATA + PWRITE / PENC records, the group's other
records staying as they were, in order.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from ..errors import BtrdeltaError
from ..fs.sandbox import file_size as old_file_size
from ..fs.sandbox import open_regular as open_old_file
from ..stream import records as R
from ..stream.codec import encode_record
from ..stream.constants import CMD_HEADER, KERNEL_WRITE_SIZE
from .codecs import AUTO, CODECS, Codec, get_codec, make_auto
from .commands import RawCommand
from .encoding import can_compact
from .format import (
    CP_EDITS_ALGO,
    CP_NEW_ALGO,
    CP_OLD_ALGO,
    CP_SAME_ALGO,
    DIGEST_SIZE,
    EDITS2_CODEC,
    EDITS_CODEC,
    HDIFF_LZMA_CODEC,
    NO_DIGEST,
    PDATA_CHUNK,
    SAME_CODEC,
    BtrfsCommand,
    DeltaItem,
    HashAlgo,
    Patch,
    PatchData,
    PEncoded,
    PWrite,
    patch_refusal,
)
from .nearest import MIN_SKETCH, OldIndex
from .oldfiles import digest, hasher, read_old_file
from .options import MakeOptions
from .recompress import LevelGuesser, natural_extent, regenerable
from .writer import INNER_PATCH_MAX, RAW_RATIO

__all__ = ["Group", "Result", "canonical_write", "diff_group", "patched_items",
           "new_digest_only", "raw_commands"]


# --- groups -----------------------------------------------------------------------------


class Group:
    __slots__ = (
        "base", "buffering", "held", "name", "old_size", "path", "records", "version",
        "write_bytes", "writes",
    )

    # base: the old file at the group's own base path (None: there is none)
    # name: that base path, whose name finds other candidates (:mod:`.nearest`)
    # write_bytes: WRITE data + decompressed size of candidate ENCODED_WRITEs
    # writes: WRITEs + candidate ENCODED_WRITEs
    # held: its WRITE records hold their header alone, their data a view of the new content
    #   (:func:`_hold_content`; :func:`raw_commands` gives their bytes)

    def __init__(self, path: bytes, base: bytes | None, version: int, buffering: bool) -> None:
        self.path = path
        self.name = base if base is not None else path
        self.base = base
        self.version = version
        self.buffering = buffering
        self.records: list[RawCommand] = []
        self.write_bytes = 0
        self.writes = 0
        self.old_size = 0
        self.held = False


def canonical_write(r: RawCommand, version: int) -> bool:
    """Whether our encoder gives back exactly the raw bytes of this WRITE."""
    rec = r.rec
    if not len(rec.data):  # type: ignore[union-attr]
        return False
    try:
        pieces = encode_record(rec, version)
    except BtrdeltaError:
        return False
    head = pieces[0] + pieces[1]
    return r.raw.startswith(head) and len(r.raw) == len(head) + (
        len(pieces[2]) if len(pieces) > 2 else 0
    )


def _canonical(r: RawCommand, version: int) -> bool:
    """Whether our encoder gives back exactly the raw bytes of this command."""
    try:
        pieces = encode_record(r.rec, version)
    except BtrdeltaError:
        return False
    return sum(len(p) for p in pieces) == len(r.raw) and b"".join(
        bytes(p) for p in pieces
    ) == r.raw


@dataclass
class Result:
    codec: Codec | None  # None: same content
    patch: bytes
    old_size: int
    old_digest: bytes
    new_digest: bytes
    new_size: int
    #: bytes of the original stream the patch stands for (WRITE data, encoded payloads)
    replaced: int
    #: record index -> (level, decompressed length) of regenerated ENCODED_WRITEs
    encoded: dict[int, tuple[int, int]]
    #: the old file patched against (None: the group's own base)
    base: bytes | None = None
    #: what the patch costs in the delta
    cost: int = 0
    #: more old files after ``base`` in the old content (format 6 BASES)
    bases: tuple[bytes, ...] = ()


def _content(
    group: Group, guesser: LevelGuesser | None
) -> tuple[list[Any], int, dict[int, tuple[int, int]]]:
    """The group's new content pieces, the stream bytes they replace, regenerated extents."""
    pieces: list[Any] = []
    replaced = 0
    encoded: dict[int, tuple[int, int]] = {}
    for i, r in enumerate(group.records):
        rec = r.rec
        if type(rec) is R.Write:
            pieces.append(rec.data)
            replaced += len(rec.data)
        elif type(rec) is R.EncodedWrite and guesser is not None:
            if not regenerable(rec.compression):
                continue
            raw = natural_extent(rec.data, rec.compression)
            if raw is None or not _canonical(r, group.version):
                continue
            level = guesser.find(raw, rec.data, rec.compression)
            if level is None:
                continue
            encoded[i] = (level, len(raw))
            pieces.append(raw)
            replaced += len(rec.data)
    return pieces, replaced, encoded


def _places(group: Group, encoded: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
    """(content position, file offset) of each piece of the group's new content, in order
    (:func:`_content`'s pieces): where a diff in windows lines its parts up
    (:func:`~.codecs.hdiff.windowed_diff`)."""
    out = []
    pos = 0
    for i, r in enumerate(group.records):
        rec = r.rec
        if type(rec) is R.Write:
            out.append((pos, rec.offset))
            pos += len(rec.data)
        elif i in encoded:
            out.append((pos, rec.offset))  # type: ignore[union-attr]
            pos += encoded[i][1]
    return out


def _hold_content(group: Group, new: bytes, encoded: dict[int, tuple[int, int]]) -> None:
    """Make the group's WRITE records views of ``new``, the content joined from their data
    (and regenerated extents, in record order), keeping only their headers, so their own
    copies are freed: a file being diffed is held once, not twice (scipy's 35 MB library:
    33 MiB less at the peak). Each WRITE was checked to be its header followed by its data
    (:func:`canonical_write`), so :func:`raw_commands` gives back the same bytes."""
    pos = 0
    records = group.records
    for i, r in enumerate(records):
        rec = r.rec
        if type(rec) is R.Write:
            n = len(rec.data)
            records[i] = RawCommand(r.cmd, r.raw[: len(r.raw) - n],
                                    R.Write(rec.path, rec.offset, memoryview(new)[pos : pos + n]))
            pos += n
        elif i in encoded:
            pos += encoded[i][1]
    assert pos == len(new)
    group.held = True


def raw_commands(group: Group) -> Iterator[bytearray]:
    """The raw bytes of the group's records, as read (a held group's WRITEs put back
    together)."""
    for r in group.records:
        if group.held and type(r.rec) is R.Write:
            yield r.raw + r.rec.data
        else:
            yield r.raw


def _carried_cost(patch: bytes) -> int:
    """About what an uncompressed patch costs inside the zstd carrier: its size alone
    compressed, less a frame's overhead; a tiny patch (a few edits), which cannot compress
    alone, compresses to ~60% with the patches around it (measured on the rebuilt-release
    pair: 123 patches of ~70 bytes took 42 bytes each in the carrier)."""
    # a compressor object is not thread-safe: one per call (the patches are small)
    alone = max(1, len(zstandard.ZstdCompressor(level=19).compress(patch)) - 12)
    return min(alone, len(patch) * 7 // 10) if len(patch) <= _TINY_PATCH else alone


#: patches up to this size are estimated by ratio in the carrier (see _carried_cost)
_TINY_PATCH = 128


class _Budget:
    """Bytes of old + new content diffed at once (a larger pair runs alone), so ``-j``
    workers do not multiply the memory a codec needs for the largest files."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


#: old + new bytes diffed concurrently (HDiffPatch needs ~4x the old file besides)
_BIG = _Budget(48 << 20)


#: CHUNK of a PWRITE standing for one WRITE no longer than this (the v1 kernel's WRITE size)
ONE_WRITE_CHUNK = KERNEL_WRITE_SIZE[1]
#: files whose ``hdiff-raw`` patch is at most this long (a few edits) also get an ``edits2``
#: patch (codec 6, format 8)
EDITS_TRY = 4 << 10
#: files whose best compressed patch is at least this long also get an ``hdiff-lzma`` patch
#: (codec 7, format 9: the raw diff in one LZMA2 stream; below, the carrier does as well),
#: unless their new content is compressed extents (a ``--compressed-data`` stream, whose
#: receive is on the line: scipy's with 9 such patches took 0.34-0.35 CPU s instead of
#: 0.31, for a delta 5 % smaller)
LZMA_TRY = 512
#: files above this whose raw diff is at least :data:`LZMA_ONLY_RAW` long get their
#: ``hdiff-lzma`` patch first, and if it is at most half the raw diff, alone of the
#: compressed HDiffPatch ones (no ``hdiff``, nor zstd): of 36 changed files with raw diffs
#: of 16 KiB or more (six pairs, session 22), ``hdiff`` was smaller for 3, all below 88 KB
#: and by 1.2 % at most, and of pandas 2.2.2 -> 2.2.3, Node.js 18 and containerd's large
#: binaries none (their LZMA patches 14-37 % of the raw diffs); its level 19 took 1.0 of
#: pandas's 4.8 CPU seconds. (A raw diff LZMA packs poorly is mostly new data, which
#: ``hdiff``'s zstd, its window the whole file, may pack better: a 12 MiB file of 4 KiB
#: blocks drawn from 4 MiB of random ones, tests/delta/test_make_memory.py.)
LZMA_ONLY_FILE = 128 << 10
LZMA_ONLY_RAW = 64 << 10


def _same_as_old(
    old_root: str | os.PathLike[str], base: bytes, pieces: list[Any], size: int,
    opts: MakeOptions,
) -> bytes | None:
    """The digest of the old file if its content is exactly ``pieces`` (read in bounded
    blocks: a rebuilt but unchanged file costs no copy of either side), else ``None``."""
    try:
        fd = open_old_file(old_root, base)
    except BtrdeltaError:
        return None
    if fd is None:
        return None
    h = hasher(opts.hash_algo)
    try:
        if os.fstat(fd).st_size != size:
            return None
        for piece in pieces:
            view = memoryview(piece)
            pos = 0
            while pos < len(view):
                block = os.read(fd, min(len(view) - pos, 1 << 20))
                if not block or view[pos : pos + len(block)] != block:
                    return None
                h.update(block)
                pos += len(block)
        if os.read(fd, 1):
            return None
    except OSError:
        return None
    finally:
        os.close(fd)
    return bytes(h.digest())


#: a same-path patch costing more than this fraction of the new content is a poor base:
#: old files found by name or content are tried too
POOR_BASE = 0.25
#: a base found by name or content must make the patch cost less than this fraction of
#: the new content compressed alone (zstd -3), or the carrier does as well without it
FOUND_GAIN = 0.75


def diff_group(
    old_root: str | os.PathLike[str], group: Group, opts: MakeOptions,
    guesser: LevelGuesser | None, index: OldIndex | None = None,
) -> Result | None:
    """Worker: diff the group's new content against its base, or against the old files
    nearest to it (runs in a thread)."""
    pieces, replaced, encoded = _content(group, guesser)
    if not pieces:
        return None
    places = _places(group, encoded)
    size = sum(len(p) for p in pieces)
    if group.base is not None and size == group.old_size:
        same = _same_as_old(old_root, group.base, pieces, size, opts)
        if same is not None:
            return Result(None, b"", size, same, same, size, replaced, encoded)
    new = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(pieces) > 1:
        _hold_content(group, new, encoded)
    del pieces[:]
    if opts.level and size >= RUNS_MIN and _runs_only(new):
        return None
    best: Result | None = None
    if group.base is not None:
        best = _diff_base(old_root, group.base, new, opts, replaced, encoded, places)
        if best is not None and best.cost <= POOR_BASE * size:
            return best
    if index is None:
        return best
    # no old file at its path, or a poor one: the nearest old files by name and content;
    # an old file of the same base name (a versioned directory renamed) is taken like the
    # file's own, others only when they beat the file compressed alone by far
    found = index.by_name(group.name, size, exclude=group.base)[:1]
    if size >= MIN_SKETCH:
        found += [(c, False) for c in index.by_content(new, exclude=group.base, limit=1)
                  if c not in (f[0] for f in found)]
    alone: int | None = None
    for base, same_name in found:
        res = _diff_base(old_root, base, new, opts, replaced, encoded, places)
        if res is None or (best is not None and res.cost >= best.cost):
            continue
        if not same_name:
            if alone is None:
                alone = len(zstandard.ZstdCompressor(level=3).compress(new))
            if res.cost >= FOUND_GAIN * alone:
                continue
        best = res
    if opts.bases > 1 and size >= MIN_SKETCH and (best is None or best.cost > POOR_BASE * size):
        # one old file is not enough: the nearest few, one after the other, as one base
        first = best.base or group.base if best is not None else None
        near = index.by_content(new, exclude=first, limit=opts.bases, share=8)
        paths = ([first] if first else []) + near
        res = _diff_bases(old_root, tuple(paths[: opts.bases]), new, opts, replaced, encoded)
        if res is not None and (best is None or res.cost < best.cost):
            if alone is None:
                alone = len(zstandard.ZstdCompressor(level=3).compress(new))
            if res.cost < FOUND_GAIN * alone:
                best = res
    return best


#: new contents from this size on are first checked for being runs of bytes alone
RUNS_MIN = 256 << 10


def _runs_only(new: bytes) -> bool:
    """Whether ``new`` is all but entirely runs of equal bytes (zstd level 1 makes it at
    least 1024 times smaller): the carrier then carries it for next to nothing, and
    HDiffPatch would search it position by position (its covers of runs are refused while
    the old file has runs of the same byte: a sparse file's holes sent as zeros, blocks of
    one byte). Measured on the scenario many-extents-sparse (an 8 MB old file, 1.6 MB of
    new content in 390 writes): 1.7 s of CPU in the diff for a 718-byte patch; zstd level 1
    takes ~2.5 ms a MB, and real binaries compress 2-3 times."""
    return len(zstandard.ZstdCompressor(level=1).compress(new)) <= len(new) >> 10


#: new contents from this size on are first checked for being unrelated to the old file
UNRELATED_MIN = 1 << 20
#: pieces of the new content looked for in the old one, and their length
UNRELATED_SAMPLES = 64
UNRELATED_PIECE = 64


def _unrelated(old: bytes, new: bytes) -> bool:
    """Whether no patch can pay: ``new`` does not compress (zstd's fastest level leaves
    :data:`RAW_RATIO` of it: random bytes, media, encrypted data) and none of
    :data:`UNRELATED_SAMPLES` pieces spread over it is found in ``old`` (a file of such
    data written anew). HDiffPatch searched it position by position for nothing: a 32 MiB
    file of random bytes rewritten cost a ``device backup`` ~20 s of CPU (session 30).
    A new content sharing a tenth of the old one is missed with odds 0.9**64 (0.1 %)."""
    if len(zstandard.ZstdCompressor(level=1).compress(new)) < RAW_RATIO * len(new):
        return False
    step = (len(new) - UNRELATED_PIECE) // (UNRELATED_SAMPLES - 1)
    return all(old.find(new[i * step : i * step + UNRELATED_PIECE]) < 0
               for i in range(UNRELATED_SAMPLES))


#: largest old content made of several old files (read whole, and ~4x that diffed)
MULTI_MAX = 32 << 20


def _diff_bases(
    old_root: str | os.PathLike[str], paths: tuple[bytes, ...], new: bytes,
    opts: MakeOptions, replaced: int, encoded: dict[int, tuple[int, int]],
) -> Result | None:
    """The patch from the old files ``paths`` (at least two), one after the other, to
    ``new``, if one is worth writing."""
    sizes = [old_file_size(old_root, p) or 0 for p in paths]
    keep = [(p, n) for p, n in zip(paths, sizes, strict=True) if n]
    total = 0
    for i, (_, n) in enumerate(keep):
        if total + n > min(MULTI_MAX, opts.max_file_size):
            del keep[i:]
            break
        total += n
    if len(keep) < 2:
        return None
    with _BIG.hold(len(new) + total):
        pieces = []
        for p, n in keep:
            try:
                data = read_old_file(old_root, p, expected_size=n, max_size=n)
            except BtrdeltaError:
                return None
            if data is None:
                return None
            pieces.append(data)
        old = b"".join(pieces)
        del pieces
        best = _best_patch(old, new, opts, replaced, lzma=opts.lzma_patches and not encoded)
        if best is None:
            return None
        cost, codec, patch = best
        old_digest = digest(opts.hash_algo, old)
    return Result(codec, patch, len(old), old_digest, digest(opts.hash_algo, new), len(new),
                  replaced, encoded, base=keep[0][0], cost=cost,
                  bases=tuple(p for p, _ in keep[1:]))


def _diff_base(
    old_root: str | os.PathLike[str], base: bytes, new: bytes, opts: MakeOptions,
    replaced: int, encoded: dict[int, tuple[int, int]],
    places: list[tuple[int, int]] | None = None,
) -> Result | None:
    """The patch from the old file ``base`` to ``new``, if one is worth writing
    (``places``: :func:`_places`)."""
    old_size = old_file_size(old_root, base)
    if not old_size or old_size > opts.max_file_size:
        return None
    with _BIG.hold(len(new) + old_size):
        try:
            old = read_old_file(old_root, base, max_size=opts.max_file_size)
        except BtrdeltaError:
            return None
        if not old:
            return None
        old_digest = digest(opts.hash_algo, old)
        if len(old) == len(new) and old == new:
            return Result(None, b"", len(old), old_digest, old_digest, len(new), replaced,
                          encoded, base=base)
        if len(new) >= UNRELATED_MIN and _unrelated(old, new):
            return None
        best = _best_patch(old, new, opts, replaced, lzma=opts.lzma_patches and not encoded,
                           places=places)
        if best is None:
            return None
        cost, codec, patch = best
    return Result(codec, patch, len(old), old_digest, digest(opts.hash_algo, new), len(new),
                  replaced, encoded, base=base, cost=cost)


def _best_patch(
    old: bytes, new: bytes, opts: MakeOptions, replaced: int, *, lzma: bool = True,
    places: list[tuple[int, int]] | None = None,
) -> tuple[int, Codec, bytes] | None:
    """The cheapest allowed patch from ``old`` to ``new``: (its cost in the delta, codec,
    patch bytes), or ``None`` if none costs less than the ``replaced`` stream bytes (or the
    patch does not give ``new`` back: a codec bug never reaches a delta). ``lzma``: an
    ``hdiff-lzma`` patch may be tried (not for a new content of compressed extents: see
    :data:`LZMA_TRY`). ``places``: where the pieces of ``new`` are in its file
    (:func:`_places`)."""
    # (cost in the delta, codec, patch bytes)
    candidates: list[tuple[int, Codec, bytes]] = []
    if opts.codec == "auto":
        raw_codec = CODECS[4]
        raw: bytes | None = None
        if raw_codec.available():
            # one diff gives every HDiffPatch candidate (hdiff is recompressed from it)
            raw = raw_codec.make_raw(old, new, places)  # type: ignore[attr-defined]
        if not opts.level:  # (no carrier: every patch is stored as it is)
            lzma = False
        lzma_codec = CODECS[HDIFF_LZMA_CODEC]
        packed: bytes | None = None
        # the length of an LZMA patch made and let go (the memory: a poor one is about as
        # long as the raw diff), made again below only if it is the smaller after all
        poor = -1
        if (lzma and raw is not None and len(new) > LZMA_ONLY_FILE
                and len(raw) >= LZMA_ONLY_RAW):
            packed = lzma_codec.from_raw(raw, len(new))  # type: ignore[attr-defined]
            if 2 * len(packed) > len(raw):
                poor, packed = len(packed), None
        if packed is None or patch_refusal(lzma_codec.codec_id, len(packed), len(old),
                                           len(new)):
            codec, patch = make_auto(old, new, AUTO, hdiff_raw=raw,
                                     lzma_next=lzma and raw is not None)
            candidates.append((len(patch), codec, patch))
        if not opts.level:
            raw = None
        # inside the carrier an uncompressed patch is compressed with everything else
        if raw is not None and len(raw) <= INNER_PATCH_MAX:
            candidates.append((_carried_cost(raw), raw_codec, raw))
        if (packed is None and lzma and raw is not None and len(patch) >= LZMA_TRY
                and poor < len(patch)):
            # HDiffPatch's four streams compressed together by LZMA: 6-8 % below hdiff's
            # zstd on rebuilt native code (numpy, regex), where bsdiff's bzip2 is ~3 %
            packed = lzma_codec.from_raw(raw, len(new))  # type: ignore[attr-defined]
        if packed is not None:
            candidates.append((len(packed), lzma_codec, packed))
        if raw is not None and len(raw) <= EDITS_TRY:
            # a few edits: their bytes and positions alone (format 8's edits2)
            edits = CODECS[EDITS2_CODEC].make(old, new)
            if len(edits) <= INNER_PATCH_MAX:
                candidates.append((_carried_cost(edits), CODECS[EDITS2_CODEC], edits))
    else:
        codec = get_codec(opts.codec)
        patch = codec.make(old, new)
        candidates.append((len(patch), codec, patch))
    # the rule the expansion enforces (on the patch's length, whatever it costs), then
    # the cheapest of what is left, if it costs less than the data it replaces
    allowed = [
        c for c in candidates
        if c[0] < replaced and patch_refusal(c[1].codec_id, len(c[2]), len(old), len(new)) is None
    ]
    if not allowed:
        return None
    best = min(allowed, key=lambda c: c[0])
    if best[1].apply(old, best[2], new_size=len(new)) != new:  # pragma: no cover - codec bug
        return None
    return best


def _runs(group: Group, items: list[DeltaItem], encoded: dict[int, tuple[int, int]]) -> None:
    """The group's records with WRITE runs as PWRITE records, regenerated extents as PENC."""
    run: list[int] | None = None  # offset, length, chunk, last length

    def close() -> None:
        nonlocal run
        if run is not None:
            # one WRITE: any CHUNK of at least its length gives it back; the same one for
            # every such file compresses to nothing (its length as CHUNK cost ~2 bytes a
            # file in the carrier: the rebuilt-release pair, 123 small files)
            chunk = max(run[2], ONE_WRITE_CHUNK) if run[1] == run[2] else run[2]
            items.append(PWrite(run[0], run[1], chunk))
            run = None

    for i, r in enumerate(group.records):
        rec = r.rec
        enc = encoded.get(i)
        if enc is not None:
            assert type(rec) is R.EncodedWrite
            close()
            crc = CMD_HEADER.unpack_from(r.raw)[2]
            items.append(PEncoded(
                rec.offset, enc[1], rec.unencoded_file_len, rec.unencoded_len,
                rec.unencoded_offset, rec.compression, rec.encryption, len(rec.data), enc[0],
                crc,
            ))
        elif type(rec) is R.Write:
            n = len(rec.data)
            if (
                run is not None
                and run[0] + run[1] == rec.offset
                and run[3] == run[2]
                and n <= run[2]
            ):
                run[1] += n
                run[3] = n
            else:
                close()
                run = [rec.offset, n, n, n]
        else:
            close()
            items.append(BtrfsCommand(r.cmd, memoryview(r.raw)))
    close()


def new_digest_only(res: Result) -> bool:
    """Whether an ``edits`` / ``edits2`` patch on one old file carries its new content's
    4-byte digest instead of the old file's (format 10, CPATCH flag ``CP_NEW``): where that
    content goes out as regenerated compressed extents (PENC, a ``--compressed-data``
    stream), which ``receive`` then writes as data instead of recompressing them for the
    one check they have otherwise, their CRC (``docs/formats/delta-stream.md`` §2.3)."""
    return bool(res.encoded)


def patched_items(group: Group, res: Result, opts: MakeOptions) -> list[DeltaItem]:
    view = memoryview(res.patch)
    inline = len(view) <= PDATA_CHUNK
    codec_id = SAME_CODEC if res.codec is None else res.codec.codec_id
    algo, old_digest, new_digest = opts.hash_algo, res.old_digest, res.new_digest
    new_algo: int | None = None
    compact = opts.level > 0 and len(view) <= INNER_PATCH_MAX
    if compact and algo == HashAlgo.BLAKE3_128:
        # format 4 (CPATCH, inside the carrier): BLAKE3's output is a stream, so its first
        # 8 / 4 bytes are the short digests; the old file is checked with 8 bytes before
        # use, the patched content with 4 (the DEND digest covers the whole stream)
        if res.codec is None:
            algo, old_digest = CP_SAME_ALGO, old_digest[: DIGEST_SIZE[CP_SAME_ALGO]]
        elif res.codec.codec_id in (EDITS_CODEC, EDITS2_CODEC) and not res.bases:
            if new_digest_only(res):
                # format 10: the new content's 4-byte digest instead of the old file's, where
                # it goes out as regenerated compressed extents (PENC): checked, they are
                # written as data by ``receive`` instead of recompressed for their CRC
                algo, old_digest = NO_DIGEST, b""
                new_algo, new_digest = CP_NEW_ALGO, new_digest[: DIGEST_SIZE[CP_NEW_ALGO]]
            else:
                # formats 7 and 8: a 4-byte old digest, no new digest (the codec is exactly
                # specified; the DEND digest covers the expanded stream)
                algo, old_digest = CP_EDITS_ALGO, old_digest[: DIGEST_SIZE[CP_EDITS_ALGO]]
                new_algo, new_digest = NO_DIGEST, b""
        else:
            algo, old_digest = CP_OLD_ALGO, old_digest[: DIGEST_SIZE[CP_OLD_ALGO]]
            new_algo, new_digest = CP_NEW_ALGO, new_digest[: DIGEST_SIZE[CP_NEW_ALGO]]
    elif res.codec is None and algo == HashAlgo.BLAKE3_128:
        # outside the carrier, a 'same' patch's digest only checks the local old file
        algo, old_digest = HashAlgo.BLAKE3_64, old_digest[:8]
    patch = Patch(
        group.path, res.base or group.base, codec_id, algo, res.old_size,
        old_digest, res.new_size, new_digest if res.codec else old_digest,
        len(res.patch),
        view if inline and res.codec is not None else None,
        new_algo,
        bases=res.bases,
    )
    items: list[DeltaItem] = [patch]
    if not inline:
        items.extend(
            PatchData(view[i : i + PDATA_CHUNK]) for i in range(0, len(view), PDATA_CHUNK)
        )
    _runs(group, items, res.encoded)
    if compact and can_compact(patch) and len(items) == 2:
        run = items[1]
        if type(run) is PWrite and run.offset == 0 and run.length == res.new_size:
            # the one PWRITE of a whole file is implied by the CPATCH
            patch.auto_chunk = run.chunk
            del items[1]
    return items
