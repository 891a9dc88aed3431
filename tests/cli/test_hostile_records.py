"""Streams whose framing is right and whose values are hostile, through every command that
reads a stream.

tests/cli/test_mutations.py damages real streams byte by byte; here each stream is written
by the codec (every CRC32C right) from records drawn at random: the commands a receiver
applies (create, rename, link, unlink, rmdir, xattrs, write, clone, truncate, chmod, chown,
utimes, fallocate, fileattr, verity, encoded writes in version 2) on names of the tree and,
one time in seven, hostile ones ('', '.', '..', '../x', '/etc/x', 'a/..', a NUL, 300- and
4096-byte names, through a symlink pointing out of DEST), with values of every size (0, a
block, 2^31-1, 2^32, 2^63-1, 2^64-1...). A full stream, and an incremental one onto a
received parent (renames, unlinks and writes of what the parent holds).

Each goes through `dump`, `stat`, `verify`, `receive` into a directory, `delta make` (the
parent as the old tree), `delta expand` of the delta it made and `receive` of that delta.
Every run ends with an exit code of the table and at most one error line (exactly one on
failure), no traceback; nothing outside DEST changes (the tree the stream's symlinks point
to); a receive that fails leaves nothing under a final name and the parent as it was; a
delta that `delta make` wrote expands to the stream byte for byte; a receive of the delta
ends as the receive of the stream did (both exit 0 with the same tree-sum, or both fail).

``BTRDELTA_MUTATIONS=N`` runs N streams of each kind (default 24; `make fuzz` 1,000).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.stream import records as R
from btrdelta.stream import write_stream
from btrdelta.stream.constants import COMMAND_SPECS
from btrdelta.stream.reader import Event
from btrdelta.tree.treesum import Entry, tree_manifest
from tests.cli.test_mutations import N, run, snapshot, visible
from tests.conftest import progs_dump

BASE, NEW = uuid.UUID(int=0xB), uuid.UUID(int=0xC)
HOSTILE = [b"", b".", b"..", b"../x", b"/etc/x", b"a/..", b"d/../../x", b"a\0b", b"x" * 300,
           b"/".join([b"y"] * 2048)[:4096], b"l/x", b"o/passwd", b"d/.", b"a/", b"//a"]
NAMES = [b"a", b"b", b"d", b"d/e", b"d/e/f", b"n0", b"n1", b"n1/y", b"d/n", b"d/e/g", b"l", b"o"]
SIZES = [0, 1, 4095, 4096, 1 << 20, (1 << 31) - 1, 1 << 32, 1 << 40, (1 << 63) - 1,
         (1 << 64) - 1]
XATTRS = [b"user.x", b"", b"x", b"security.capability", b"trusted.a", b"user." + b"n" * 300,
          b"system.posix_acl_access", b"btrfs.compression"]


def _base(outside: Path) -> list[Event]:
    """The parent: files with data, a directory tree, symlinks out of DEST."""
    return [R.Subvol(b"base", BASE, 7), R.Mkdir(b"d", 300), R.Mkfile(b"a", 301),
            R.Write(b"a", 0, b"A" * 5000), R.Mkfile(b"b", 305), R.Write(b"b", 0, b"B" * 9000),
            R.Mkdir(b"d/e", 302), R.Mkfile(b"d/e/f", 306), R.Write(b"d/e/f", 0, b"F" * 7000),
            R.Symlink(b"l", 303, b"../../outside"), R.Symlink(b"o", 304, os.fsencode(outside)),
            R.End()]


def _record(rng: random.Random, version: int) -> R.Record:
    def path() -> bytes:
        return rng.choice(HOSTILE) if rng.random() < 1 / 7 else rng.choice(NAMES)

    def num() -> int:
        return rng.choice(SIZES) if rng.random() < .5 else rng.randrange(10000)

    p, k = path(), rng.randrange(23)
    make: list[R.Record] = [
        R.Mkfile(p, num()), R.Mkdir(p, num()), R.Rename(p, path()), R.Link(p, path()),
        R.Symlink(p, num(), rng.choice([b"..", b"/", b"../outside", b"d", b"o/passwd"])),
        R.Unlink(p), R.Rmdir(p), R.SetXattr(p, rng.choice(XATTRS), rng.randbytes(
            rng.choice([0, 3, 100, 60000]))), R.RemoveXattr(p, rng.choice(XATTRS)),
        R.Write(p, num(), rng.randbytes(rng.choice([0, 1, 100, 5000]))),
        R.Clone(num(), num(), p, rng.choice([BASE, NEW]), 7, path(), num()),
        R.Truncate(p, num()), R.Chmod(p, num()), R.Chown(p, num(), num()),
        R.Utimes(p, num(), num(), num()),
        R.Mknod(p, num(), num(), rng.choice([0o20644, 0o60644, 0o100644, 0o40755, num()])),
        R.Mkfifo(p, num(), 0, 0o10644), R.Mksock(p, num(), 0, 0o140644),
        R.Fallocate(p, rng.choice([0, 1, 2, 3, 0x10, 0xFFFFFFFF]), num(), num()),
        R.Fileattr(p, num()), R.UpdateExtent(p, num(), num()),
        R.EnableVerity(p, rng.choice([1, 2, 255]), rng.choice([0, 1, 4096, 0xFFFFFFFF]),
                       b"s", b"")]
    if k < len(make):
        rec = make[k]
    else:
        rec = R.EncodedWrite(p, num(), num(), num(), num(), rng.randrange(8), rng.choice(
            [b"", rng.randbytes(50), bytes(4096), b"\x28\xb5\x2f\xfd" + rng.randbytes(20)]),
            rng.choice([None, 0, 1]))
    return rec if COMMAND_SPECS[rec.cmd].version <= version else R.Unlink(p)


def _as_progs_62(text: bytes) -> bytes:
    """``text`` with each clone's length as 32 bits and each fallocate's mode as a signed
    32-bit integer, as progs 6.2 prints them (len=0 for 2^32, mode=-1 for 2^32-1: the
    kernel clones an extent at a time, at most 128 MiB, and its modes are 0 to 3)."""
    text = re.sub(rb"^(clone .* len=)(\d+) ",
                  lambda m: m[1] + b"%d " % (int(m[2]) & 0xFFFFFFFF), text, flags=re.M)
    return re.sub(rb"^(fallocate .* mode=)(\d+) ",
                  lambda m: m[1] + b"%d " % (int(m[2]) - (int(m[2]) >> 31 << 32)), text,
                  flags=re.M)


def _dumped_as_progs(capfd: pytest.CaptureFixture[str], f: Path, what: str) -> None:
    """`dump` prints what `btrfs receive --dump` prints, and fails where it fails (a path
    too long to print) after the same lines, naming the record."""
    progs = progs_dump(f)
    capfd.readouterr()
    out = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    with contextlib.redirect_stdout(out):
        code = main(["dump", str(f)])
    out.flush()
    err = capfd.readouterr().err
    got = _as_progs_62(out.buffer.getvalue())  # type: ignore[attr-defined]
    progs.stdout = _as_progs_62(progs.stdout)
    if code == 0 or progs.returncode:
        assert (code, got) == (0, progs.stdout) if code == 0 else got == progs.stdout, what
    else:  # (progs 6.2 prints a symlink's target alone on a line of its own and goes on)
        assert progs.stdout.startswith(got), what
    if code:
        assert code == 3, err
        assert err.count("\n") == 1, err
        assert ": error: record " in err, err


def _tree(root: Path) -> list[Entry]:
    """The tree-sum-3 manifest of ``root`` without times (a receive sets those the stream
    does not when it runs; a sparse file's zero blocks are hashed by their count)."""
    return [dataclasses.replace(e, mtime_ns=None) for e in tree_manifest(root, version=3)]


def _held(dest: Path) -> dict[str, bytes | None]:
    """What ``dest`` shows (its hidden files aside: the registry, a receive's own)."""
    return {k: v for k, v in snapshot(dest).items() if not k.startswith(".")}


def _stream(events: list[Event], version: int) -> bytes:
    out = io.BytesIO()
    write_stream([R.StreamHeader(version), *events], out.write, version)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_hostile_records(kind: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
                         ) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root:x:0:0\n")
    os.symlink("passwd", outside / "link")
    work = tmp_path / "w"
    work.mkdir()
    base = work / "base.stream"
    base.write_bytes(_stream(_base(outside), 1))
    f, delta, back = work / "in.stream", work / "in.delta", work / "back.stream"
    dest, again, old = work / "dest", work / "again", work / "old"
    old.mkdir()
    (work / "empty").mkdir()
    older = again / "base" if kind == "incremental" else work / "empty"  # (delta make's)
    if kind == "incremental":
        assert run(capfd, ["receive", "-q", "-f", str(base), str(old)], "base") == 0
    held = visible(old)
    before = snapshot(outside), _held(old)
    for i in range(N):
        rng = random.Random(f"{kind}-{i}")
        version = 1 + i % 2
        first: list[Event] = (
            [R.Snapshot(b"new", NEW, 9, BASE, 7)] if kind == "incremental"
            else _base(outside)[:-1])
        events = [*first, *(_record(rng, version) for _ in range(rng.randrange(1, 14))),
                  R.End()]
        what = f"{kind} {i}: {events[len(first):-1]}"[:2000]
        f.write_bytes(_stream(events, version))
        for argv in (["stat"], ["verify"], ["dump", "--json"]):
            assert run(capfd, [*argv, str(f)], what) == 0, what
        _dumped_as_progs(capfd, f, what)
        results = []
        for stream in (f, delta):
            for d in (dest, again):
                shutil.rmtree(d, ignore_errors=True)
                shutil.copytree(old, d, symlinks=True)
            code = run(capfd, ["receive", "-q", "-f", str(stream), str(dest)], what)
            if code:
                assert visible(dest) == held, f"{what}: {visible(dest)}"
                assert _held(dest) == before[1], f"{what}: the parent changed"
            results.append(_tree(dest / ("new" if kind == "incremental" else "base"))
                           if code == 0 else None)
            assert snapshot(outside) == before[0], f"{what}: {stream.name} changed outside"
            if stream == delta:
                break
            made = run(capfd, ["delta", "make", "-q", "-f", str(f), "--old",
                               str(older), "-o", str(delta)], what)
            if made:
                assert not delta.exists(), what
                break
            assert run(capfd, ["delta", "expand", "-q", "-f", str(delta), "--old",
                               str(older), "-o", str(back)], what) == 0, what
            assert back.read_bytes() == f.read_bytes(), f"{what}: expanded another stream"
        if len(results) == 2:
            assert results[0] == results[1], f"{what}: the delta received another tree"
        assert snapshot(outside) == before[0], what
        for p in (delta, back):
            p.unlink(missing_ok=True)
        assert sorted(os.listdir(work)) == ["again", "base.stream", "dest", "empty",
                                            "in.stream", "old"], what
