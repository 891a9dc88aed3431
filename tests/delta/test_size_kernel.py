"""Format 6 on kernel-made streams: new executables through the x86 converter and a new
file patched against several old files, checked against the kernel (the expansion is the
kernel's stream byte for byte; ``btrfs receive`` of it gives the new snapshot's tree)."""

from __future__ import annotations

import io
import lzma
import random
import shutil
from pathlib import Path

import pytest

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.delta.format import CARRIER_LZMA2_X86, Patch, ZCommands
from btrdelta.delta.parser import iter_items
from btrdelta.delta.unpack import CarrierReader
from btrdelta.testing.loopfs import run
from btrdelta.testing.scenarios import kernel_receive, send
from btrdelta.tree.treesum import tree_sum
from tests.conftest import btrfs_loop

pytestmark = pytest.mark.btrfs


def _executables() -> list[Path]:
    """A few x86-64 executables of this machine (~1.5 MB in all)."""
    found = []
    for name in ("bash", "tar", "gzip", "sed", "grep", "find"):
        exe = shutil.which(name)
        if exe is not None and Path(exe).resolve().read_bytes()[:4] == b"\x7fELF":
            found.append(Path(exe).resolve())
    return found


def _patches(delta: bytes) -> list[Patch]:
    """Every PATCH and CPATCH of a delta, carried or not."""
    out: list[Patch] = []
    carrier = CarrierReader(None)
    carrier.state.lenient = True  # no old tree: names from its listings are not resolved
    codecs = set()
    for item in iter_items(io.BytesIO(delta).read):
        if isinstance(item, Patch):
            out.append(item)
        elif isinstance(item, ZCommands):
            codecs.add(item.codec)
            raw = carrier.inflate(item)
            out += [s for s in carrier.split(raw, 1) if isinstance(s, Patch)]
    assert CARRIER_LZMA2_X86 in codecs  # the executables went through the x86 converter
    return out


def test_format_6_against_the_kernel(tmp_path: Path) -> None:
    rnd = random.Random(11)
    with btrfs_loop("512M") as mnt:
        vol = mnt / "vol"
        run("btrfs", "-q", "subvolume", "create", vol)
        (vol / "share").mkdir()
        pieces = [rnd.randbytes(50_000) for _ in range(3)]
        for i, p in enumerate(pieces):
            (vol / "share" / f"part{i}.dat").write_bytes(p)
        for i in range(10):
            (vol / "share" / f"other{i}.dat").write_bytes(rnd.randbytes(40_000))
        run("sync")
        a, b = mnt / "A", mnt / "B"
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
        (vol / "bin").mkdir()
        exes = _executables()
        assert exes
        for exe in exes:
            shutil.copyfile(exe, vol / "bin" / exe.name)
        bundle = bytearray(pieces[2] + pieces[0] + pieces[1])
        for _ in range(4):
            at = rnd.randrange(len(bundle))
            bundle[at : at + 3] = rnd.randbytes(3)
        (vol / "share" / "bundle-3f2a.dat").write_bytes(bundle)
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
        stream = send(b, tmp_path / "AB.stream", parent=a).read_bytes()

        out: list[bytes] = []
        make_delta(io.BufferedReader(io.BytesIO(stream)), a, out.append,  # type: ignore[arg-type]
                   MakeOptions(carrier="xz", jobs=2))
        delta = b"".join(bytes(p) for p in out)
        assert delta[17:21] == (10).to_bytes(4, "little")

        # oracle 1: the expansion is the kernel's stream, byte for byte
        back: list[bytes] = []
        expand_to(open_delta(io.BytesIO(delta)), a, back.append)
        expanded = b"".join(bytes(p) for p in back)
        assert expanded == stream

        # oracle 2: btrfs receive of the expansion on top of A gives B's tree
        (tmp_path / "AB.expanded").write_bytes(expanded)
        dest = mnt / "dest"
        dest.mkdir()
        kernel_receive(send(a, tmp_path / "A.full"), dest)
        kernel_receive(tmp_path / "AB.expanded", dest)
        assert tree_sum(dest / "B", ignore_root_mtime=True) == tree_sum(
            b, ignore_root_mtime=True)

    # the bundle is one patch against the three old files, one after the other
    several = [p for p in _patches(delta) if p.bases]
    assert len(several) == 1
    assert len(several[0].bases) == 2
    assert several[0].new_size == len(bundle)
    assert several[0].patch_len < 1_000
    # the executables (new, carried) cost less than in xz -9e of the stream (raw LZMA2,
    # same dictionary, no x86 filter), where the bundle is 150 KB of random bytes
    peer = len(lzma.compress(stream, lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 64 << 20}]))
    assert len(delta) < 0.97 * (peer - len(bundle))
