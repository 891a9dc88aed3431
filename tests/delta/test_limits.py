"""Hostile delta streams: memory bounded by ``--max-file-size`` whatever the carrier
declares or unfolds to, and bytes after DEND refused before anything is committed.

Memory is checked on ``btrdelta delta expand`` and ``btrdelta receive`` in a child process
(peak RSS from ``wait4``), with the C unfolder and with the Python one. The trailing-bytes
test compares against the kernel: the same delta without the extra bytes gives the tree
``btrfs receive`` gives (``tree_sum``) and expands to the kernel's stream byte for byte.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest
import zstandard

from btrdelta.delta.encoding import encode_item
from btrdelta.delta.format import (
    CARRIER_LZMA2,
    StreamStart,
    ZCommands,
    encode_delta_header,
)
from btrdelta.delta.make import make_delta
from btrdelta.delta.options import MakeOptions
from btrdelta.stream.constants import Attr, Cmd
from btrdelta.stream.crc import crc32c
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive, make_snapshots, send
from btrdelta.tree import tree_sum
from tests.conftest import require_btrfs, run_peak_rss

#: peak RSS allowed for one hostile delta (the CLI alone peaks at ~40 MB; before the limits,
#: the unfolding bomb below took ~600 MB, growing with the number of commands)
MAX_RSS = 120 << 20
LONG_PATH = b"p" * 60_000


def _cmd(cmd: int, payload: bytes) -> bytes:
    """A carried btrfs command (CRC field 0, as inside the carrier)."""
    return struct.pack("<IHI", len(payload), cmd, 0) + payload


def _tlv(attr: int, value: bytes) -> bytes:
    return struct.pack("<HH", attr, len(value)) + value


def _delta(raw: bytes, zdata: bytes) -> bytes:
    """A delta stream: header, STREAM v2, one ZCMDS carrying ``raw`` as ``zdata``; no DEND."""
    out = [encode_delta_header(), *encode_item(StreamStart(2)),
           *encode_item(ZCommands(len(raw), memoryview(zdata), crc32c(raw, 0)))]
    return b"".join(bytes(p) for p in out)


def _unfold_bomb(count: int) -> bytes:
    """A TRUNCATE of a 60,000-byte path, then ``count`` TRUNCATEs naming it by the 4-byte
    previous-path marker: 26 carried bytes that unfold to 60 KB each."""
    size = _tlv(Attr.SIZE, struct.pack("<Q", 0))
    raw = _cmd(Cmd.TRUNCATE, _tlv(Attr.PATH, LONG_PATH) + size)
    raw += _cmd(Cmd.TRUNCATE, struct.pack("<HH", 0xFFFF, 0) + size) * count
    return _delta(raw, zstandard.ZstdCompressor(level=3).compress(raw))


def _raw_frame(raw: bytes, window_log: int) -> bytes:
    """A zstd frame header declaring a ``window_log`` window (no content size), then ``raw``
    as raw blocks (the frame stays open: the carrier spans the whole delta stream)."""
    out = bytearray(struct.pack("<IBB", 0xFD2FB528, 0x00, (window_log - 10) << 3))
    for i in range(0, len(raw), 1 << 17):
        blk = raw[i : i + (1 << 17)]
        out += (len(blk) << 3).to_bytes(3, "little") + blk
    return bytes(out)


def _run(*args: str, python: bool = False) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (bytes) of ``btrdelta ARGS`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    if python:
        env["BTRDELTA_PURE_PYTHON"] = "1"
    return run_peak_rss([sys.executable, "-m", "btrdelta", *args], env)


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("impl", ["c", "python"])
def test_unfolding_bomb_stays_bounded(impl: str, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.delta"
    bomb.write_bytes(_unfold_bomb(10_000))  # unfolds to 600 MB
    assert bomb.stat().st_size < 20_000
    old = tmp_path / "old"
    old.mkdir()
    code, err, rss = _run("delta", "expand", "-f", str(bomb), "--old", str(old), "-o", "-",
                          python=impl == "python")
    assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB expanding a {bomb.stat().st_size}-byte delta"
    assert code == 3, err
    assert "truncated delta stream (no DEND record)" in _one_line(err)
    dest = tmp_path / "dest"
    dest.mkdir()
    code, err, rss = _run("receive", "-f", str(bomb), str(dest), python=impl == "python")
    assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB receiving a {bomb.stat().st_size}-byte delta"
    assert code == 3, err
    assert "command before SUBVOL/SNAPSHOT" in _one_line(err)
    assert list(dest.iterdir()) == []


def test_carrier_limits_follow_max_file_size(tmp_path: Path) -> None:
    raw = _cmd(Cmd.TRUNCATE, _tlv(Attr.PATH, b"f") + _tlv(Attr.SIZE, bytes(8)))
    old = tmp_path / "old"
    old.mkdir()
    cases = {  # window log, --max-file-size, expected error
        "w27": (27, "128M", "truncated delta stream (no DEND record)"),  # 128 MiB window
        "w27-small": (27, "64M", "a 134217728-byte zstd window (limit 67108864"),
        "w23-small": (23, "1M", "truncated delta stream (no DEND record)"),  # 8 MiB: always
        "w31": (31, None, "a 2147483648-byte zstd window (limit 268435456"),  # the default
    }
    for name, (window_log, limit, expected) in cases.items():
        delta = tmp_path / f"{name}.delta"
        delta.write_bytes(_delta(raw, _raw_frame(raw, window_log)))
        opts = ["--max-file-size", limit] if limit else []
        code, err, _ = _run("delta", "expand", "-f", str(delta), "--old", str(old), *opts)
        assert code == 3, (name, err)
        assert expected in _one_line(err), name
    # format 5: an LZMA2 carrier's dictionary (DICT), refused before it is allocated
    for limit, expected in (("64M", "a 134217728-byte LZMA2 dictionary (limit 67108864"),
                            ("128M", "ZCMDS inflates to 0 bytes")):
        delta = tmp_path / "lzma2.delta"
        item = ZCommands(len(raw), memoryview(b"\0" * 16), crc32c(raw, 0), codec=CARRIER_LZMA2,
                         dict_size=128 << 20)
        delta.write_bytes(b"".join(bytes(p) for p in [
            encode_delta_header(5), *encode_item(StreamStart(2)), *encode_item(item)]))
        code, err, _ = _run("delta", "expand", "-f", str(delta), "--old", str(old),
                            "--max-file-size", limit)
        assert code == 3, err
        assert expected in _one_line(err), limit
    # a ZCMDS declaring more than the limit is refused before it is inflated
    big = _cmd(Cmd.TRUNCATE, _tlv(Attr.PATH, b"f" * 1000) + _tlv(Attr.SIZE, bytes(8))) * 2000
    delta = tmp_path / "big.delta"
    delta.write_bytes(_delta(big, zstandard.ZstdCompressor().compress(big)))
    code, err, _ = _run("delta", "expand", "-f", str(delta), "--old", str(old),
                        "--max-file-size", "1M")
    assert code == 3, err
    assert f"ZCMDS declares {len(big)} bytes (limit 1048576)" in _one_line(err)
    dest = tmp_path / "dest"
    dest.mkdir()
    code, err, _ = _run("receive", "--max-file-size", "1M", "-f", str(delta), str(dest))
    assert code == 3, err
    assert f"ZCMDS declares {len(big)} bytes (limit 1048576)" in _one_line(err)


SCENARIO = next(s for s in SCENARIOS if s.name == "compressible-data-W6")


@pytest.mark.btrfs
def test_bytes_after_dend_are_refused_before_the_commit(tmp_path: Path) -> None:
    require_btrfs()
    with loop_fs("btrfs", size="1G") as mnt:
        pair = make_snapshots(mnt, SCENARIO)
        full = send(pair.a, tmp_path / "A.stream")
        incr = send(pair.b, tmp_path / "B.stream", parent=pair.a)
        good = tmp_path / "B.delta"
        with open(incr, "rb") as f, open(good, "wb") as o:
            make_delta(f, pair.a, o.write, MakeOptions(jobs=1))
        bad = tmp_path / "B-junk.delta"
        bad.write_bytes(good.read_bytes() + b"junk")
        kernel = mnt / "kernel"
        kernel.mkdir()
        kernel_receive(full, kernel)
        kernel_receive(incr, kernel)

        out = tmp_path / "B.again"
        code, err, _ = _run("delta", "expand", "-f", str(bad), "--old", str(pair.a),
                            "-o", str(out))
        assert code == 3, err
        line = _one_line(err)
        assert "data after the end of the delta stream" in line
        assert f"offset {good.stat().st_size}" in line
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("B.again")] == []
        code, err, _ = _run("delta", "expand", "-f", str(good), "--old", str(pair.a),
                            "-o", str(out))
        assert code == 0, err
        assert out.read_bytes() == incr.read_bytes()

        for dest in (mnt / "ours", tmp_path / "ours"):  # btrfs backend, directory backend
            dest.mkdir()
            code, err, _ = _run("receive", "-f", str(full), str(dest))
            assert code == 0, err
            code, err, _ = _run("receive", "-f", str(bad), str(dest))
            assert code == 3, err
            assert "data after the end of the delta stream" in _one_line(err)
            left = sorted(p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json")
            assert left == [pair.a.name], "committed (or left) from a delta with trailing bytes"
            code, err, _ = _run("receive", "-f", str(good), str(dest))
            assert code == 0, err
            for name in (pair.a.name, pair.b.name):
                assert tree_sum(dest / name, ignore_root_mtime=True) == \
                    tree_sum(kernel / name, ignore_root_mtime=True)
