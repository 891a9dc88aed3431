"""HDiffPatch (``HDIFF13`` compressed diffs, zstd inside) via the ``hdiffpatch`` package.

HDiffPatch's in-memory diff indexes the whole old content (a suffix array of 4 bytes a
byte) while it holds both contents: ~6x the larger file, where ``delta make`` is allowed
64 MiB + 4x it. Old contents above :data:`WINDOW_MIN` are therefore diffed in windows
(:func:`windowed_diff`): the new content in :data:`WINDOW_STEP`-sized parts, each against
the part of the old content it lines up with plus :data:`WINDOW_OVERLAP` on each side, and
the uncompressed patches joined into one ``HDIFF13`` patch (the format's covers are
relative to the previous one, its RLE and new-data streams run over the new content in
order, so the joined patch is an ordinary one: expansion does not change).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from types import ModuleType

from ... import TYPE_CHECKING, _module_found, _native
from ...errors import StreamFormatError
from .base import DEFAULT_MAX_SIZE, Codec, CodecUnavailableError
from .zstd import capped_params

if TYPE_CHECKING:
    from .._hpatch import Output

__all__ = ["WINDOW_MIN", "HdiffCodec", "HdiffLzmaCodec", "HdiffRawCodec", "compress_raw",
           "windowed_diff"]

_MAGIC = b"HDIFF13&"
#: the header of an uncompressed HDIFF13 patch (no compressor name)
_RAW_MAGIC = _MAGIC + b"\x00"

#: old contents larger than this are diffed in windows. A whole diff holds both contents
#: and a suffix array of the old one (4 bytes a byte): ~4.6x the file beside them, where
#: ``delta make`` may take 64 MiB + 4x the larger file, ~38 MiB of which are the
#: interpreter and the make's own state: 2x the file + 26 MiB are left beside both
#: contents, which a whole diff fits up to ~10 MiB. A window holds its new part, its old
#: part and the old part's suffix array, 6x the file / windows + 10x the overlap, which
#: fits from 3 windows on (measured, docs/formats/delta-stream.md §7.8; scipy's 35 MB
#: OpenBLAS in 5 windows: ``delta make``'s peak 244 -> 174 MB, goal 207)
WINDOW_MIN = 8 << 20
#: new bytes diffed at once, at most (the old window is as long, scaled to the old size,
#: plus twice the overlap: at most ~11 MiB indexed, a suffix array of 44 MiB)
WINDOW_STEP = 8 << 20
#: windows a windowed diff has at least
WINDOW_COUNT = 3
#: old bytes on each side of a window's aligned part (code that moved further than this
#: between windows is sent as new data)
WINDOW_OVERLAP = 3 << 19


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """HDiffPatch's packed unsigned integer: 7 bits per byte, most significant first,
    high bit set on every byte but the last."""
    value = 0
    for _ in range(10):
        if pos >= len(buf):
            raise StreamFormatError("hdiff patch header is truncated")
        byte = buf[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    raise StreamFormatError("hdiff patch header has an overlong integer")


def _tagged(buf: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """HDiffPatch's integer with a 1-bit tag (a cover's old-position sign): (tag, value,
    next position). The first byte holds the tag, a continuation bit and 6 value bits."""
    if pos >= len(buf):
        raise StreamFormatError("hdiff patch covers are truncated")
    byte = buf[pos]
    tag, value, more = byte >> 7, byte & 0x3F, byte & 0x40
    pos += 1
    for _ in range(10):
        if not more:
            return tag, value, pos
        if pos >= len(buf):
            raise StreamFormatError("hdiff patch covers are truncated")
        byte = buf[pos]
        pos += 1
        value, more = (value << 7) | (byte & 0x7F), byte & 0x80
    raise StreamFormatError("hdiff patch has an overlong integer")


def _pack(value: int) -> bytes:
    """:func:`_varint`'s encoding of ``value``."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _pack_padded(value: int, width: int) -> bytes:
    """:func:`_pack`'s encoding of ``value`` in at least ``width`` bytes (leading bytes of
    no value, each with its continuation bit)."""
    out = _pack(value)
    return b"\x80" * (width - len(out)) + out


