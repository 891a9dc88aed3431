"""Finding an image's chunks in seeds: files or devices cut and hashed as the image was.

This module owns the seed scan: each seed (an older image, the running partition, the
output's own old content) is mapped once, cut with the image's :class:`Chunking` (FastCDC
for btrdelta archives, buzhash for casync indexes) and hashed on a second thread; every
chunk the image wants is recorded with where it sits. It reads seeds and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence

from .._futures import ThreadPoolExecutor
from .._value import Value, field
from .chunker import Chunking, FileMap, open_map

__all__ = ["SeedMap", "scan_seeds"]


class SeedMap(Value):
    """Where the image's chunks sit in the seeds.

    Attributes:
        paths: the seeds, in the order given.
        where: chunk id -> ``(seed number, offset)`` of its first occurrence.
        at: per seed, offset -> id of every wanted chunk that starts there.
    """

    paths: list[str] = field(default_factory=list)
    where: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    at: list[dict[int, bytes]] = field(default_factory=list)


def scan_seeds(
    seeds: Sequence[str], chunking: Chunking, wanted: Container[bytes], *,
    on_new: Callable[[bytes, memoryview], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> SeedMap:
    """Cut each seed like the image and map the wanted chunks found.

    Args:
        seeds: files or block devices.
        chunking: how the image was cut.
        wanted: ids of the image's chunks.
        on_new: called with ``(id, bytes)`` the first time each wanted chunk is found (the
            bytes are a view into the mapped seed, valid during the call only).
        on_progress: ``("seed", bytes scanned, seed size)``.
    """
    seed_map = SeedMap()
    with ThreadPoolExecutor(1, thread_name_prefix="seed-hash") as pool:
        for k, seed in enumerate(seeds):
            seed_map.paths.append(seed)
            at: dict[int, bytes] = {}
            seed_map.at.append(at)
            with open_map(seed) as fm:
                _scan_one(fm, k, chunking, wanted, seed_map, pool, on_new, on_progress)
    return seed_map


def _scan_one(
    fm: FileMap, k: int, chunking: Chunking, wanted: Container[bytes], seed_map: SeedMap,
    pool: ThreadPoolExecutor, on_new: Callable[[bytes, memoryview], None] | None,
    on_progress: Callable[[str, int, int], None] | None,
) -> None:
    # a function of its own so that no chunk view outlives the map
    at, where, view = seed_map.at[k], seed_map.where, fm.view
    for batch in chunking.hash_chunks(view, pool):
        for offset, data, digest in zip(batch.offsets, batch.views, batch.digests, strict=True):
            if digest not in wanted:
                continue
            at[offset] = digest
            if digest not in where:
                where[digest] = (k, offset)
                if on_new is not None:
                    on_new(digest, data)
        # what is before this batch's end was cut, hashed and looked up: out of the
        # resident set (a 2 GB seed kept 1.9 GB of it mapped until the scan's end)
        fm.drop(batch.end)
        if on_progress is not None:
            on_progress("seed", batch.end, len(view))
