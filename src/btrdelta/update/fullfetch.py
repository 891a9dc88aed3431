"""Downloading a release's full: its chunks from the mirrors' packs into a local chunk store.

The full index is a chunk-archive description over the pack space (``repo/fullindex.py``),
so the image clone does the work (:func:`btrdelta.update.clone.clone_image`): chunks the store
already holds (an interrupted download) are skipped, chunks found in seeds are copied from
them, the rest are fetched as coalesced ranges, each checked against its id before it is
stored. :class:`PackSource` is the byte source it reads: the description from the verified
full index, chunk ranges from the pack files, mirror after mirror.

Seeds are the plain streams of versions the device holds, regenerated from their trees
(:func:`btrdelta.update.streams.write_release_stream` writes the publisher's stream byte for
byte), so every chunk two releases share is reused without knowing where it is.

A release with a *solid full* (``repo/solid.py``) is fetched frame by frame first
(:func:`fetch_solid`): each frame the device is better off downloading whole
(:func:`~btrdelta.repo.solid.choose_frames`: all of them from nothing) is decompressed, cut
by the full index's chunk sizes, and every chunk checked against its id as it is stored;
the chunk ranges then fetch only what is still missing. A frame that no mirror serves right
costs its chunks from the packs instead (one warning line naming the file and the frame).
From a server that ignores Range the solid file is read once, every frame taken as it
streams past.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..chunk.archive import HEADER_SIZE, ArchiveIndex
from ..chunk.store import ChunkStore, ImageReader
from ..errors import ChecksumError, StreamFormatError, TransportError, warn
from ..repo.fullindex import FullIndex, PackSlot
from ..repo.mirror import Mirrors
from ..repo.solid import MAX_FRAME, Frame, Solid, choose_frames
from ..transport.http import FetchStats, RangeFetcher, RangesNotSupported
from ..transport.plan import Part, Span
from .clone import CloneReport, clone_image
from .streams import ChunkConcat

__all__ = ["PackSource", "fetch_full", "fetch_solid", "frame_chunks", "full_cost",
           "solid_frames", "store_stream"]


class PackSource:
    """The :class:`~btrdelta.chunk.source.ArchiveSource` of a full over the mirrors."""

    def __init__(self, full: FullIndex, mirrors: Mirrors, name: str) -> None:
        self.full = full
        self.mirrors = mirrors
        self.name = name
        self.stats: FetchStats = mirrors.stats

    def read(self, start: int, end: int) -> bytes:
        """Header and index come from the verified full index."""
        desc = self.full.description
        if end <= HEADER_SIZE:
            return desc[start:end]
        base = self.full.header.index_offset
        if start >= base and end - base + HEADER_SIZE <= len(desc):
            return desc[start - base + HEADER_SIZE : end - base + HEADER_SIZE]
        raise StreamFormatError(f"no bytes [{start}, {end}) outside chunks", source=self.name)

    def close(self) -> None:
        """Nothing to release (the mirrors belong to the caller)."""

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        """Deliver every span, each pack's ranges from the first mirror that serves them."""
        by_pack: dict[PackSlot, list[Span]] = {}
        for span in spans:
            for part in span.parts:  # a chunk lies in one pack; a span may cross packs
                slot = self.full.pack_at(part.start)
                by_pack.setdefault(slot, []).append(Span(part.start, part.end, (part,)))
        for slot, pieces in by_pack.items():
            self._fetch_pack(slot, _merge(pieces), on_span)

    def _fetch_pack(self, slot: PackSlot, spans: list[Span],
                    on_span: Callable[[Span, memoryview], None]) -> None:
        # what is still wanted, by chunk: a mirror that fails midway leaves the next one
        # only the chunks it did not deliver (each is stored as soon as it arrives)
        todo = {(p.key, p.start): p for s in spans for p in s.parts}
        lock = threading.Lock()

        def attempt(url: str) -> None:
            failed: list[str] = []

            def deliver(rel: Span, data: memoryview) -> None:
                parts = tuple(Part(p.key, p.start + slot.base, p.length) for p in rel.parts)
                try:
                    on_span(Span(rel.start + slot.base, rel.end + slot.base, parts), data)
                except (ChecksumError, StreamFormatError) as exc:
                    failed.append(str(exc))
                    return
                with lock:
                    for p in parts:
                        todo.pop((p.key, p.start), None)
                    note()

            def note() -> None:  # bytes as they arrive (progress), not per pack
                n = fetcher.stats.bytes_received - noted[0]
                if n > 0:
                    noted[0] += n
                    self.mirrors.note_bytes(n)

            noted = [0]
            fetcher = self.mirrors.fetcher(url, slot.path)
            def wanted() -> list[Span]:  # what is left, relative to the pack
                with lock:
                    left = sorted(todo.values(), key=lambda p: p.start)
                return [Span(s.start - slot.base, s.end - slot.base,
                             tuple(Part(p.key, p.start - slot.base, p.length)
                                   for p in s.parts))
                        for s in _merge([Span(p.start, p.end, (p,)) for p in left])]

            try:
                try:
                    fetcher.fetch_spans(wanted(), deliver)
                except RangesNotSupported:
                    if not isinstance(fetcher, RangeFetcher):
                        raise
                    # a static server without Range (python3 -m http.server): the chunks
                    # as the whole pack streams past
                    fetcher.stream_spans(wanted(), deliver)
            finally:
                with lock:
                    note()
            if failed:
                raise ChecksumError(f"{len(failed)} chunks did not check: {failed[0]}",
                                    source=slot.path)
            if todo:
                raise TransportError(f"{len(todo)} chunks not delivered", url=slot.path)

        self.mirrors.each(slot.path, attempt)


