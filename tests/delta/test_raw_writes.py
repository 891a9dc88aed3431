"""``delta make`` of a stream carrying incompressible file data (random bytes: media,
archives, encrypted files): that data goes out as top-level WRITE commands beside the
carrier instead of through LZMA2 ``-9`` or zstd ``-19``, which spent ~0.5 s of CPU per MiB
on it for nothing (session 30: a ``device backup`` of a ``home`` given a 32 MiB random
file took 16.5 s of CPU; with the file rewritten 57 s). Oracles: the kernel's stream (the
expansion is it, byte for byte) and ``btrfs receive`` of the expansion (tree-sum)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import zstandard

from btrdelta.cli import main
from btrdelta.delta.format import (
    CARRIER_LZMA2,
    CARRIER_LZMA2_X86,
    CARRIER_ZSTD,
    BtrfsCommand,
    ZCommands,
)
from btrdelta.delta.parser import iter_items
from btrdelta.stream.constants import Cmd
from btrdelta.testing.loopfs import run
from btrdelta.testing.scenarios import kernel_receive, send
from btrdelta.tree.treesum import tree_sum
from tests.conftest import btrfs_loop


def _text(rnd: random.Random, size: int) -> bytes:
    """Compressible bytes: lines of words."""
    words = [f"word{i}" for i in range(300)]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rnd.choices(words, k=12)) + "\n").encode()
    return bytes(out[:size])


@pytest.mark.parametrize("carrier", ["auto", "zstd"])
def test_incompressible_writes_go_beside_the_carrier(tmp_path: Path, carrier: str) -> None:
    rnd = random.Random(30)
    noise = rnd.randbytes(3 << 20)
    with btrfs_loop("512M") as mnt:
        vol, a, b = mnt / "vol", mnt / "A", mnt / "B"
        run("btrfs", "-q", "subvolume", "create", vol)
        (vol / "old.txt").write_bytes(_text(rnd, 1 << 20))
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
        # new files in this order: text, random, text (auto: 10 MiB of compressible
        # data carried, so the xz carrier is chosen, and the random file between)
        (vol / "a.txt").write_bytes(_text(rnd, 5 << 20))
        (vol / "noise.bin").write_bytes(noise)
        (vol / "b.txt").write_bytes(_text(rnd, 5 << 20))
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
        stream = send(b, tmp_path / "AB.stream", parent=a)
        delta, back = tmp_path / "AB.delta", tmp_path / "AB.back"
        assert main(["delta", "make", "-f", str(stream), "--old", str(a), "-o", str(delta),
                     "--carrier", carrier, "-q"]) == 0
        assert main(["delta", "expand", "-f", str(delta), "--old", str(a), "-o", str(back),
                     "-q"]) == 0
        assert back.read_bytes() == stream.read_bytes()
        dest = mnt / "dest"
        dest.mkdir()
        kernel_receive(send(a, tmp_path / "A.full"), dest)
        kernel_receive(back, dest)
        assert tree_sum(dest / "B", ignore_root_mtime=True) == tree_sum(
            b, ignore_root_mtime=True)

    raw_writes, codecs = 0, set()
    with open(delta, "rb") as f:
        for item in iter_items(f.read):
            if isinstance(item, BtrfsCommand) and item.cmd == Cmd.WRITE:
                raw_writes += len(item.raw)
            elif isinstance(item, ZCommands):
                codecs.add(item.codec)
    assert codecs == ({CARRIER_ZSTD} if carrier == "zstd"
                      else {CARRIER_LZMA2, CARRIER_LZMA2_X86} & codecs), codecs
    assert codecs
    # the random file's data, and only about it, beside the carrier
    assert len(noise) <= raw_writes < len(noise) + (64 << 10), raw_writes
    # nothing lost by not compressing it: smaller than zstd -3 of the whole stream
    assert delta.stat().st_size < len(zstandard.ZstdCompressor(level=3).compress(
        stream.read_bytes()))
