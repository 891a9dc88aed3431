"""A kernel-made incremental stream with one record's path turned hostile (``..``, an
absolute path, a symlink of the old tree in the path, a symlink as the file), through the
CLI of every engine that applies it: ``receive`` into btrfs and into a plain directory, and
the delta ``delta make`` writes of it received on the old version.

Each must exit non-zero with one error line naming the record and its path, change nothing
outside DEST (the symlinks of the old tree point there) and leave DEST holding the old
version only. tests/receive/test_sandbox_attacks.py crafts whole streams through the API;
here the rest of the stream is the kernel's, so the hostile record comes after real work.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from btrdelta._value import replace
from btrdelta.cli import main
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Chmod, Clone, Event, Link, Rename, Truncate, Write
from btrdelta.stream.writer import write_stream
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.scenarios import kernel_receive, run, send
from tests.conftest import require_btrfs

pytestmark = pytest.mark.btrfs


def _outside_sum(root: Path) -> str:
    h = hashlib.sha256()
    for top, dirs, files in sorted(os.walk(root)):
        for name in sorted(dirs + files):
            p = os.path.join(top, name)
            st = os.lstat(p)
            h.update(f"{p} {st.st_mode} {st.st_size} {st.st_mtime_ns}\n".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                h.update(Path(p).read_bytes())
    return h.hexdigest()


class World:
    def __init__(self, src: Path, dst: Path, plain: Path, outside: Path, tmp: Path) -> None:
        self.src, self.dst, self.plain, self.outside, self.tmp = src, dst, plain, outside, tmp
        self.full = tmp / "A.stream"
        self.incr = tmp / "B.stream"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Snapshots A and B of a subvolume whose A holds symlinks to ``outside`` (absolute,
    relative, to a file there); B rewrites a file, renames, links and clones."""
    require_btrfs()
    tmp = tmp_path_factory.mktemp("hostile")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"S3CRET" * 5000)
    (outside / "victim").write_bytes(b"v" * 100)
    with ExitStack() as stack:
        src = stack.enter_context(loop_fs("btrfs", size="300M"))
        dst = stack.enter_context(loop_fs("btrfs", size="300M"))
        plain = stack.enter_context(loop_fs("ext4", size="64M"))
        vol = src / "vol"
        run("btrfs", "-q", "subvolume", "create", vol)
        (vol / "d").mkdir()
        (vol / "f").write_bytes(os.urandom(50000))
        (vol / "g").write_bytes(b"g" * 9000)
        os.symlink(outside, vol / "sym")
        os.symlink("../" * 12 + str(outside).lstrip("/"), vol / "rel")
        os.symlink(outside / "victim", vol / "fsym")
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, src / "A")
        with open(vol / "f", "r+b") as f:
            f.seek(8192)
            f.write(os.urandom(8192))
        run("cp", "--reflink=always", vol / "g", vol / "d" / "gc")
        os.rename(vol / "g", vol / "d" / "g2")
        os.link(vol / "f", vol / "d" / "fl")
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, src / "B")
        w = World(src, dst, plain, outside, tmp)
        send(src / "A", w.full)
        send(src / "B", w.incr, parent=src / "A")
        yield w


def _first(events: list[Event], kind: type, **match: object) -> int:
    return next(i for i, e in enumerate(events) if isinstance(e, kind)
                and all(getattr(e, k) == v for k, v in match.items()))


def _hostile(events: list[Event], outside: Path) -> Iterator[tuple[str, list[Event]]]:
    """(what, the events with one record changed or inserted)."""
    def at(i: int, rec: Event) -> list[Event]:
        return [*events[:i], rec, *events[i + 1:]]

    w = _first(events, Write, path=b"f")
    for bad in (b"../escape", os.fsencode(outside / "abs"), b"sym/planted", b"rel/planted",
                b"fsym", b"d/../../x"):
        yield f"write to {bad!r}", at(w, replace(events[w], path=bad))
    r = _first(events, Rename)
    for bad in (b"../escape", b"sym/x"):
        yield f"rename to {bad!r}", at(r, replace(events[r], path_to=bad))
    ln = _first(events, Link)
    yield "link in sym/", at(ln, replace(events[ln], path=b"sym/l"))
    yield "link to ../", at(ln, replace(events[ln], path_link=b"../" * 12 + b"etc/passwd"))
    c = _first(events, Clone)
    yield "clone from sym/secret", at(c, replace(events[c], clone_path=b"sym/secret"))
    yield "clone into fsym", at(c, replace(events[c], path=b"fsym"))
    m = _first(events, Chmod)
    yield "chmod of sym/victim", at(m, replace(events[m], path=b"sym/victim"))
    yield "truncate of fsym", [*events[:w], Truncate(path=b"fsym", size=0), *events[w:]]


def _cli(capfd: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """The CLI in this process: its exit code and standard error."""
    capfd.readouterr()
    code = main([str(a) for a in args])
    return code, capfd.readouterr().err


def _refused(result: tuple[int, str], what: str, dest: Path) -> None:
    code, err = result[0], result[1].strip()
    assert code != 0, f"{what}: accepted"
    assert len(err.splitlines()) == 1, f"{what}: {err}"
    assert "Traceback" not in err, f"{what}: {err}"
    # (a receive names the stream file first: "error: h0.stream: record 2 (write), ...")
    assert re.search(r": error: (\S+: )?record \d+ ", err), f"{what}: {err}"
    assert ", path '" in err, f"{what}: {err}"
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["A"], what


def test_hostile_paths_in_a_kernel_stream_are_refused_by_every_engine(
        world: World, capfd: pytest.CaptureFixture[str]) -> None:
    with open(world.incr, "rb") as f:
        events = list(StreamReader(f, source="B").events())
    before = _outside_sum(world.outside)
    for n, (what, changed) in enumerate(_hostile(events, world.outside)):
        stream = world.tmp / f"h{n}.stream"
        with open(stream, "wb") as f:
            write_stream(changed, f.write)
        for kind, root in (("btrfs", world.dst), ("dir", world.plain)):
            dest = root / f"{kind}{n}"
            dest.mkdir()
            if kind == "btrfs":
                kernel_receive(world.full, dest)
            else:
                assert _cli(capfd, "receive", "-q", "-f", world.full, dest)[0] == 0
            _refused(_cli(capfd, "receive", "-q", "-f", stream, dest),
                     f"{what}: receive ({kind})", dest)
        delta = world.tmp / f"h{n}.delta"
        made = _cli(capfd, "delta", "make", "-q", "-f", stream, "--old", world.src / "A",
                    "-o", delta)
        assert made[0] == 0, f"{what}: delta make: {made[1]}"
        dest = world.dst / f"delta{n}"
        dest.mkdir()
        kernel_receive(world.full, dest)
        _refused(_cli(capfd, "receive", "-q", "-f", delta, dest), f"{what}: delta receive",
                 dest)
        assert _outside_sum(world.outside) == before, f"{what}: changed outside DEST"