def _pack_tagged(tag: int, value: int) -> bytes:
    """:func:`_tagged`'s encoding of ``(tag, value)``."""
    low = []
    while value > 0x3F:
        low.append(value & 0x7F)
        value >>= 7
    out = [value | (tag << 7) | (0x40 if low else 0)]
    out += [b | (0x80 if i else 0) for i, b in reversed(list(enumerate(low)))]
    return bytes(out)


class _RawPatch:
    """The parts of an uncompressed HDIFF13 patch (what HDiffPatch's
    ``serialize_compressed_diff`` writes without a compressor): the two sizes, the covers
    (each: old position relative to the previous cover's old end, with a sign tag; new
    position relative to the previous cover's new end; length), the RLE control and code
    streams of the covered bytes' differences over the whole new content, and the new
    bytes no cover gives."""

    def __init__(self, patch: bytes) -> None:
        if not patch.startswith(_RAW_MAGIC):
            raise StreamFormatError("hdiff patch is not an uncompressed HDIFF13 patch")
        pos = len(_RAW_MAGIC)
        fields = []
        for _ in range(11):
            value, pos = _varint(patch, pos)
            fields.append(value)
        (self.new_size, self.old_size, self.count, covers, c_covers, ctrl, c_ctrl, code,
         c_code, data, c_data) = fields
        if c_covers or c_ctrl or c_code or c_data:
            raise StreamFormatError("hdiff patch is compressed")
        if pos + covers + ctrl + code + data != len(patch):
            raise StreamFormatError("hdiff patch sizes do not add up")
        # views, not copies: a large file's patch is held once
        view = memoryview(patch)
        self.covers = view[pos : pos + covers]
        pos += covers
        self.ctrl = view[pos : pos + ctrl]
        pos += ctrl
        self.code = view[pos : pos + code]
        self.data = view[pos + code : pos + code + data]

    def cover_list(self) -> list[tuple[int, int, int]]:
        """Every cover as (old position, new position, length), in order."""
        out = []
        old_end = new_end = pos = 0
        buf = self.covers
        for _ in range(self.count):
            tag, inc, pos = _tagged(buf, pos)
            skip, pos = _varint(buf, pos)
            length, pos = _varint(buf, pos)
            old = old_end - inc if tag else old_end + inc
            new = new_end + skip
            out.append((old, new, length))
            old_end, new_end = old + length, new + length
        if pos != len(buf):
            raise StreamFormatError("hdiff patch covers have trailing bytes")
        return out


def _cover(old: int, new: int, length: int, old_end: int, new_end: int) -> bytes:
    """One cover's encoding after a cover ending at (``old_end``, ``new_end``)."""
    inc = _pack_tagged(0, old - old_end) if old >= old_end else _pack_tagged(1, old_end - old)
    return inc + _pack(new - new_end) + _pack(length)


def _aligned_shift(covers: list[tuple[int, int, int]], scale: float,
                   place: Callable[[int], int]) -> int | None:
    """How far the old content is from where its size alone puts it (``place(new) *
    scale``), at the end of a window: the length-weighted median over the window's last
    covers (one stray short match does not move the next window)."""
    if not covers:
        return None
    tail = covers[-64:]
    shifts = sorted((old - round(place(new) * scale), length) for old, new, length in tail)
    half = sum(length for _, length in shifts) / 2
    seen = 0
    for shift, length in shifts:
        seen += length
        if seen >= half:
            return shift
    return shifts[-1][0]  # pragma: no cover - the loop always returns


def _placer(places: Sequence[tuple[int, int]] | None, n_new: int,
            ) -> tuple[Callable[[int], int], Callable[[int], int], int] | None:
    """From ``places``, (content position, file offset) of each piece of a new content
    made of pieces of its file (the WRITEs of a file changed in place, the blocks between
    them left out), in content order: (where a content position is in the file, the
    content position where a file position is or the next piece begins, the file's size
    as far as the pieces tell). ``None`` when the content is the file (no places, or
    pieces that follow each other from offset 0) or the pieces are not in file order."""
    if not places or all(pos == off for pos, off in places):
        return None
    starts = [pos for pos, _ in places]
    offsets = [off for _, off in places]
    ends = [*starts[1:], n_new]
    if any(offsets[i] + ends[i] - starts[i] > offsets[i + 1] for i in range(len(places) - 1)):
        return None

    def place(pos: int) -> int:
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        return offsets[i] + pos - starts[i]

    def unplace(off: int) -> int:
        i = bisect.bisect_right(offsets, off) - 1
        return 0 if i < 0 else min(starts[i] + off - offsets[i], ends[i])

    return place, unplace, offsets[-1] + n_new - starts[-1]


