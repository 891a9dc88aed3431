"""tree/overlay: the digest of a parent's file after writes and truncations, read from the
written ranges of the new file and the parent's file elsewhere. Oracle: BLAKE3 of the new
file read whole, after the same operations done with pwrite/ftruncate."""

from __future__ import annotations

import os
import tempfile

import blake3
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.tree.overlay import Overlay, overlay_digest

_OP = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 40_000), st.integers(0, 9_000)),
    st.tuples(st.just("t"), st.integers(0, 45_000), st.just(0)),
)


def _run(old: bytes, ops: list[tuple[str, int, int]]) -> tuple[str, str, int, int]:
    """(overlay digest, oracle digest, final size, bytes read from the new file)."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "old"), os.path.join(tmp, "new")
        for p in (a, b):
            with open(p, "wb") as f:
                f.write(old)
        ov = Overlay()
        fd = os.open(b, os.O_RDWR)
        old_fd = os.open(a, os.O_RDONLY)
        try:
            for i, (kind, x, n) in enumerate(ops):
                if kind == "w":
                    os.pwrite(fd, bytes([i % 251 + 1]) * n, x)
                    ov.write(x, n)
                else:
                    os.ftruncate(fd, x)
                    ov.truncate(x)
            size, layout = ov.layout(len(old))
            assert size == os.fstat(fd).st_size
            got = overlay_digest(fd, old_fd, layout)
            with open(b, "rb") as f:
                want = blake3.blake3(f.read()).hexdigest()
        finally:
            os.close(fd)
            os.close(old_fd)
        from_new = sum(e - s for s, e, from_old in layout if not from_old)
        return got, want, size, from_new


@given(st.binary(min_size=0, max_size=30_000), st.lists(_OP, max_size=8))
def test_overlay_digest_is_the_files(old: bytes, ops: list[tuple[str, int, int]]) -> None:
    got, want, _size, _new = _run(old, ops)
    assert got == want


def test_only_written_ranges_come_from_the_new_file() -> None:
    old = os.urandom(1 << 20)
    got, want, size, from_new = _run(old, [("w", 4096, 100), ("w", 4196, 50),
                                           ("w", 900_000, 4096)])
    assert got == want
    assert size == 1 << 20
    assert from_new == 150 + 4096


def test_consecutive_writes_are_one_range_and_a_truncation_drops_what_it_cut() -> None:
    ov = Overlay()
    for off in range(0, 1 << 20, 4096):
        ov.write(off, 4096)
    assert len(ov.ops) == 1
    ov.truncate(100)
    ov.write(200, 10)
    size, layout = ov.layout(50)
    # 0..100 written, 100..200 zeros past the cut (the new file's), 200..210 written
    assert size == 210
    assert layout == [(0, 100, False), (100, 200, False), (200, 210, False)]
    size, layout = Overlay().layout(7)
    assert (size, layout) == (7, [(0, 7, True)])