def _merge(pieces: list[Span]) -> list[Span]:
    """Adjacent chunk spans of one pack joined (one range each)."""
    out: list[Span] = []
    for s in sorted(pieces, key=lambda s: s.start):
        if out and out[-1].end == s.start and out[-1].length + s.length <= 8 << 20:
            last = out[-1]
            out[-1] = Span(last.start, s.end, last.parts + s.parts)
        else:
            out.append(s)
    return out


def full_cost(target: FullIndex, held: Sequence[FullIndex], store: ChunkStore,
              index_length: int, solid: Solid | None = None) -> int:
    """Bytes to download the full of ``target`` given the chunks of the ``held`` versions'
    fulls (their regenerated streams) and of the local store; with ``solid``, the frames
    :func:`solid_frames` takes count instead of their chunks."""
    have: set[bytes] = set()
    for f in held:
        have.update(f.index.digests)
    if solid is not None:
        return index_length + solid_frames(target, solid, have, store)[1]
    idx = target.index
    return index_length + sum(
        idx.comp_sizes[i] for i, d in enumerate(idx.digests)
        if d not in have and not store.has(d))


def solid_frames(full: FullIndex, solid: Solid, have: set[bytes], store: ChunkStore
                 ) -> tuple[list[Frame], int]:
    """The frames of ``solid`` worth downloading given the chunks ``have`` (of versions
    held) and the store's, and the bytes of those frames and of the chunks left (no full
    index)."""
    idx = full.index
    if sum(f.count for f in solid.frames) != len(idx.order):
        raise StreamFormatError(f"its frames hold {sum(f.count for f in solid.frames)} "
                                f"chunks, the full index {len(idx.order)}", source=solid.path)
    return choose_frames(solid, idx.order, idx.comp_sizes, idx.digests,
                         lambda d: d in have or store.has(d))


def fetch_solid(full: FullIndex, solid: Solid, frames: Sequence[Frame], mirrors: Mirrors,
                store: ChunkStore, *,
                on_progress: Callable[[str, int, int], None] | None = None) -> int:
    """Bring the chunks of ``frames`` into ``store``, frame by frame (the unit of retry:
    mirror after mirror); a frame every mirror fails is left to the chunk ranges, with a
    warning (one for them all when no mirror has the file). A server that ignores Range
    sends the whole file for the first frame asked: the frames after it are taken as it
    streams past (each read again from the file's start, n frames cost ~(n+1)/2 times the
    file). Returns the frames stored."""
    idx = full.index
    number = {f: i for i, f in enumerate(solid.frames)}
    total = sum(f.length for f in frames)
    done = 0
    brought: set[int] = set()

    def held(frame: Frame) -> bool:  # (a chunk put is named only once its batch is synced)
        return number[frame] in brought or all(store.has(idx.digests[e])
                   for e in idx.order[frame.first : frame.first + frame.count])

    absent = False  # (no mirror has the file: its frames are not asked one by one)
    with store.locked(create=True), store.writing():
        for k, frame in enumerate(frames):
            if not absent and not held(frame):  # (else a run cut before, or the pass of
                later = [f for f in frames[k + 1 :] if not held(f)]  # a frame before)
                try:
                    mirrors.each(solid.path, lambda url, todo=[frame, *later]:  # type: ignore[misc]
                                 _fetch_frames(url, mirrors, solid, todo, number, full,
                                               store, brought))
                except (ChecksumError, StreamFormatError, TransportError) as exc:
                    absent = isinstance(exc, TransportError) and exc.status == 404
                    warn(f"{exc}; its chunks come from the packs instead"
                         + (f" (and those of the {len(later)} frames after it: no mirror "
                            "has the file)" if absent and later else ""))
            done += frame.length
            if on_progress is not None:
                on_progress("solid", done, total)
    return len(brought)


