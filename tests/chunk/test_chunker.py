"""Chunker properties: chunks tile the input; local edits change a bounded number of chunks."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.chunk.chunker import (
    ChunkerParams,
    chunk_digest,
    hash_chunks,
    iter_chunks,
    map_file,
)
from btrdelta.errors import StreamFormatError

SMALL = ChunkerParams(min_size=64, avg_size=256, max_size=1024)


def _random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@given(st.binary(max_size=20000))
def test_chunks_concatenate_to_input(data: bytes) -> None:
    pieces = list(iter_chunks(data, SMALL))
    assert b"".join(bytes(v) for _, v in pieces) == data
    offsets = [o for o, _ in pieces]
    assert offsets == sorted(offsets)
    assert all(len(v) <= SMALL.max_size for _, v in pieces)
    assert all(len(v) >= SMALL.min_size for _, v in pieces[:-1])


@given(st.integers(0, 2**32), st.integers(0, 200), st.binary(min_size=1, max_size=100))
def test_insertion_near_front_changes_few_chunks(seed: int, at: int, insert: bytes) -> None:
    data = _random_bytes(seed, 64 * 1024)
    edited = data[:at] + insert + data[at:]
    before = {chunk_digest(v) for _, v in iter_chunks(data, SMALL)}
    after = [chunk_digest(v) for _, v in iter_chunks(edited, SMALL)]
    changed = sum(1 for d in after if d not in before)
    # cut points re-synchronise within a few chunks of the edit (FastCDC's cut-point
    # skipping can chain a handful); the bound does not grow with the input
    assert changed <= 16, changed
    assert len(after) > 150


def test_map_file_matches_buffer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _random_bytes(7, 300_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    with map_file(path) as view:
        from_file = [(o, chunk_digest(v)) for o, v in iter_chunks(view, SMALL)]
    assert from_file == [(o, chunk_digest(v)) for o, v in iter_chunks(data, SMALL)]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with map_file(empty) as view:
        assert list(iter_chunks(view, SMALL)) == []


@pytest.mark.parametrize(
    ("mn", "avg", "mx"), [(16, 256, 1024), (64, 100, 1024), (512, 256, 1024), (64, 256, 1 << 30)]
)
def test_bad_params_rejected(mn: int, avg: int, mx: int) -> None:
    with pytest.raises(StreamFormatError):
        ChunkerParams(mn, avg, mx).validate()


_POOL = ThreadPoolExecutor(1)


@given(st.integers(0, 2**32), st.integers(0, 40_000), st.sampled_from([4096, 5000, 1 << 20]),
       st.booleans())
def test_windowed_hashing_equals_whole_buffer_cut(
    seed: int, size: int, window: int, threaded: bool
) -> None:
    # low-entropy data so that some cuts are forced at max_size, others content-defined
    rng = random.Random(seed)
    data = bytes(rng.choice(b"\0\0\0ab") for _ in range(size // 4)) + rng.randbytes(size)
    oracle = [(o, blake3.blake3(bytes(v)).digest(), len(v)) for o, v in iter_chunks(data, SMALL)]
    batches = list(hash_chunks(data, SMALL, window=window, pool=_POOL if threaded else None))
    got = [(o, d, len(v)) for b in batches
           for o, v, d in zip(b.offsets, b.views, b.digests, strict=True)]
    assert got == oracle
    if len(data) > 4 * window:
        assert len(batches) > 1  # the windows really split the input
    assert all(b.end == b.offsets[-1] + len(b.views[-1]) for b in batches)
