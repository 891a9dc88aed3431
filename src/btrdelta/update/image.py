"""Image workflows besides cloning: compress an image, describe an archive or index, verify
(and repair) an image in a store, collect a store's garbage.

Each is one call for ``btrdelta image <command>``; the store's lock is taken here (shared
to verify, exclusive to repair and gc). Nothing here parses arguments or prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..chunk.archive import HEADER_SIZE, MAGIC, ArchiveHeader, ArchiveIndex, decode_header
from ..chunk.casync import CasyncIndex
from ..chunk.chunker import ChunkerParams
from ..chunk.compress import CompressReport, compress_image
from ..chunk.seed import scan_seeds
from ..chunk.source import is_url
from ..chunk.store import ChunkStore, GcReport, VerifyReport, split_store_name
from ..errors import BtrdeltaError
from ..fs.atomic import atomic_output
from ..transport.config import HttpConfig
from ..trust import PrivateKey, PublicKey
from .clone import OpenImage, open_image

__all__ = ["RepairReport", "compress_archive", "gc_store", "image_info", "verify_image"]


def compress_archive(
    image: str, output: str, *, avg_chunk: int, level: int,
    key: PrivateKey | None = None, threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> CompressReport:
    """Chunk and compress ``image`` into the archive ``output`` (written aside, renamed
    into place when complete; see :func:`btrdelta.fs.atomic.atomic_output`)."""
    if output == "-":
        raise BtrdeltaError("compress writes its header last: give a file (-o FILE), "
                            "not standard output")
    params = ChunkerParams.from_avg(avg_chunk)
    with atomic_output(output) as out:
        return compress_image(image, out, params=params, level=level, key=key,
                              threads=threads, on_progress=on_progress)


def image_info(location: str, *, public_key: PublicKey | None = None,
               castr: Sequence[str] = (), config: HttpConfig | None = None) -> dict[str, object]:
    """What an archive, a store description or a casync index holds (JSON-ready)."""
    if not is_url(location) and os.path.isfile(location):
        with open(location, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head.startswith(MAGIC):
            header = decode_header(head, source=location)
            if os.path.getsize(location) == HEADER_SIZE + header.index_size + header.sig_size:
                store_dir, name = split_store_name(location)
                header, index = ChunkStore(store_dir).read_description(name, public_key=public_key)
                return _archive_info("description", header, index, public_key)
    image = open_image(location, public_key=public_key, castr=castr, config=config)
    try:
        if image.header is None:
            return _casync_info(image)
        assert isinstance(image.layout, ArchiveIndex)
        return _archive_info("archive", image.header, image.layout, public_key)
    finally:
        image.close()


def _archive_info(kind: str, header: ArchiveHeader, index: ArchiveIndex,
                  public_key: PublicKey | None) -> dict[str, object]:
    p = header.params
    return {
        "kind": kind, "version": header.version, "image_size": header.image_size,
        "image_blake3": header.image_digest.hex(), "chunks": header.order_count,
        "distinct_chunks": header.chunk_count, "distinct_bytes": sum(index.raw_sizes),
        "compressed_bytes": sum(index.comp_sizes), "archive_size": header.archive_size,
        "index_bytes": header.index_size, "signed": header.signed,
        "signature_checked": public_key is not None,
        "chunker": {"name": "fastcdc", "min": p.min_size, "avg": p.avg_size,
                    "max": p.max_size, "normalization": p.normalization, "seed": p.seed},
    }


def _casync_info(image: OpenImage) -> dict[str, object]:
    index = image.layout
    assert isinstance(index, CasyncIndex)
    return {
        "kind": "casync", "image_size": index.image_size, "chunks": len(index.order),
        "distinct_chunks": len(index.digests), "distinct_bytes": sum(index.raw_sizes),
        "index_bytes": image.index_bytes, "hash": index.hash_name,
        "feature_flags": index.feature_flags, "signed": False, "signature_checked": False,
        "chunker": {"name": "buzhash", "min": index.min_size, "avg": index.avg_size,
                    "max": index.max_size},
    }


@dataclass(slots=True)
class RepairReport:
    """What ``verify --repair`` did besides the final verify.

    Attributes:
        source: where chunks were (or would be) fetched from (``None``: none known).
        dropped: damaged chunk files removed.
        repaired: chunks written again (from seeds or the source).
        lacking: ids the source does not hold.
    """

    source: str | None = None
    dropped: int = 0
    repaired: int = 0
    lacking: list[bytes] = field(default_factory=list)


def verify_image(
    target: str, *, repair: bool = False, source: str | None = None,
    seeds: Sequence[str] = (), public_key: PublicKey | None = None,
    wait: float = 0.0, on_progress: Callable[[str, int, int], None] | None = None,
    config: HttpConfig | None = None,
) -> tuple[VerifyReport, RepairReport | None]:
    """Check every chunk of ``STORE/NAME``; with ``repair``, drop the damaged ones and fetch
    what is missing from ``source`` (default: where the image was cloned from) and seeds.

    Returns:
        ``(report after any repair, what the repair did or None)``.
    """
    store_dir, name = split_store_name(target)
    store = ChunkStore(store_dir)
    if not os.path.isdir(store.root):
        store.read_description(name)  # the one-line "no such image" error
    progress = None if on_progress is None else (lambda d, t: on_progress("check", d, t))
    with store.locked(exclusive=repair, wait=wait):
        store.read_description(name, public_key=public_key)
        report = store.verify(name, on_progress=progress)
        if not repair or report.ok:
            return report, None
        fix = _repair(store, name, report, source, seeds, public_key, config)
        return store.verify(name), fix


def _repair(store: ChunkStore, name: str, report: VerifyReport, source: str | None,
            seeds: Sequence[str], public_key: PublicKey | None,
            config: HttpConfig | None) -> RepairReport:
    fix = RepairReport(source=source or store.source_of(name))
    for digest in report.bad:
        fix.dropped += store.drop(digest)
    needed = {*report.missing, *report.bad}
    if fix.source is None:
        fix.lacking = sorted(needed)
        return fix
    image = open_image(fix.source, public_key=public_key, config=config)
    try:
        entries = {d: e for e, d in enumerate(image.layout.digests) if d in needed}
        fix.lacking = sorted(needed - entries.keys())

        def on_new(digest: bytes, data: memoryview) -> None:
            if entries.pop(digest, None) is not None:
                fix.repaired += store.put(digest, data)

        def on_chunk(entry: int, data: bytes) -> None:
            fix.repaired += store.put(image.layout.digests[entry], data)

        with store.writing():
            if seeds:
                scan_seeds(seeds, image.chunking, needed, on_new=on_new)
            image.chunks.fetch(sorted(entries.values()), on_chunk)
    finally:
        image.close()
    return fix


def gc_store(store_dir: str, *, dry_run: bool = False, quick: bool = False,
             wait: float = 0.0,
             on_progress: Callable[[str, int, int], None] | None = None) -> GcReport:
    """Remove unused and damaged chunks and leftovers, under the store's exclusive lock
    (``on_progress("check", done, total)`` as the kept chunks are checked)."""
    store = ChunkStore(store_dir)
    if not os.path.isdir(store.root):
        raise BtrdeltaError("no such chunk store", path=store_dir)
    if not os.path.isdir(store.chunks_dir):  # (a typo'd or served directory: its
        # archives read as damaged descriptions, its .tmp- files as leftovers to delete)
        raise BtrdeltaError("not a chunk store (no chunks/ directory: give the STORE of "
                            "image clone's STORE/NAME)", path=store_dir)
    progress = None if on_progress is None else (lambda d, t: on_progress("check", d, t))
    with store.locked(exclusive=True, wait=wait):
        return store.gc(dry_run=dry_run, quick=quick, on_progress=progress)