def _fetch_frames(url: str, mirrors: Mirrors, solid: Solid, todo: Sequence[Frame],
                  number: dict[Frame, int], full: FullIndex, store: ChunkStore,
                  brought: set[int]) -> None:
    """Frame ``todo[0]`` of ``solid`` from mirror ``url`` into ``store`` (its errors
    raised); from a server that ignores Range, also the frames after it in ``todo`` as the
    file streams past (their errors left to their own turn). ``brought``: the numbers of
    the frames stored."""
    idx = full.index
    by_start = {f.offset: f for f in todo}
    fetcher = mirrors.fetcher(url, solid.path)
    noted = 0

    def deliver(span: Span, data: memoryview) -> None:
        nonlocal noted
        n = fetcher.stats.bytes_received - noted
        noted += n
        mirrors.note_bytes(n)
        frame = by_start[span.start]
        index = number[frame]
        entries = idx.order[frame.first : frame.first + frame.count]
        sizes = [idx.raw_sizes[e] for e in entries]
        try:
            chunks = frame_chunks(data, frame, index, sizes, source=solid.path)
            for pos, (entry, chunk) in enumerate(zip(entries, chunks, strict=True)):
                try:
                    store.put(idx.digests[entry], chunk)
                except ChecksumError:
                    raise ChecksumError(f"frame {index}: chunk {frame.first + pos} does "
                                        "not match its id", source=solid.path) from None
        except (ChecksumError, StreamFormatError):
            if frame is todo[0]:
                raise
            return  # (asked again in its own turn, mirror after mirror)
        brought.add(index)

    def span(frame: Frame) -> Span:
        return Span(frame.offset, frame.offset + frame.length,
                    (Part(number[frame], frame.offset, frame.length),))

    try:
        try:
            fetcher.fetch_spans([span(todo[0])], deliver)
        except RangesNotSupported:
            if not isinstance(fetcher, RangeFetcher):
                raise
            try:
                fetcher.stream_spans([span(f) for f in todo], deliver)
            except TransportError:
                if number[todo[0]] not in brought:
                    raise  # (else cut past it: the frames after it ask in their own turn)
    finally:  # (what a failed attempt received counts too)
        mirrors.note_bytes(fetcher.stats.bytes_received - noted)


def fetch_full(full: FullIndex, mirrors: Mirrors, store: ChunkStore, name: str,
               seeds: Sequence[Path], *, dry_run: bool = False,
               on_progress: Callable[[str, int, int], None] | None = None) -> CloneReport:
    """Bring every chunk of ``full`` into ``store`` (described as ``name``)."""
    source = PackSource(full, mirrors, name)
    return clone_image(source, target=f"{store.root}/{name}", seeds=[str(s) for s in seeds],
                       dry_run=dry_run, on_progress=on_progress)


def store_stream(index: ArchiveIndex, digest: bytes, store: ChunkStore, *,
                 source: str) -> ChunkConcat:
    """The plain stream of an image whose chunks are all in ``store`` (checked against its
    BLAKE3 ``digest``); closing it closes the store reader."""
    reader = ImageReader(store, index, verify=False)  # the whole stream's BLAKE3 is checked
    order, sizes = index.order, index.raw_sizes

    def get(pos: int) -> bytes:
        entry = order[pos]
        return reader.read_chunk(entry, sizes[entry])

    return ChunkConcat(len(order), get, digest, source=source, on_close=reader.close)


def frame_chunks(blob: bytes | memoryview, frame: Frame, index: int, sizes: Sequence[int], *,
                 source: str) -> Iterator[bytes | memoryview]:
    """The chunks of frame number ``index`` (``blob``: its downloaded bytes; ``sizes``: its
    chunks' sizes in order) as they are decompressed, unchecked against their ids (the
    store's ``put`` checks): no more than a chunk and the decoder's window are held, not
    the whole frame (a 32 MiB frame held whole took a first install of Debian from 62 to
    165 MB of peak RSS).

    Raises:
        StreamFormatError: not one zstd frame of exactly those bytes (one line naming
            ``source`` and the frame), found when it is reached: the chunks before it are
            delivered.
    """
    import zstandard  # (only a full from a solid file needs it)

    want = sum(sizes)
    where = f"frame {index} ([{frame.offset}, {frame.offset + frame.length}))"
    try:
        declared = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as exc:
        raise StreamFormatError(f"{where}: not a zstd frame ({exc})", source=source) from None
    if declared != want or want > MAX_FRAME:
        raise StreamFormatError(f"{where}: says {declared} bytes, its chunks are {want}",
                                source=source)
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_FRAME).decompressobj()
    pending = bytearray()
    got = k = 0
    mv = memoryview(blob)
    for pos in range(0, len(mv), _PIECE):
        try:
            out = dobj.decompress(mv[pos : pos + _PIECE])
        except zstandard.ZstdError as exc:
            raise StreamFormatError(f"{where}: {exc}", source=source) from None
        got += len(out)
        piece, i = memoryview(out), 0
        if pending and k < len(sizes):  # the chunk the piece before began
            i = sizes[k] - len(pending)
            pending += piece[:i]
            if len(pending) == sizes[k]:
                yield bytes(pending)
                pending.clear()
                k += 1
        while k < len(sizes) and len(piece) - i >= sizes[k]:  # (no copy: the piece's)
            yield piece[i : i + sizes[k]]
            i += sizes[k]
            k += 1
        pending += piece[i:]
        if dobj.eof:
            after = bool(dobj.unused_data) or pos + _PIECE < len(mv)
            break
    else:
        after = False
    if not dobj.eof or after or got != want:
        raise StreamFormatError(f"{where}: decompresses to {got} bytes of {want}"
                                + (" and is cut short" if not dobj.eof else "")
                                + (" with bytes after it" if after else ""), source=source)


#: compressed bytes given to the decoder at once (each gives at most a frame's content)
_PIECE = 1 << 17
