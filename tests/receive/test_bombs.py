"""Decompression bombs in ENCODED_WRITE: memory stays bounded, the error is one line.

A 32 KB zstd frame can declare (and inflate to) 1 GiB; ``zstandard`` allocates what the frame
declares whatever ``max_output_size`` says. Each bomb is received by ``btrdelta receive`` in a
subprocess whose peak RSS (``wait4``) is checked, on the directory backend and on btrfs (where
the kernel refuses the extent and the receiver falls back to decompressing it), with the C
fast path and with the Python handlers alone.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import lzallright
import pytest
import zstandard

from btrdelta.errors import StreamFormatError
from btrdelta.receive.encoded import MAX_UNENCODED, decode_extent
from btrdelta.stream.records import EncodedWrite, End, Mkfile
from btrdelta.testing.loopfs import loop_fs
from tests.conftest import run_peak_rss

from .helpers import stream_bytes, subvol

GIB = 1 << 30
#: peak RSS allowed for receiving one bomb (the receiver alone peaks at ~20 MB;
#: before the fix the zstd bomb took 1.06 GB)
MAX_RSS = 100 << 20


def _zstd_bomb(size: int, declare: bool) -> bytes:
    """One zstd frame of ``size`` zero bytes as 128 KiB RLE blocks (4 bytes each), with the
    content size in its header (single segment) or without it (1 MiB window)."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out += bytes([0xE0]) + struct.pack("<Q", size) if declare else bytes([0x00, 10 << 3])
    n, rest = divmod(size, 128 << 10)
    sizes = [128 << 10] * n + ([rest] if rest else [])
    for i, blk in enumerate(sizes):
        out += ((blk << 3) | (1 << 1) | (i == len(sizes) - 1)).to_bytes(3, "little") + b"\0"
    return bytes(out)


def _lzo_segment_bomb(sector: int) -> bytes:
    """btrfs LZO framing with one segment as large as allowed that inflates far past a sector."""
    comp = lzallright.LZOCompressor()
    n = sector
    seg = comp.compress(bytes(n))
    limit = sector + sector // 16 + 64 + 3
    while len(seg) <= limit:
        n *= 2
        seg = comp.compress(bytes(n))
    n //= 2
    seg = comp.compress(bytes(n))
    body = len(seg).to_bytes(4, "little") + seg
    return (len(body) + 4).to_bytes(4, "little") + body


BOMBS = {
    # name: (compression, payload, unencoded_len, expected error or None)
    "zstd-declared-1g": (2, _zstd_bomb(GIB, True), 4096, "frame declares 1073741824 bytes"),
    "zstd-undeclared-1g": (2, _zstd_bomb(GIB, False), 4096, "inflates to more than"),
    "zlib-64m": (1, zlib.compress(bytes(64 << 20), 9), 4096, "inflates to more than"),
    "zlib-zero-len": (1, zlib.compress(bytes(160 << 20), 9), 0, None),
    "lzo-64k-segment": (7, _lzo_segment_bomb(65536), 65536,
                        "LZO segment decompressed to more than one sector"),
}


def _stream(path: Path, compression: int, payload: bytes, unencoded_len: int) -> Path:
    recs = [subvol(), Mkfile(path=b"f", ino=257),
            EncodedWrite(path=b"f", offset=0, unencoded_file_len=min(unencoded_len, 4096),
                         unencoded_len=unencoded_len, unencoded_offset=0,
                         compression=compression, data=payload),
            End()]
    path.write_bytes(stream_bytes(recs, version=2))
    return path


