"""Writing a rebuilt image to a file or block device, reusing what the output and seeds hold.

This module owns two things: the *plan* (pure: where each image position's bytes come
from, and in which order in-place copies must run) and the *writer* (``pread``/``pwrite``
on descriptors the caller opened). Fetching and the chunk store's lock are the clone
workflow's business (``btrdelta.update.clone``).

Where a position's bytes come from, in order of preference:

``KEEP``
    the output already holds the chunk at that offset (outputs written in place): untouched.
``SEED``
    another seed holds it: copied (neighbours contiguous in the seed in one read).
``STORE``
    the chunk store holds it.
``MOVE``
    the output's own old content holds it at another offset (in place, no store): copied
    within the output. Such a copy must read its source before anything overwrites it, so
    moves run first, in an order where each one runs before any move whose destination
    overlaps its source; moves that need each other's sources (a cycle, e.g. two swapped
    blocks) are broken by reading one of them into memory first (at most ``stash_limit``
    bytes; beyond that the chunk is fetched instead). Every other write comes after the
    moves.
``FETCH``
    downloaded; written at every position that uses it when it arrives.

Every chunk read from a seed, the store or the output is checked against its id before it
is written (a mismatch makes it a ``FETCH``); at the end the whole output is read back and
checked (the image's BLAKE3, or every chunk's id when the format has no image digest).
A new output (not written in place) is a file of the image's size made empty: chunks of
zeros are not written there, so it stays sparse where the image is zeros.
"""

from __future__ import annotations

import bisect
import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import blake3

from .._value import Value, field
from ..errors import ChecksumError, MissingBaseError
from .seed import SeedMap
from .store import ChunkStore

__all__ = [
    "FETCH",
    "KEEP",
    "MOVE",
    "SEED",
    "STORE",
    "Layout",
    "OutputPlan",
    "OutputReport",
    "OutputWriter",
    "plan_output",
]

KEEP, SEED, STORE, MOVE, FETCH = range(5)
_COPY_BLOCK = 8 << 20

#: Bytes of moved chunks held in memory to break cycles, by default.
STASH_LIMIT = 256 << 20


class Layout(Protocol):
    """What an image is made of (an :class:`~btrdelta.chunk.archive.ArchiveIndex` or a
    :class:`~btrdelta.chunk.casync.CasyncIndex`)."""

    @property
    def digests(self) -> list[bytes]:
        """Chunk id per dictionary entry."""
        ...

    @property
    def raw_sizes(self) -> Sequence[int]:
        """Size per dictionary entry."""
        ...

    @property
    def order(self) -> Sequence[int]:
        """Dictionary entry per image position."""
        ...

    @property
    def starts(self) -> Sequence[int]:
        """Image offset per position, plus the image size at the end."""
        ...


class OutputPlan(Value):
    """Where each position's bytes come from.

    Attributes:
        kind: per position, one of ``KEEP``, ``SEED``, ``STORE``, ``MOVE``, ``FETCH``.
        source: position -> ``(seed number, offset)`` for ``SEED`` and ``MOVE``.
        moves: ``(stash, position)`` in execution order: with ``stash`` the move's source is
            read into memory (a cycle broken), else the move is written.
        fetch: entry -> positions to write when the chunk arrives.
        nbytes: bytes per kind.
    """

    kind: bytearray
    source: dict[int, tuple[int, int]] = field(default_factory=dict)
    moves: list[tuple[bool, int]] = field(default_factory=list)
    fetch: dict[int, list[int]] = field(default_factory=dict)
    nbytes: list[int] = field(default_factory=lambda: [0] * 5)


def plan_output(
    layout: Layout, seeds: SeedMap | None, *, out_seed: int | None = None,
    in_store: Callable[[bytes], bool] | None = None, stash_limit: int = STASH_LIMIT,
) -> OutputPlan:
    """Plan the output (see the module docstring).

    Args:
        layout: the image.
        seeds: the scanned seeds (``None``: no seed).
        out_seed: which seed is the output itself, written in place (``None``: the output
            is a new file).
        in_store: whether the chunk store holds an id (``None``: no store).
        stash_limit: bytes of moved chunks that may be held in memory.
    """
    starts, order, digests = layout.starts, layout.order, layout.digests
    plan = OutputPlan(bytearray(len(order)))
    here: dict[int, bytes] = {}
    elsewhere: dict[bytes, tuple[int, int]] = {}
    in_output: dict[bytes, int] = {}
    if seeds is not None:
        for k, at in enumerate(seeds.at):
            if k == out_seed:
                here = at
                for off, d in at.items():
                    in_output.setdefault(d, off)
            else:
                for off, d in at.items():
                    elsewhere.setdefault(d, (k, off))
    for pos, entry in enumerate(order):
        start, digest = starts[pos], digests[entry]
        if here.get(start) == digest:
            kind = KEEP
        elif digest in elsewhere:
            kind = SEED
            plan.source[pos] = elsewhere[digest]
        elif in_store is not None and in_store(digest):
            kind = STORE
        elif digest in in_output:
            kind = MOVE
            plan.source[pos] = (-1, in_output[digest])
        else:
            kind = FETCH
        plan.kind[pos] = kind
        plan.nbytes[kind] += starts[pos + 1] - start
    _order_moves(plan, starts, stash_limit)
    for pos, kind in enumerate(plan.kind):
        if kind == FETCH:
            plan.fetch.setdefault(order[pos], []).append(pos)
    return plan


