"""A sendshot record's block digests in C (``send/_blockhash.c``, the ``blockhash``
accelerator) are the Python reference's, byte for byte, and a record made by one backend is
a base the other one sends against."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash

from btrdelta import _native
from btrdelta.cli import main
from btrdelta.send.onepass import (
    BLOCK,
    BlockHasher,
    block_digests_py,
    content_hasher,
    digests_of,
)
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Write

pytestmark = pytest.mark.skipif(
    not _native.available("blockhash") and os.environ.get("CI") != "true",
    reason="the blockhash accelerator is not built (xxhash.h missing)",
)

SEEDS = (0, 7, 2**63 - 1, 2**64 - 1, 2**64 + 5, -1, 2**70 + 3)


def _each_block(data: bytes, seed: int) -> bytes:
    return b"".join(xxhash.xxh3_128(data[i:i + BLOCK], seed=seed).digest()
                    for i in range(0, len(data), BLOCK))


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 15 * BLOCK + 100,
                                  16 * BLOCK, 16 * BLOCK + 1, (1 << 20) + 7])
def test_c_digests_are_the_references(size: int) -> None:
    c = _native.live("blockhash")
    assert c is not None
    data = random.Random(size).randbytes(size)
    for seed in SEEDS:
        want = _each_block(data, seed)
        assert len(want) == 16 * -(-size // BLOCK)
        assert block_digests_py(data, seed) == want
        for buf in (data, memoryview(data), bytearray(data)):
            assert c.blocks(buf, seed) == want
    view = memoryview(data)[size // 3:]  # not at the buffer's start
    assert c.blocks(view, 9) == _each_block(bytes(view), 9)


def test_c_refuses_what_is_not_bytes_and_a_seed() -> None:
    c = _native.live("blockhash")
    assert c is not None
    with pytest.raises(TypeError):
        c.blocks("text", 1)
    with pytest.raises(TypeError):
        c.blocks(b"x", 1.5)
    with pytest.raises(TypeError):
        c.blocks(b"x")


def _hashed(pieces: list[tuple[int, bytes]], size: int, seed: int) -> tuple[bytes, ...]:
    h = BlockHasher(seed)
    for pos, data in pieces:
        h.update(pos, memoryview(data))
    return h.finish(size)


def test_the_hasher_and_digests_of_agree_on_both_backends() -> None:
    rng = random.Random(5)
    a, b = rng.randbytes(3 * BLOCK), rng.randbytes(BLOCK + 333)
    pieces = [(0, a), (8 * BLOCK, b)]  # a hole between, a short last block
    size = 8 * BLOCK + len(b) + 5000  # zeros after the last bytes fed
    whole = rng.randbytes(5 * BLOCK + 17)
    got = {}
    for backend in ("c", "python"):
        with _native.use_backend(backend, "blockhash"):  # type: ignore[arg-type]
            got[backend] = (_hashed(pieces, size, 11), digests_of(whole, 11))
    assert got["c"] == got["python"]
    (_digest, blocks, _b3), (_wdigest, wblocks, _wb3) = got["c"]
    assert blocks == _each_block(a, 11) + _each_block(b, 11)
    assert wblocks == _each_block(whole, 11)


def test_a_record_of_one_backend_is_the_others_base(tmp_path: Path) -> None:
    """A record made with the Python digests (as every record was before the C ones), then
    an incremental send with the C digests against it: one block changed in each of two
    files, so only those blocks are written (every other block's digest matched)."""
    rng = random.Random(3)
    tree, store = tmp_path / "tree", str(tmp_path / "store")
    tree.mkdir()
    for i in range(4):  # one large enough to be hashed as it is sent
        (tree / f"f{i}").write_bytes(rng.randbytes((1 << 20) + 4096 * i + 100))
    with _native.use_backend("python", "blockhash"):
        assert main(["send", str(tree), "-o", str(tmp_path / "full"), "--record",
                     "--store", store, "-q"]) == 0
    for name, off in (("f1", 5 * BLOCK), ("f3", 200 * BLOCK)):
        with open(tree / name, "r+b") as f:
            f.seek(off)
            f.write(b"x" * 100)
    assert main(["send", str(tree), "-o", str(tmp_path / "inc"), "--from-sendshot", "latest",
                 "--store", store, "-q"]) == 0
    with open(tmp_path / "inc", "rb") as f:
        writes = [(r.path, r.offset, len(r.data)) for r in StreamReader(f)
                  if isinstance(r, Write)]
    assert writes == [(b"f1", 5 * BLOCK, BLOCK), (b"f3", 200 * BLOCK, BLOCK)]


def _fed(hasher: object, parts: list[tuple[bool, bytes]]) -> bytes:
    for zeros, data in parts:
        if zeros:
            hasher.zeros(len(data))  # type: ignore[attr-defined]
        else:
            hasher.update(data)  # type: ignore[attr-defined]
    digest: bytes = hasher.digest()  # type: ignore[attr-defined]
    return digest


def test_content_digests_with_holes_by_length_are_xxh3s() -> None:
    """XXH3-128 of content fed with runs of zeros by length (``x3_*`` in C, and the Python
    hasher that feeds the zeros) equals python-xxhash's of the same bytes: short and long
    inputs, runs that start and end inside a stripe (64 bytes) and a block (1024), many
    blocks, data between."""
    rng = random.Random(18)
    sizes = [0, 1, 63, 64, 65, 239, 240, 241, 1023, 1024, 1025, 16 * 1024 + 5, 100_000]
    for trial in range(600):
        parts = [(rng.random() < 0.5, b"") for _ in range(rng.randint(0, 5))]
        parts = [(z, bytes(n) if z else rng.randbytes(n))
                 for z, _ in parts for n in [rng.choice([*sizes, rng.randint(0, 9000)])]]
        want = xxhash.xxh3_128(b"".join(d for _z, d in parts)).digest()
        for backend in ("c", "python"):
            with _native.use_backend(backend, "blockhash"):  # type: ignore[arg-type]
                assert _fed(content_hasher(), parts) == want, (trial, backend)
    for backend in ("c", "python"):  # the C hasher only where holes are the most bytes
        with _native.use_backend(backend, "blockhash"):  # type: ignore[arg-type]
            assert type(content_hasher(1 << 20, 1 << 30)).__name__ == "_ZerosFed"
    with _native.use_backend("c", "blockhash"):
        assert type(content_hasher(1 << 30, 1 << 20)).__name__ == "_ZerosByLength"


def test_a_hole_of_many_gib_by_length() -> None:
    """3 GiB of zeros (hashed by python-xxhash as bytes: the oracle), data, more zeros."""
    with _native.use_backend("c", "blockhash"):
        h = content_hasher()
        h.zeros(3 << 30)
        h.update(b"data")
        h.zeros(70_000)
    want = xxhash.xxh3_128()
    zeros = memoryview(bytes(1 << 20))
    for _ in range(3 << 10):
        want.update(zeros)
    want.update(b"data" + bytes(70_000))
    assert h.digest() == want.digest()


def test_c_hasher_refuses_a_state_of_another_size() -> None:
    c = _native.live("blockhash")
    assert c is not None
    with pytest.raises(ValueError, match="state"):
        c.x3_update(bytearray(8), b"x")
    with pytest.raises(ValueError, match="state"):
        c.x3_zeros(bytearray(8), 5)
    with pytest.raises(TypeError):
        c.x3_update(bytes(c.X3_STATE_SIZE), b"x")  # read-only
