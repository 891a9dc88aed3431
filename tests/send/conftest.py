"""Fixtures for send tests: a loop-mounted btrfs holding plain source trees and receives."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.send import send_stream
from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs
from btrdelta.testing.scenarios import Scenario
from tests.conftest import btrfs_loop, require_btrfs


@dataclass
class Workspace:
    """A btrfs mount: plain directories for source trees, a directory to receive into."""

    mnt: Path

    def fresh(self, tag: str) -> Path:
        d = self.mnt / f"{tag}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d


@pytest.fixture(scope="session")
def btrfs_ws() -> Iterator[Workspace]:
    """One loop-mounted btrfs for the whole session (sources and receive targets)."""
    with btrfs_loop(size="4G") as mnt:
        yield Workspace(mnt)


@pytest.fixture(scope="module")
def fs_pair() -> Iterator[tuple[Path, Path]]:
    """A module's two btrfs for the scenario tests: the source (compress=zstd, as the
    kernel's scenario streams) and the receiver's."""
    require_btrfs()
    with loop_fs("btrfs", size="1G", options="compress=zstd") as src, \
            loop_fs("btrfs", size="1G") as dst:
        yield src, dst


def bash(script: str, cwd: Path) -> None:
    """Run a recipe with bash -euo pipefail in ``cwd``."""
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"recipe failed: {script!r}: {proc.stderr.decode(errors='replace')}")


def build_pair(base: Path, sc: Scenario) -> tuple[Path, Path]:
    """OLD by recipe a, NEW as a reflink copy of OLD changed by recipe b (plain dirs)."""
    old = base / "old"
    new = base / "new"
    old.mkdir()
    bash(sc.a, old)
    subprocess.run(["cp", "-a", "--reflink=auto", str(old), str(new)], check=True)
    for part in sc.b.split("\nREMOUNT\n"):
        bash(part, new)
    # what the btrfs harness unlinks while open: in plain directories, simply gone
    for script, where in ((sc.a_held, old), (sc.b_held, new)):
        if script:
            bash(script, where)
    return old, new


def make_stream(out: Path, new: Path, parent: Path | None = None, **kw: object) -> Path:
    """Write btrdelta's stream of ``new`` (incremental from ``parent``) to ``out``."""
    version = int(kw.pop("version", 1))  # type: ignore[call-overload]
    with open(out, "wb") as f:
        send_stream(f.write, new, parent, version=version, **kw)
    return out


def progs_dump_ok(stream: Path) -> str:
    proc = subprocess.run(
        ["btrfs", "receive", "--dump", "-f", str(stream)], capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode(errors="replace")


@pytest.fixture
def two_fs() -> Iterator[tuple[Path, Path]]:
    """A sender btrfs and a receiver btrfs (fresh for each test)."""
    require_btrfs()
    try:
        with loop_fs("btrfs", size="600M") as snd, loop_fs("btrfs", size="600M") as rcv:
            yield snd, rcv
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


def run(*cmd: str | os.PathLike[str]) -> str:
    """Run a command; its stdout (fails the test with its stderr)."""
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode()


def count_reads(monkeypatch: pytest.MonkeyPatch, dev: int
              ) -> tuple[dict[int, int], dict[int, int]]:
    """Opens and bytes read (``os.pread``) of each regular file of filesystem ``dev``, by
    inode, counted from now until ``monkeypatch.undo()``."""
    opened: dict[int, int] = {}
    read: dict[int, int] = {}
    fds: dict[int, int] = {}
    real_open, real_pread = os.open, os.pread

    def counting_open(path: object, flags: int, *args: object, **kw: object) -> int:
        fd = real_open(path, flags, *args, **kw)  # type: ignore[arg-type]
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_dev == dev:  # not the temporary files
            opened[st.st_ino] = opened.get(st.st_ino, 0) + 1
            fds[fd] = st.st_ino
        else:
            fds.pop(fd, None)  # a number reused
        return fd

    def counting_pread(fd: int, n: int, off: int) -> bytes:
        data = real_pread(fd, n, off)
        if fd in fds:
            read[fds[fd]] = read.get(fds[fd], 0) + len(data)
        return data

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "pread", counting_pread)
    return opened, read