def windowed_diff(
    diff: Callable[[bytes, bytes], bytes], old: bytes, new: bytes, *,
    step: int | None = None, overlap: int | None = None, least: int | None = None,
    places: Sequence[tuple[int, int]] | None = None,
) -> bytes:
    """One uncompressed HDIFF13 patch from ``old`` to ``new``, made by ``diff`` (the
    library's uncompressed diff of two byte strings) on windows: the new content in at
    least ``least`` (default :data:`WINDOW_COUNT`) parts of at most ``step`` bytes (default
    :data:`WINDOW_STEP`), each against the old bytes it lines up with (by the sizes'
    ratio, then by where the previous window's covers were) and ``overlap`` more on each
    side (default :data:`WINDOW_OVERLAP`). Peak memory: both contents, one window's
    copies and HDiffPatch's index of the old window (4 bytes a byte), instead of an index
    of the whole old content.

    ``places`` (:func:`_placer`): the new content is pieces of the new file, at these
    offsets; the windows are then parts of the file (at most ``step`` bytes of it, at
    least ``least``), each with the pieces in it, against the old bytes that part lines up
    with (the file's size, not the content's, against the old size). Lined up by the
    content's size, a file changed in place loses the code its left-out blocks shift out
    of the windows: libnode.so.108 of nodejs 18.20.4 deb12u2 -> deb12u3 (47 MB, 41 MB of changed
    blocks in 845 WRITEs) gave 5,842,552 B of raw diff (1,002,949 with ``hdiff-lzma``)
    against 4,784,502 (693,813) for a diff of the whole old content."""
    step = WINDOW_STEP if step is None else step
    overlap = WINDOW_OVERLAP if overlap is None else overlap
    n_old, n_new = len(old), len(new)
    placer = _placer(places, n_new)
    place, unplace, n_file = placer or ((lambda pos: pos), (lambda pos: pos), n_new)
    count = max(WINDOW_COUNT if least is None else least, -(-n_file // step))
    scale = n_old / n_file if n_file else 1.0
    shift = 0
    parts: list[bytes] = []
    ctrl: list[memoryview] = []
    code: list[memoryview] = []
    data: list[memoryview] = []
    covers = 0
    old_end = new_end = 0
    for k in range(count):
        fa, fb = k * n_file // count, (k + 1) * n_file // count
        a, b = unplace(fa), (unplace(fb) if k < count - 1 else n_new)
        if a >= b and placer is not None:
            continue
        span = round((fb - fa) * scale) + 2 * overlap
        start = min(max(0, round(fa * scale) + shift - overlap), max(0, n_old - span))
        end = min(n_old, start + span)
        patch = _RawPatch(diff(old[start:end], new[a:b]))
        found = [(o + start, n + a, length) for o, n, length in patch.cover_list()]
        for o, n, length in found:
            parts.append(_cover(o, n, length, old_end, new_end))
            old_end, new_end = o + length, n + length
        covers += len(found)
        ctrl.append(patch.ctrl)
        code.append(patch.code)
        data.append(patch.data)
        aligned = _aligned_shift(found, scale, place)
        if aligned is not None:
            shift = aligned
    sizes = (n_new, n_old, covers, sum(map(len, parts)), 0, sum(map(len, ctrl)), 0,
             sum(map(len, code)), 0, sum(map(len, data)), 0)
    # one join of the windows' streams (views of their patches): the patch is copied once
    return b"".join([_RAW_MAGIC, *map(_pack, sizes), *parts, *ctrl, *code, *data])


def _deflated(stream: memoryview, window_log: int) -> bytes:
    """One stream of an HDIFF13 patch as HDiffPatch's zstd plugin compresses it (level 19,
    the window it is given, the content size in the frame header), but with zstd's match
    tables capped at :data:`~.zstd.CHAIN_LOG` / :data:`~.zstd.HASH_LOG`; ``b""`` when that
    is not smaller than the stream (it is then stored, as HDiffPatch stores it)."""
    from ..._zstd import zstd

    params = capped_params(zstd, len(stream), window_log, write_content_size=1)
    out = zstd.ZstdCompressor(compression_params=params).compress(stream)
    return bytes(out) if len(out) < len(stream) else b""


def compress_raw(raw: bytes, new_size: int) -> bytes:
    """The ``hdiff`` patch (``HDIFF13&zstd``) of an uncompressed one: its four streams
    compressed each into one zstd frame by :func:`_deflated`, as HDiffPatch's ``recompress``
    does but in one call per stream (no window buffer) and with zstd's tables capped. Its
    bytes are the library's for streams of up to ~1 MB; above, where the library's level
    19 would take up to 2**24 chain entries (64 MiB) and streams its input, they differ by
    a few bytes (vmlinuz 6.1, 14 MB, a raw patch of 9 MB: 87 -> 19 MiB beside the patch,
    which is 560 bytes (0.01 %) larger)."""
    patch = _RawPatch(raw)
    window = min(max((max(new_size, 1) - 1).bit_length(), 10), 27)
    head: list[bytes | memoryview] = [
        _MAGIC, b"zstd\x00", *(_pack(v) for v in (patch.new_size, patch.old_size, patch.count))]
    body: list[bytes | memoryview] = []
    for stream in (patch.covers, patch.ctrl, patch.code, patch.data):
        packed = _deflated(stream, window) if len(stream) else b""
        size = _pack(len(stream))
        # (HDiffPatch writes a compressed size in as many bytes as the stream's size)
        head += [size, _pack_padded(len(packed), len(size))]
        body.append(packed or stream)
    return b"".join(head + body)


def _inflated(frame: memoryview, size: int) -> bytes | None:
    """A zstd-compressed stream of an HDIFF13 patch inflated, or ``None`` unless it is one
    frame that declares ``size`` bytes and gives them (nothing is allocated for a size
    the frame does not declare)."""
    from ..._zstd import zstd  # the receive path has it imported already (the carrier)

    try:
        if zstd.frame_content_size(frame) != size:
            return None
        out = zstd.ZstdDecompressor().decompress(frame)
    except zstd.ZstdError:
        return None
    return out if len(out) == size else None


def _apply_c(fast: ModuleType, old: bytes, patch: bytes,
             old_fd: int = -1) -> bytes | Output | None:
    """The new content of an HDIFF13 patch applied
    by the C module ``_hpatch``: its four streams (covers, RLE control, RLE code, new data)
    taken apart here, the stored ones as views, the zstd ones inflated (each at most about
    the new size, or twice it for the covers: more is left to the library). ``None``: the C
    path does not take this patch (another compressor, a stream that is not as HDiffPatch
    writes it, or a patch HDiffPatch would refuse); the library then applies it or names
    the fault. ``old_fd`` (0 or more): the file ``old`` is, unchanging; the result is then
    mapped over it where it can be (:meth:`HdiffCodec.apply_over`)."""
    start = len(_MAGIC)
    end = patch.find(b"\x00", start, start + 32)
    name = patch[start:end]
    if not patch.startswith(_MAGIC) or end < 0 or name not in (b"", b"zstd"):
        return None
    pos = end + 1
    fields = []
    try:
        for _ in range(11):
            value, pos = _varint(patch, pos)
            fields.append(value)
    except StreamFormatError:
        return None
    new_size, old_size, count = fields[:3]
    if old_size != len(old):
        return None
    view = memoryview(patch)
    streams: list[bytes | memoryview] = []
    for i, (size, packed) in enumerate(zip(fields[3::2], fields[4::2], strict=True)):
        if size > (2 if i == 0 else 1) * new_size + 4096:
            return None
        if not packed:
            streams.append(view[pos : pos + size])
            pos += size
            continue
        if not name:
            return None
        got = _inflated(view[pos : pos + packed], size)
        if got is None:
            return None
        streams.append(got)
        pos += packed
    if pos != len(patch):
        return None
    covers, ctrl, code, data = streams
    # (a module built before its Output type takes no old_fd: a stale build maps nothing)
    over = (old_fd,) if old_fd >= 0 and hasattr(fast, "Output") else ()
    out: bytes | Output | None = fast.apply(old, new_size, covers, count, ctrl, code, data,
                                            *over)
    return out


def _declared_sizes(patch: bytes) -> tuple[int, int]:
    """(new size, old size) from the header of an HDIFF13 patch."""
    if not patch.startswith(_MAGIC):
        raise StreamFormatError("hdiff patch has a bad magic")
    end = patch.find(b"\x00", len(_MAGIC), len(_MAGIC) + 32)
    if end < 0:
        raise StreamFormatError("hdiff patch has no compression name")
    new_size, pos = _varint(patch, end + 1)
    old_size, _ = _varint(patch, pos)
    return new_size, old_size


class HdiffCodec(Codec):
    """HDiffPatch's in-memory diff, its streams compressed with zstd level 19."""

    codec_id = 3
    takes_buffers = True
    name = "hdiff"
    module = "hdiffpatch"
    package = "hdiffpatch"
    #: the library was found (:meth:`require` with the C applier live)
    _found = False

    def make_raw(self, old: bytes, new: bytes,
                 places: Sequence[tuple[int, int]] | None = None) -> bytes:
        """The uncompressed patch (``hdiff-raw``'s) of which :meth:`from_raw` makes this
        codec's: one diff, or windows of a large old content (``places``: where the pieces
        of ``new`` are in its file, :func:`windowed_diff`)."""
        h = self.lib()

        def diff(o: bytes, n: bytes) -> bytes:
            return bytes(h.diff(o, n, None, validate=False))

        old, new = bytes(old), bytes(new)
        if len(old) > WINDOW_MIN:
            return windowed_diff(diff, old, new, places=places)
        return diff(old, new)

    def make(self, old: bytes, new: bytes) -> bytes:
        """An HDIFF13 patch with zstd-compressed streams (:func:`compress_raw`)."""
        return self.from_raw(self.make_raw(old, new), len(new))

    def from_raw(self, raw: bytes, new_size: int) -> bytes:
        """The patch :meth:`make` gives, from the uncompressed diff of the same files
        (:class:`HdiffRawCodec`), without diffing again."""
        return compress_raw(raw, new_size)

    def require(self) -> None:
        """Raise :class:`CodecUnavailableError` if the library is missing; with the C
        applier live (``_hpatch``), only look it up (it is imported when a patch needs
        it: one the C applier declines, or :meth:`make`)."""
        if _native.live("hpatch") is None:
            super().require()
        elif not self._found:
            try:
                found = _module_found(self.module)
            except ImportError:  # (a finder may refuse the name so)
                found = False
            if not found:
                raise CodecUnavailableError(self.package, what=f"codec {self.name!r} ")
            self._found = True

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Apply an HDIFF13 patch after checking the sizes it declares: in C when the
        ``_hpatch`` accelerator is live and takes the patch (:func:`_apply_c`), else with
        the library (the reference, and the one that names what is wrong)."""
        out = self._apply(old, patch, new_size, -1)
        assert isinstance(out, bytes)  # (only apply_over maps)
        return out

    def apply_over(self, old: bytes, patch: bytes, *, new_size: int,
                   old_fd: int) -> bytes | Output:
        """:meth:`apply` with the C applier's result mapped over the old file ``old_fd``
        (an ``_hpatch.Output``: a private mapping of it, where a cover at the same offset
        is not copied, so the pages of the old content left in place are the page
        cache's, not fresh memory; bytes where it cannot be mapped)."""
        return self._apply(old, patch, new_size, old_fd)

    def _apply(self, old: bytes, patch: bytes, new_size: int | None,
               old_fd: int) -> bytes | Output:
        patch = bytes(patch)
        size, old_size = _declared_sizes(patch)
        limit = DEFAULT_MAX_SIZE if new_size is None else new_size
        if size > limit or (new_size is not None and size != new_size):
            raise StreamFormatError(f"hdiff patch declares {size} bytes, expected {new_size}")
        if old_size != len(old):
            raise StreamFormatError(
                f"hdiff patch expects an old file of {old_size} bytes, got {len(old)}"
            )
        fast = _native.live("hpatch")
        if fast is not None:
            got = _apply_c(fast, old, patch, old_fd)
            if got is not None:
                return got
        h = self.lib()
        try:
            out = h.apply(bytes(old), patch)
        except (h.HDiffPatchError, ValueError, MemoryError) as exc:
            raise StreamFormatError(f"hdiff patch does not apply: {exc}") from exc
        if len(out) != size:
            raise StreamFormatError(f"hdiff patch produced {len(out)} bytes, declared {size}")
        return bytes(out)


class HdiffRawCodec(HdiffCodec):
    """HDiffPatch's in-memory diff, uncompressed: for patches carried inside the delta
    stream's zstd carrier, which compresses them with everything around them (the same
    edit repeated across files, the HDIFF header) better than one zstd frame per patch."""

    codec_id = 4
    name = "hdiff-raw"

    def make(self, old: bytes, new: bytes) -> bytes:
        """An HDIFF13 patch without compression."""
        return self.make_raw(old, new)


#: ``hdiff-lzma``: dictionary sizes (log2) a patch may name: 4 KiB to 64 MiB
_LZMA_DICT_LOGS = range(12, 27)
#: the largest dictionary ``make`` gives an ``hdiff-lzma`` patch: an eighth of the new
#: content (rounded down to a power of two), at least 1 MiB and at most 4 MiB (log2). The
#: encoder takes ~11x it beside the old and new contents and the raw diff, within
#: ``delta make``'s goal of 64 MiB + 4x the file (a 64 MiB dictionary would take ~700 MiB);
#: raw diffs are matched mostly near themselves (cryptography 43.0.1's 10.8 MB extension:
#: its 2.1 MB raw diff packs to 789,295 B with a 1, 2, 4 or 8 MiB dictionary alike)
_LZMA_MAKE_DICT_LOGS = (20, 22)


def _lzma_filters(dict_log: int, *, encode: bool) -> list[dict[str, int]]:
    import lzma

    if not encode:
        return [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << dict_log}]
    # (lc 1, pb 0: the RLE code and control streams are bytes, not aligned words: 0.4 %
    # smaller than xz's defaults on regex's rebuilt extension)
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
             "dict_size": 1 << dict_log, "lc": 1, "lp": 0, "pb": 0}]