def _receive(stream: Path, dest: Path, *extra: str, python: bool) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (bytes) of ``btrdelta receive`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    if python:
        env["BTRDELTA_PURE_PYTHON"] = "1"
    return run_peak_rss([sys.executable, "-m", "btrdelta", "receive", *extra, "-f",
                         str(stream), str(dest)], env)


@pytest.fixture(scope="module")
def btrfs_mnt() -> Iterator[Path]:
    from tests.conftest import require_btrfs

    require_btrfs()
    with loop_fs("btrfs", size="256M") as mnt:
        yield mnt


@pytest.fixture(params=["dir", "btrfs", "btrfs-force-decompress"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[str]]:
    """DEST on the directory backend or on btrfs (the kernel refuses these extents, whose
    payload is larger than their unencoded length: the receiver decompresses them)."""
    extra = ["--force-decompress"] if request.param.endswith("force-decompress") else []
    root = tmp_path if request.param == "dir" else request.getfixturevalue("btrfs_mnt")
    d = root / f"dest-{tmp_path.name}"
    d.mkdir()
    return d, extra


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_bomb_bounded(bomb: str, impl: str, dest: tuple[Path, list[str]],
                      tmp_path: Path) -> None:
    compression, payload, unencoded_len, expected = BOMBS[bomb]
    assert len(payload) < 200_000
    stream = _stream(tmp_path / "bomb.stream", compression, payload, unencoded_len)
    root, extra = dest
    code, err, rss = _receive(stream, root, *extra, python=impl == "python")
    assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB receiving a {len(payload)}-byte record"
    assert "Traceback" not in err
    if expected is None:
        assert code == 0, err
        return
    assert code == 3, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    # (the stream file named since session 32: before, a plain stream's record errors
    # named none, a delta's did)
    assert lines[0].startswith(f"btrdelta receive: error: {stream}: record 2 (encoded_write), "
                               "path 'f': ")
    assert expected in lines[0]
    assert [p.name for p in root.iterdir() if p.name != ".btrdelta-subvols.json"] == []


def test_decode_extent_bounds() -> None:
    assert zstandard.ZstdDecompressor().decompress(_zstd_bomb(300_000, True)) == bytes(300_000)
    frame = _zstd_bomb(1 << 20, False)
    with pytest.raises(StreamFormatError, match="inflates to more than the extent's 4096"):
        decode_extent(frame, 2, 4096)
    assert decode_extent(frame, 2, 1 << 20) == bytes(1 << 20)
    # shorter output is zero-extended, padding after the frame ignored
    small = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100) + bytes(64)
    assert decode_extent(small, 2, 4096) == b"x" * 100 + bytes(3996)
    with pytest.raises(StreamFormatError, match="over the limit"):
        decode_extent(small, 2, MAX_UNENCODED + 1)
    # a frame that needs a window above the cap is refused, not allocated
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27,
                                                            write_content_size=0)
    wide = zstandard.ZstdCompressor(compression_params=params).compress(bytes(64 << 20))
    with pytest.raises(StreamFormatError, match="cannot decompress zstd extent"):
        decode_extent(wide, 2, 4096)
    assert decode_extent(zlib.compress(b"abc" * 10), 1, 30) == b"abc" * 10
    with pytest.raises(StreamFormatError, match="unsupported ENCODED_WRITE compression 9"):
        decode_extent(b"", 9, 0)


def test_each_thread_decodes_with_its_own_contexts() -> None:
    """A zstandard (or LZO) context must not be used by two threads at once: two receives
    in threads of one process each get their own, and decode in parallel correctly."""
    import threading

    from btrdelta.receive import encoded

    seen: dict[str, tuple[object, object]] = {}  # the contexts kept: their ids stay unique
    together = threading.Barrier(4)
    datas = [os.urandom(2000) * 20 + bytes([i]) * 9000 for i in range(8)]
    frames = [zstandard.ZstdCompressor().compress(d) for d in datas]
    bad: list[int] = []

    def work(name: str) -> None:
        together.wait()
        seen[name] = (encoded._zstd_dctx(), encoded._lzo())
        for _ in range(50):
            for i, frame in enumerate(frames):
                if decode_extent(frame, 2, len(datas[i])) != datas[i]:
                    bad.append(i)

    threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert len({id(z) for z, _ in seen.values()}) == 4
    assert len({id(lz) for _, lz in seen.values()}) == 4
    assert encoded._zstd_dctx() is encoded._zstd_dctx()  # one per thread, kept