def _order_moves(plan: OutputPlan, starts: Sequence[int], stash_limit: int) -> None:
    """Order the ``MOVE`` positions so that no source is overwritten before it is read."""
    moves = [p for p, k in enumerate(plan.kind) if k == MOVE]
    if not moves:
        return
    dst = [starts[p] for p in moves]  # ascending: positions are in image order
    succ: list[list[int]] = [[] for _ in moves]
    indeg = [0] * len(moves)
    for i, p in enumerate(moves):
        s = plan.source[p][1]
        e = s + starts[p + 1] - starts[p]
        j = max(bisect.bisect_right(dst, s) - 1, 0)
        while j < len(moves) and dst[j] < e:
            if j != i and starts[moves[j] + 1] > s:
                succ[i].append(j)  # i reads what j writes: i first
                indeg[j] += 1
            j += 1
    ready = deque(i for i, n in enumerate(indeg) if n == 0)
    done = [False] * len(moves)
    released = [False] * len(moves)  # source read (moved or stashed): edges out are gone
    left, stashed = len(moves), 0

    def release(i: int) -> None:
        released[i] = True
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0 and not done[j]:
                ready.append(j)

    while left:
        if ready:
            i = ready.popleft()
            if done[i]:
                continue
            done[i] = True
            left -= 1
            if plan.kind[moves[i]] == MOVE:
                plan.moves.append((False, moves[i]))
            if not released[i]:
                release(i)
            continue
        # a cycle: read one source that others wait for into memory (or fetch it)
        i = next(i for i in range(len(moves)) if not done[i] and not released[i]
                 and any(not done[j] for j in succ[i]))
        p = moves[i]
        size = starts[p + 1] - starts[p]
        if stashed + size <= stash_limit:
            stashed += size
            plan.moves.append((True, p))
        else:
            plan.kind[p] = FETCH
            plan.nbytes[MOVE] -= size
            plan.nbytes[FETCH] += size
        release(i)


class OutputReport(Value):
    """Where the output's bytes came from.

    Attributes:
        in_place: bytes already right in an output written in place: not written.
        from_seeds: bytes written from seeds.
        from_store: bytes written from the chunk store.
        moved: bytes copied within the output (its old content at another offset).
        fetched: bytes written from downloaded chunks.
    """

    in_place: int = 0
    from_seeds: int = 0
    from_store: int = 0
    moved: int = 0
    fetched: int = 0


@functools.cache
def _zeros() -> bytes:
    """Zeros a chunk is compared with (chunks up to 1 MiB: ``--avg-chunk`` 256K's largest;
    a larger chunk of zeros is written)."""
    return bytes(1 << 20)


