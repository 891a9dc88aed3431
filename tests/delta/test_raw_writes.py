"""``delta make`` of a stream carrying incompressible file data (random bytes: media,
archives, encrypted files): that data goes out as top-level WRITE commands beside the
carrier instead of through LZMA2 ``-9`` or zstd ``-19``, which spent ~0.5 s of CPU per MiB
on it for nothing (session 30: a ``device backup`` of a ``home`` given a 32 MiB random
file took 16.5 s of CPU; with the file rewritten 57 s). Oracles: the kernel's stream (the
expansion is it, byte for byte) and ``btrfs receive`` of the expansion (tree-sum)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from btrdelta.cli import main
from btrdelta.delta.format import (
    CARRIER_LZMA2,
    CARRIER_LZMA2_X86,
    CARRIER_ZSTD,
    BtrfsCommand,
    Patch,
    ZCommands,
)
from btrdelta.delta.parser import iter_items
from btrdelta.delta.unpack import CarrierReader
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


def test_a_file_of_random_bytes_written_anew_is_not_diffed(tmp_path: Path) -> None:
    """An 8 MiB file of random bytes rewritten with other random bytes: no patch can pay,
    and HDiffPatch searched it for seconds of CPU (16 MiB: 17 s); now a few pieces of the
    new content looked for in the old one tell, and it is carried as it is. A file of
    random bytes with a few edits is still patched."""
    rnd = random.Random(31)
    edited = bytearray(rnd.randbytes(2 << 20))
    with btrfs_loop("512M") as mnt:
        vol, a, b = mnt / "vol", mnt / "A", mnt / "B"
        run("btrfs", "-q", "subvolume", "create", vol)
        (vol / "rewritten.bin").write_bytes(rnd.randbytes(8 << 20))
        (vol / "edited.bin").write_bytes(edited)
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
        (vol / "rewritten.bin").write_bytes(rnd.randbytes(8 << 20))
        for at in (1000, 900_000, 2_000_000):
            edited[at : at + 4] = b"edit"
        (vol / "edited.bin").write_bytes(edited)
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
        stream = send(b, tmp_path / "AB.stream", parent=a)
        delta, back = tmp_path / "AB.delta", tmp_path / "AB.back"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
        proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "delta", "make", "-f",
                                 str(stream), "--old", str(a), "-o", str(delta), "-q"],
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        assert main(["delta", "expand", "-f", str(delta), "--old", str(a), "-o", str(back),
                     "-q"]) == 0
        assert back.read_bytes() == stream.read_bytes()
    patched = set()
    carrier = CarrierReader(None)
    carrier.state.lenient = True  # no old tree: names from its listings are not resolved
    with open(delta, "rb") as f:
        for item in iter_items(f.read):
            inner = carrier.split(carrier.inflate(item), 1) \
                if isinstance(item, ZCommands) else [item]
            patched |= {bytes(p.path) for p in inner if isinstance(p, Patch)}
    assert patched == {b"edited.bin"}, patched
    # the search HDiffPatch made for nothing took 8 s of CPU for these 8 MiB (session 30)
    assert usage.ru_utime + usage.ru_stime < 2.0, usage


def test_deltas_made_at_once_in_threads_are_each_what_one_alone_makes(
        tmp_path: Path) -> None:
    """Six threads each making the delta of one stream carrying 16 MiB of random file
    data (every WRITE of it probed by zstd's fastest level) at once, twice: each output is
    the one a single make gives. The probe was one zstd context of the module for every
    writer, which zstd forbids: two probing at once corrupted it ('ZstdError: cannot
    compress: Src size is incorrect' in 1 of 5 runs of this test; in a loop of probes of
    256 KiB in 4 threads, SIGSEGV)."""
    import io
    import threading

    import btrdelta

    rnd = random.Random(7)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    for i in range(4):
        (old / f"t{i}").write_bytes(_text(rnd, 300_000))
        (new / f"t{i}").write_bytes(_text(rnd, 300_000))
        (new / f"r{i}").write_bytes(rnd.randbytes(4 << 20))
    stream = tmp_path / "s"
    btrdelta.send_tree(new, str(stream), parent=old)

    def make() -> bytes:
        out = io.BytesIO()
        btrdelta.make_delta(str(stream), old, out, carrier="zstd", jobs=1)
        return out.getvalue()

    alone = make()
    got: list[bytes] = []

    def twice() -> None:
        got.extend(make() for _ in range(2))

    threads = [threading.Thread(target=twice) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 12
    assert all(g == alone for g in got), [len(g) for g in got] + [len(alone)]
