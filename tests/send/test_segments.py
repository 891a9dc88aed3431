"""A record's data segments of a file with many holes: bounded as its cells are (a store's
``extent_max``), found one at a time, and sends against such records received by the
kernel equal to the source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btrdelta.fs.content import data_segments, iter_data_segments
from btrdelta.send.onepass import BLOCK, block_segments, segment_max
from tests.send.conftest import run
from tests.send.test_extents import _peak, _Rounds, _write


def _merged(segs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, n in segs:
        if out and a - (out[-1][0] + out[-1][1]) < gap:
            out[-1] = (out[-1][0], a + n - out[-1][0])
        else:
            out.append((a, n))
    return out


def _reference(segs: list[tuple[int, int]], size: int, most: int) -> list[tuple[int, int]]:
    """Widened and merged with every segment at hand (no bound), then the holes below the
    least 8 KiB x 2^k that leaves at most ``most`` taken as data."""
    exact: list[tuple[int, int]] = []
    for off, n in segs:
        a, b = off - off % BLOCK, min(size, -(-(off + n) // BLOCK) * BLOCK)
        exact = _merged([*exact, (a, b - a)], 1)
    gap = 1
    while len(got := _merged(exact, gap)) > most:
        gap = max(2 * BLOCK, 2 * gap)
    return got


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    """Data ranges of a file (in order, not touching; any alignment) and its size."""
    pos, segs = 0, []
    for _ in range(draw(st.integers(0, 40))):
        pos += draw(st.integers(1, 9 * BLOCK))
        n = draw(st.integers(1, 5 * BLOCK))
        segs.append((pos, n))
        pos += n
    return segs, pos + draw(st.integers(0, 2 * BLOCK))


@settings(max_examples=300, deadline=None)
@given(_layouts(), st.integers(1, 12))
def test_segments_past_the_bound_take_the_shortest_holes_as_data(
        layout: tuple[list[tuple[int, int]], int], most: int) -> None:
    """Taken one at a time, the segments are those of the whole list bounded at once: at
    most ``most``, covering every byte of data, the holes kept the longest ones."""
    segs, size = layout
    got = block_segments(iter(segs), size, most)
    assert got == _reference(segs, size, most)
    assert len(got) <= most
    assert block_segments(iter(segs), size) == _reference(segs, size, len(segs) or 1)
    for off, n in segs:  # (every byte of data in a segment)
        assert any(a <= off and off + n <= a + m for a, m in got) or off >= size


def test_segment_bound_follows_the_extent_bound() -> None:
    assert segment_max() == (4 << 20) // 50
    assert segment_max(64 * 50) == 64
    assert segment_max(10) == 1


def _sparse(live: Path, blocks: int) -> Path:
    """``sparse.img`` in ``live``: ``blocks`` blocks of data, each followed by a hole of
    one to three blocks (written back: its holes are final)."""
    img = live / "sparse.img"
    fd = os.open(img, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        pos = 0
        for k in range(blocks):
            os.pwrite(fd, os.urandom(BLOCK), pos)
            pos += BLOCK * (2 + k % 3)
        os.ftruncate(fd, pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    return img


@pytest.mark.btrfs
def test_many_holes_recorded_within_the_bound(two_fs: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    """A file of 3,000 data blocks between holes, its data segments (3,000) far over a
    store's lowered bound (64): found one at a time, they never take more memory than about
    the bound's (listed whole: 3,000); each record keeps at most 64 for it (made by a full
    send, by partial reads, by the hashing threads); over rounds of writes, a punched hole,
    a range filled, growth, a cut and every block rewritten, each stream sent against the
    last record is received by the kernel equal to the source (_Rounds), and (but the last)
    reads no more than a tenth of the file."""
    snd, rcv = two_fs
    run("mount", "-o", "remount,noatime", snd)
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    img = _sparse(live, 3000)
    most = 64
    fd = os.open(img, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert len(data_segments(fd, size)) == 3000
        whole, held = _peak(lambda: data_segments(fd, size))
        got, peak = _peak(lambda: block_segments(iter_data_segments(fd, size), size, most))
    finally:
        os.close(fd)
    assert isinstance(got, list)
    assert isinstance(whole, list)
    assert got == _reference(whole, size, most)
    assert held > 200_000
    assert peak < 40_000, peak
    rounds = _Rounds(snd, rcv, tmp_path / "store", tmp_path / "s", most * 50)

    def recorded() -> list[tuple[int, int]]:
        res = rounds.send()
        assert res.recorded is not None
        if 1 < rounds.i < 7:
            assert res.stats.bytes_read < img.stat().st_size // 10, rounds.i
        row = next(r for r in rounds.store.view(res.recorded).rows()
                   if r.ino == img.stat().st_ino)
        assert row.segments is not None
        assert len(row.segments) <= most, rounds.i
        return row.segments

    recorded()
    changes = [
        lambda: _write(img, 7 * BLOCK, os.urandom(2 * BLOCK)),  # (into a hole and data)
        lambda: run("fallocate", "-p", "-o", str(1000 * BLOCK), "-l", str(900 * BLOCK), img),
        lambda: _write(img, 5000 * BLOCK, os.urandom(300 * BLOCK)),
        lambda: _write(img, img.stat().st_size + 10 * BLOCK, os.urandom(BLOCK)),
        lambda: os.truncate(img, img.stat().st_size - 4000 * BLOCK - 123),
        lambda: _sparse(live, 3000),  # (every block rewritten: hashed whole by the threads)
    ]
    for change in changes:
        change()
        recorded()  # (received by the kernel equal to the source)