class HdiffLzmaCodec(HdiffCodec):
    """HDiffPatch's uncompressed diff (``hdiff-raw``) compressed as one raw LZMA2 stream
    (format 9, codec 7): one byte, the dictionary size's log2 (12..26), then the LZMA2
    stream of the whole ``HDIFF13`` patch. Its four streams compressed together by LZMA
    (bsdiff's bzip2 and HDiffPatch's zstd each compress them apart) are 6-8 % smaller than
    ``hdiff`` on rebuilt native extensions (regex 2024.9.11 -> 2024.11.6: 100.7 KB against
    108.3 KB, bsdiff 107.8 KB); the encoder (xz -9e, dictionary the patch's size rounded up
    to a power of two) takes ~0.2 s a MB of raw patch and ~11x its dictionary."""

    codec_id = 7
    name = "hdiff-lzma"

    def from_raw(self, raw: bytes, new_size: int) -> bytes:
        """The patch :meth:`make` gives, from the uncompressed diff of the same files."""
        import lzma

        cap = min(max(max(new_size, 1).bit_length() - 4, _LZMA_MAKE_DICT_LOGS[0]),
                  _LZMA_MAKE_DICT_LOGS[1])
        dict_log = min(max((max(len(raw), 1) - 1).bit_length(), _LZMA_DICT_LOGS.start), cap)
        return bytes((dict_log,)) + lzma.compress(
            raw, format=lzma.FORMAT_RAW, filters=_lzma_filters(dict_log, encode=True))

    def _apply(self, old: bytes, patch: bytes, new_size: int | None,
               old_fd: int) -> bytes | Output:
        import lzma

        patch = bytes(patch)
        if not patch or patch[0] not in _LZMA_DICT_LOGS:
            raise StreamFormatError("hdiff-lzma patch names no valid dictionary size")
        # an HDIFF13 patch of a new content of N bytes is below ~5N (its covers twice N,
        # each other stream N at most, _apply_c's bounds): more is refused unread
        limit = 5 * (DEFAULT_MAX_SIZE if new_size is None else new_size) + (64 << 10)
        dec = lzma.LZMADecompressor(lzma.FORMAT_RAW,
                                    filters=_lzma_filters(patch[0], encode=False))
        try:
            raw = dec.decompress(memoryview(patch)[1:], max_length=limit)
        except lzma.LZMAError as exc:
            raise StreamFormatError(f"hdiff-lzma patch does not inflate: {exc}") from exc
        if not dec.eof or dec.unused_data:
            raise StreamFormatError("hdiff-lzma patch is truncated, too large or followed "
                                    "by other bytes")
        if not raw.startswith(_RAW_MAGIC):
            raise StreamFormatError("hdiff-lzma patch holds no uncompressed HDIFF13 patch")
        return super()._apply(old, raw, new_size, old_fd)
