"""Interrupted receives leave nothing behind: SIGTERM, SIGHUP and SIGINT remove the
temporary subvolume on the way out; after ``kill -9`` the next receive into the same DEST
removes it, and never the temporary of a receiver still running. Through the CLI, on the
directory backend and on btrfs (oracle: DEST's entries, ``btrfs subvolume list``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.receive.registry import REGISTRY_NAME
from btrdelta.receive.subvolumes import TMP_PREFIX
from btrdelta.stream.records import End, Mkfile, Subvol, Write
from btrdelta.testing.loopfs import loop_fs
from tests.conftest import Children

from .helpers import stream_bytes


def _stream(name: str) -> bytes:
    """4 MiB of data (the receiver reads 1 MiB blocks: held back, the last ones leave it
    waiting with the first applied)."""
    writes = [Write(path=b"f", offset=i << 15, data=b"x" * (1 << 15)) for i in range(128)]
    return stream_bytes([Subvol(path=name.encode(), uuid=uuid.uuid4(), ctransid=7),
                         Mkfile(path=b"f", ino=257), *writes, End()])


def _temps(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith(TMP_PREFIX))


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT and SIGHUP back to their defaults in the child: a test run started in the
    background by a non-interactive shell inherits SIGINT ignored, and one under ``nohup``
    SIGHUP; Python then installs no Ctrl-C handler and the CLI rightly keeps an ignored
    SIGHUP ignored (the receive would ignore the signal sent and end on the closed pipe
    instead)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _started(children: Children, dest: Path,
             name: str) -> tuple[subprocess.Popen[bytes], bytes]:
    """A receive of ``name`` from a pipe, blocked before its END (its temporary made);
    returns it and the bytes still to send. ``children`` kills and reaps it at the end."""
    data = _stream(name)
    before = set(_temps(dest))
    proc = children.start([sys.executable, "-m", "btrdelta", "receive", str(dest)],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=_ctrl_c_as_in_a_terminal)
    assert proc.stdin is not None
    proc.stdin.write(data[: -(1 << 20)])
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while set(_temps(dest)) == before:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the receive made no temporary subvolume"
        time.sleep(0.05)
    return proc, data[-(1 << 20) :]


def _receive(dest: Path, name: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", str(dest)],
                          input=_stream(name), capture_output=True, check=False,
                          timeout=120)  # (run kills and reaps it on the timeout)
    return proc.returncode, proc.stderr.decode()


def _btrfs_subvols(dest: Path) -> list[str]:
    """Names of the subvolumes in ``dest`` (a directory at the top of its filesystem), as
    ``btrfs subvolume list`` shows them."""
    out = subprocess.run(["btrfs", "subvolume", "list", str(dest)], capture_output=True,
                         text=True, check=True).stdout
    paths = [line.split(" path ", 1)[1] for line in out.splitlines()]
    return sorted(p.split("/", 1)[1] for p in paths if p.startswith(f"{dest.name}/"))


@pytest.fixture(scope="module")
def btrfs_mnt() -> Iterator[Path]:
    from tests.conftest import require_btrfs

    require_btrfs()
    with loop_fs("btrfs", size="256M") as mnt:
        yield mnt


@pytest.fixture(params=["dir", pytest.param("btrfs", marks=pytest.mark.btrfs)])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    root = tmp_path if request.param == "dir" else request.getfixturevalue("btrfs_mnt")
    d = root / f"dest-{tmp_path.name}"
    d.mkdir()
    return d


def _listing(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != REGISTRY_NAME)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_removes_the_temporary(dest: Path, sig: signal.Signals,
                                        children: Children) -> None:
    proc, _ = _started(children, dest, "sv")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err  # 143, 129, 130
    assert err.decode().strip() == "btrdelta receive: interrupted"
    assert _listing(dest) == []
    if _is_btrfs(dest):
        assert _btrfs_subvols(dest) == []


def test_kill_9_leftovers_are_swept_not_a_live_receivers(dest: Path,
                                                         children: Children) -> None:
    live, rest = _started(children, dest, "live")
    live_tmp = _temps(dest)
    dead, _ = _started(children, dest, "dead")
    dead.kill()
    dead.communicate()
    left = [t for t in _temps(dest) if t not in live_tmp]
    assert len(left) == 1  # what kill -9 leaves
    code, err = _receive(dest, "next")
    assert code == 0, err
    assert _temps(dest) == live_tmp  # the dead one's gone, the live one's kept
    _, err = live.communicate(rest, timeout=60)
    assert live.returncode == 0, err
    assert _listing(dest) == ["live", "next"]
    if _is_btrfs(dest):
        assert _btrfs_subvols(dest) == ["live", "next"]
    assert (dest / "live" / "f").read_bytes() == b"x" * (4 << 20)


def _is_btrfs(path: Path) -> bool:
    from btrdelta.receive.subvolumes import uses_btrfs

    return uses_btrfs(path)