class OutputWriter:
    """Writes an image into an open descriptor following an :class:`OutputPlan`.

    Args:
        fd: the output, open for reading and writing (a device, a file written in place, or
            a new temporary file of the image's size).
        name: the output's name, for errors.
        layout: the image.
        plan: where each position comes from (updated when a read chunk does not check).
        digest: a chunk's id from its bytes.
        in_place: compare before writing, and leave bytes that are already right alone.
    """

    def __init__(self, fd: int, name: str, layout: Layout, plan: OutputPlan, *,
                 digest: Callable[[bytes | memoryview], bytes], in_place: bool) -> None:
        self.fd = fd
        self.name = name
        self.layout = layout
        self.plan = plan
        self.digest = digest
        self.in_place = in_place
        self.report = OutputReport(in_place=plan.nbytes[KEEP])
        self._lock = threading.Lock()

    def _put(self, data: bytes | memoryview, start: int) -> bool:
        """Write ``data`` at ``start`` unless (in place) it is already there; zeros are
        not written into a new output (it reads zeros there: a hole)."""
        if self.in_place and os.pread(self.fd, len(data), start) == data:
            with self._lock:
                self.report.in_place += len(data)
            return False
        if not self.in_place and _zeros().startswith(data):
            return True
        view = memoryview(data)
        while view:
            start += (n := os.pwrite(self.fd, view, start))
            view = view[n:]
        return True

    def _refetch(self, pos: int) -> None:
        """A chunk read locally did not match its id: fetch it instead."""
        self.plan.kind[pos] = FETCH
        self.plan.fetch.setdefault(self.layout.order[pos], []).append(pos)

    def _checked(self, data: bytes | memoryview, pos: int) -> bool:
        return self.digest(data) == self.layout.digests[self.layout.order[pos]]

    def write_local(self, seeds: Sequence[tuple[int, str]], store: ChunkStore | None, *,
                    on_progress: Callable[[int, int], None] | None = None) -> None:
        """Run the moves, then copy every ``SEED`` and ``STORE`` position.

        Args:
            seeds: per seed number, an open descriptor and the seed's name.
            store: the chunk store, when the plan uses it.
            on_progress: ``(image offset, image size)``.
        """
        self._moves()
        starts, kinds = self.layout.starts, self.plan.kind
        size = starts[-1]
        run: list[int] = []  # SEED positions contiguous in one seed

        def flush() -> None:
            if run:
                self._copy_run(run, seeds)
                run.clear()

        for pos, kind in enumerate(kinds):
            if kind == SEED:
                k, off = self.plan.source[pos]
                if run:
                    k0, off0 = self.plan.source[run[0]]
                    if (k != k0 or off0 + starts[pos] - starts[run[0]] != off
                            or starts[pos + 1] - starts[run[0]] > _COPY_BLOCK):
                        flush()
                run.append(pos)
            else:
                flush()
                if kind == STORE:
                    assert store is not None
                    self._from_store(store, pos)
            if on_progress is not None and pos % 64 == 0:
                on_progress(starts[pos], size)
        flush()
        if on_progress is not None:
            on_progress(size, size)  # (it ended at the last 64th position: 96-99 %)

    def _moves(self) -> None:
        starts = self.layout.starts
        stash: dict[int, bytes] = {}
        for is_stash, pos in self.plan.moves:
            if self.plan.kind[pos] != MOVE:  # its source did not check: fetched instead
                continue
            n = starts[pos + 1] - starts[pos]
            data = stash.pop(pos, None)
            if data is None:
                data = os.pread(self.fd, n, self.plan.source[pos][1])
                if not self._checked(data, pos):
                    self._refetch(pos)
                    continue
            if is_stash:
                stash[pos] = data
            elif self._put(data, starts[pos]):
                self.report.moved += n

    def _copy_run(self, run: list[int], seeds: Sequence[tuple[int, str]]) -> None:
        starts = self.layout.starts
        k, off = self.plan.source[run[0]]
        base = starts[run[0]]
        n = starts[run[-1] + 1] - base
        fd, name = seeds[k]
        data = memoryview(os.pread(fd, n, off))
        if len(data) != n:
            raise MissingBaseError(f"seed shorter than when it was scanned ({off} + {n})",
                                   path=name, offset=off + len(data))
        for pos in run:
            piece = data[starts[pos] - base : starts[pos + 1] - base]
            if not self._checked(piece, pos):
                self._refetch(pos)
            elif self._put(piece, starts[pos]):
                self.report.from_seeds += len(piece)

    def _from_store(self, store: ChunkStore, pos: int) -> None:
        starts = self.layout.starts
        entry = self.layout.order[pos]
        path = store.chunk_path(self.layout.digests[entry])
        try:
            with open(path, "rb") as f:
                data = f.read(self.layout.raw_sizes[entry] + 1)
        except FileNotFoundError:
            data = b""
        if len(data) != starts[pos + 1] - starts[pos] or not self._checked(data, pos):
            self._refetch(pos)
        elif self._put(data, starts[pos]):
            self.report.from_store += len(data)

    def put_fetched(self, entry: int, data: bytes) -> None:
        """Write a fetched (already checked) chunk at every position waiting for it."""
        starts = self.layout.starts
        for pos in self.plan.fetch.get(entry, ()):
            if self._put(data, starts[pos]):
                with self._lock:
                    self.report.fetched += len(data)

    def verify(self, image_digest: bytes | None, *,
               on_progress: Callable[[int, int], None] | None = None) -> None:
        """Read the output back: the image's BLAKE3 (or each chunk's id) must match.

        Raises:
            ChecksumError: naming the first bad offset when checked chunk by chunk.
        """
        starts = self.layout.starts
        size = starts[-1]
        if image_digest is not None:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            for off in range(0, size, _COPY_BLOCK):
                hasher.update(os.pread(self.fd, min(_COPY_BLOCK, size - off), off))
                if on_progress is not None:
                    on_progress(min(off + _COPY_BLOCK, size), size)
            if hasher.digest() != image_digest:
                raise ChecksumError(
                    "rebuilt image does not match the archive's image digest",
                    expected=image_digest.hex(), actual=hasher.digest().hex(), path=self.name)
            return
        for pos in range(len(self.layout.order)):
            data = os.pread(self.fd, starts[pos + 1] - starts[pos], starts[pos])
            if not self._checked(data, pos):
                raise ChecksumError(f"chunk {pos} of the written image does not match its id",
                                    offset=starts[pos], path=self.name)
            if on_progress is not None and (pos % 64 == 63 or pos + 2 == len(starts)):
                on_progress(starts[pos + 1], size)

