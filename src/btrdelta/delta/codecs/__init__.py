"""Registry of binary delta codecs: stable numeric ids and names, ``make``/``apply``.

Each codec turns ``(old, new)`` into a patch and back: ``apply(old, make(old, new)) == new``.
The id is stored in every PATCH record of a delta stream and is never reused; the name is
the CLI spelling. A codec whose library is not installed stays registered but
``available()`` is false and using it raises :class:`CodecUnavailableError` naming the
missing package, so a delta stream made elsewhere fails with a clear message, not an import
crash. ``auto`` is not a codec: :func:`make_best` tries several and keeps the smallest.

Patches are untrusted input: ``apply`` checks the sizes a patch declares against the
caller's expectation before the library allocates anything, and turns every library error
into :class:`~btrdelta.errors.StreamFormatError`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import BtrdeltaError, StreamFormatError
from .base import Codec, CodecUnavailableError
from .bsdiff import BsdiffCodec
from .edits import EditsCodec, PackedEditsCodec
from .hdiff import HdiffCodec, HdiffLzmaCodec, HdiffRawCodec
from .zstd import ZstdCodec

__all__ = [
    "AUTO",
    "CODECS",
    "Codec",
    "CodecUnavailableError",
    "available_codecs",
    "get_codec",
    "make_auto",
    "make_best",
]

#: id -> codec instance (ids are stable: they are written into delta streams)
CODECS: dict[int, Codec] = {
    c.codec_id: c
    for c in (BsdiffCodec(), ZstdCodec(), HdiffCodec(), HdiffRawCodec(), EditsCodec(),
                PackedEditsCodec(), HdiffLzmaCodec())
}
_BY_NAME: dict[str, Codec] = {c.name: c for c in CODECS.values()}
_BY_NAME["zstd-long"] = _BY_NAME["zstd"]
_BY_NAME["hdiffpatch"] = _BY_NAME["hdiff"]

#: codecs ``auto`` tries, in order (the fast, strong ones; bsdiff is ~4x slower than hdiff
#: for larger patches on typical binaries, so it is only used when asked for)
AUTO: tuple[str, ...] = ("hdiff", "zstd")


def get_codec(key: int | str) -> Codec:
    """The codec with this id or name.

    Raises:
        StreamFormatError: no codec has this id (a delta stream from a newer version).
        BtrdeltaError: no codec has this name.
        CodecUnavailableError: the codec's library is not installed.
    """
    if isinstance(key, int):
        codec = CODECS.get(key)
        if codec is None:
            raise StreamFormatError(f"unknown delta codec id {key}")
    else:
        codec = _BY_NAME.get(key)
        if codec is None:
            names = ", ".join(sorted({"auto", *_BY_NAME}))
            raise BtrdeltaError(f"unknown codec {key!r} (choose from {names})")
    codec.require()
    return codec


def available_codecs() -> list[Codec]:
    """Registered codecs whose libraries are installed."""
    return [c for c in CODECS.values() if c.available()]


def make_best(
    old: bytes, new: bytes, names: Sequence[str] = AUTO, *, hdiff_raw: bytes | None = None
) -> tuple[Codec, bytes]:
    """Make a patch with each available codec of ``names``; return the smallest.

    ``hdiff_raw``: the ``hdiff-raw`` patch of the same files, if already made (``hdiff`` is
    then recompressed from it instead of diffed again).

    Raises:
        CodecUnavailableError: none of the codecs is available.
    """
    best: tuple[Codec, bytes] | None = None
    for name in names:
        codec = _BY_NAME[name]
        if not codec.available():
            continue
        if hdiff_raw is not None and isinstance(codec, HdiffCodec) and codec.codec_id == 3:
            patch = codec.from_raw(hdiff_raw, len(new))
        else:
            patch = codec.make(old, new)
        if best is None or len(patch) < len(best[1]):
            best = (codec, patch)
    if best is None:
        raise CodecUnavailableError(_BY_NAME[names[0]].package,
                                    what=f"codec {names[0]!r} ")
    return best


#: ``auto``: files up to this size get every codec of :data:`AUTO` (cheap, and zstd often
#: wins on small files); larger ones get the first codec, and the others only when its
#: patch is above :data:`AUTO_GOOD_RATIO` of the new size
AUTO_SMALL = 256 << 10
AUTO_GOOD_RATIO = 0.05
#: ``auto``: pairs of files above this (old + new) get the first codec only: zstd's tables
#: are built twice (in the raw-content dictionary, then copied into the context), ~29 MiB
#: for a 2 MiB pair, and it takes ~0.4 s a MB at level 19. No pair above 381 KB chose zstd
#: on the Debian upgrade or scipy pairs (their deltas are the same with 1 MiB as with 4)
AUTO_SECOND_MAX = 1 << 20


#: ``auto`` when an ``hdiff-lzma`` patch is tried next: files above this whose first patch
#: is above :data:`AUTO_LZMA_PATCH` get no other (see :func:`make_auto`)
AUTO_LZMA_SMALL = 128 << 10
AUTO_LZMA_PATCH = 1 << 10


def make_auto(
    old: bytes, new: bytes, names: Sequence[str] = AUTO, *, hdiff_raw: bytes | None = None,
    lzma_next: bool = False,
) -> tuple[Codec, bytes]:
    """The ``auto`` choice: like :func:`make_best`, but a large file whose first patch is
    already small (below 5% of it) is not diffed again with the slower codecs.

    Measured on numpy 1.26.3 -> 1.26.4 (21 changed files, 11 MB): hdiff alone 0.6 s and
    21.0 KB of patches, hdiff + zstd 3.4 s and 20.8 KB.

    ``lzma_next``: the caller tries an ``hdiff-lzma`` patch after this one; a file above
    :data:`AUTO_LZMA_SMALL` whose first patch is above :data:`AUTO_LZMA_PATCH` (or which
    is above :data:`AUTO_SMALL`) then gets no other. Of 309 changed files of 4 KiB to
    1 MiB (pandas 2.2.2 -> 2.2.3, numpy, regex, scipy, django 5.0.6 -> 5.0.7, the Debian
    upgrade), 35 are such; zstd's patch was the smallest of the three for none of them: it
    beat ``hdiff-lzma`` only where the HDiffPatch patch was at most 791 bytes, or on files
    below 88 KB. Its level 19 took 2.1 of pandas's 6.5 CPU seconds (76 files).
    """
    lzma_big = lzma_next and len(new) > AUTO_LZMA_SMALL
    if len(new) <= AUTO_SMALL and not lzma_big:
        return make_best(old, new, names, hdiff_raw=hdiff_raw)
    avail = [n for n in names if _BY_NAME[n].available()]
    if not avail:
        raise CodecUnavailableError(_BY_NAME[names[0]].package,
                                    what=f"codec {names[0]!r} ")
    codec, patch = make_best(old, new, avail[:1], hdiff_raw=hdiff_raw)
    if lzma_big:
        if len(patch) > AUTO_LZMA_PATCH or len(new) > AUTO_SMALL or len(avail) == 1:
            return codec, patch
    elif (len(patch) <= AUTO_GOOD_RATIO * len(new) or len(avail) == 1
            or len(old) + len(new) > AUTO_SECOND_MAX):
        return codec, patch
    other, alt = make_best(old, new, avail[1:])
    return (other, alt) if len(alt) < len(patch) else (codec, patch)
