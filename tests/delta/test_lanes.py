"""The ``xz`` carrier on several threads (:mod:`btrdelta.delta.lanes`): blocks of pieces,
each block's encoder primed with the bytes before it, make one raw LZMA2 stream.

Oracle: Python's own :mod:`lzma` (liblzma through the standard library's binding, not
this package's), decoding the pieces one after the other as one raw LZMA2 stream."""

from __future__ import annotations

import lzma
import random

import pytest

from btrdelta.delta.lanes import Lanes

DICT = 1 << 20


def _pieces() -> list[bytes]:
    """40 pieces of 8 KiB of random bytes, the last 20 a copy of the first 20: only an
    encoder that sees the bytes of earlier blocks finds the copy."""
    rnd = random.Random(12)
    first = [rnd.randbytes(8192) for _ in range(20)]
    return first + first


def _compress(pieces: list[bytes], workers: int, block: int) -> list[bytes]:
    lanes = Lanes(DICT, preset=6, extreme=False, workers=workers, block=block)
    try:
        futures = [lanes.submit(p) for p in pieces]
        return [f.result() for f in futures]
    finally:
        lanes.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_primed_blocks_decode_as_one_stream(workers: int) -> None:
    """Blocks of 32 KiB (four pieces) on several workers: each piece decodes, on its
    own and in order, to exactly its bytes with one decoder for the whole stream (a sync
    flush ends each piece); the copied half costs almost nothing (its blocks' encoders
    were primed with the first half: independent blocks would cost as much as it)."""
    pieces = _pieces()
    out = _compress(pieces, workers, 32 << 10)
    dec = lzma.LZMADecompressor(lzma.FORMAT_RAW,
                                filters=[{"id": lzma.FILTER_LZMA2, "dict_size": DICT}])
    for piece, z in zip(pieces, out, strict=True):
        assert dec.decompress(z) == piece
    first, second = sum(map(len, out[:20])), sum(map(len, out[20:]))
    assert first > 20 * 8192
    assert second < first // 20


def test_the_bytes_do_not_depend_on_the_workers() -> None:
    """The cut points depend on the pieces only: one worker or four, the same bytes."""
    pieces = _pieces()
    assert _compress(pieces, 1, 24 << 10) == _compress(pieces, 4, 24 << 10)


def test_blocks_larger_than_the_dictionary_keep_only_its_last_bytes() -> None:
    """Blocks of 64 KiB, a 16 KiB dictionary: the next block is primed with the last 16 KiB
    of the one before (a copy of them at its start costs almost nothing), and no earlier
    piece of a block is kept for it (the history holds at most the dictionary and one
    piece)."""
    rnd = random.Random(7)
    block, dict_size = 64 << 10, 16 << 10
    first = [rnd.randbytes(8192) for _ in range(8)]  # one block of 64 KiB
    pieces = [*first, first[-2], first[-1], first[0]]
    lanes = Lanes(dict_size, preset=6, extreme=False, workers=2, block=block)
    try:
        futures = []
        for i, p in enumerate(pieces):
            futures.append(lanes.submit(p))
            if i < 6:  # the block's first 48 KiB: never a preset
                assert lanes._history_len == 0
            assert lanes._history_len <= dict_size + 8192
        out = [f.result() for f in futures]
    finally:
        lanes.close()
    dec = lzma.LZMADecompressor(lzma.FORMAT_RAW,
                                filters=[{"id": lzma.FILTER_LZMA2, "dict_size": dict_size}])
    for piece, z in zip(pieces, out, strict=True):
        assert dec.decompress(z) == piece
    assert len(out[8]) + len(out[9]) < 1024  # the last 16 KiB of the block before
    assert len(out[10]) > 8192  # 64 KiB back: outside the dictionary
