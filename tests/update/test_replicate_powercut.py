"""`replicate` with a power cut, on the host, at each step of the commit: on the receiver
(DEST on btrfs, and on ext4: the directory backend), then on the sender (its sendshot store
and source on the cut disk, the receiver alive).

The cut disk is a filesystem image inside a loop-mounted btrfs. The process stops itself at
the step (SIGSTOP: the shim of `test_replicate_kill`), the image is cloned at that instant
(FICLONE: what the disk holds then, not what is still in memory), the process is killed,
and the clone is mounted in the image's place, its log replayed: the machine after the
restart (a receiver also gets another boot id). The next run completes: the new tree held
once, equal to the source (tree-sum), the old one intact, nothing left over, the cursor on
the committed sendshot; a change after it goes as an incremental from it.

Before session 15 a receiver cut right after its COMMITTED came back without the new
subvolume (its name and data were still in memory) while the sender's cursor had moved to
it and prune had deleted the base: the next run was refused `no-common-base`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.errors import TransportError
from btrdelta.send.store import SendshotStore
from btrdelta.testing.loopfs import forget_counters, run
from btrdelta.tree import tree_sum
from btrdelta.update.channels import spawn_local
from btrdelta.update.replicate import replicate
from tests.update.test_replicate_kill import SEG, _completes, _visible, shim

__all__ = ["shim"]  # (the fixture, used by name)

pytestmark = pytest.mark.btrfs

FICLONE = 0x40049409
#: another boot's id, for the receivers after the restart
OTHER_BOOT = "00000000-0000-4000-8000-000000000000"


class _Disk:
    """A filesystem image in a loop-mounted btrfs, mounted at ``mnt``; :meth:`cut` puts
    the image as it is at that instant in its place."""

    def __init__(self, top: Path, fstype: str) -> None:
        self.image, self.mnt = top / f"{fstype}.img", top / "mnt"
        with open(self.image, "wb") as f:
            f.truncate(600 << 20)
        run(f"mkfs.{fstype}", "-q", "-f" if fstype == "btrfs" else "-F", self.image)
        self.mnt.mkdir()
        self.mounted: Path | None = None
        self._mount(self.image)

    def _mount(self, image: Path) -> None:
        run("mount", "-o", "loop", image, self.mnt)
        self.mounted = image

    def unmount(self) -> None:
        if self.mounted is None:
            return
        run("umount", self.mnt)
        image, self.mounted = self.mounted, None
        deadline = time.monotonic() + 60
        while run("losetup", "-n", "-O", "NAME", "-j", image).strip():
            assert time.monotonic() < deadline, f"{image} still attached"
            time.sleep(0.05)

    def cut(self, pid: int) -> None:
        """The power goes while process ``pid`` is stopped at its step: the disk as it is
        now (the clone) replaces the image, once ``pid`` is killed; tmpfs (its record
        counters) is gone."""
        _wait_stopped(pid)
        cut = self.image.with_suffix(".cut")
        with open(self.image, "rb") as src, open(cut, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        os.kill(pid, signal.SIGKILL)
        forget_counters(self.mnt)

    def restart(self) -> None:
        """Mount the disk as the cut left it (after the killed process is gone)."""
        self.unmount()
        self._mount(self.image.with_suffix(".cut"))


def _wait_stopped(pid: int) -> None:
    """Until ``pid`` is stopped (it stops itself at the step: a state, not a delay)."""
    deadline = time.monotonic() + 120
    while True:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert state != "Z", f"process {pid} ended before its step"
        assert time.monotonic() < deadline, f"process {pid} never reached its step"
        time.sleep(0.01)


@contextlib.contextmanager
def _disk(fstype: str) -> Iterator[_Disk]:
    from tests.conftest import btrfs_loop

    with btrfs_loop("2G") as top:
        disk = _Disk(top, fstype)
        try:
            yield disk
        finally:
            disk.unmount()


def _trees(src: Path) -> None:
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"s{i}").write_bytes(os.urandom(i * 301))
    (src / "big").write_bytes(os.urandom(2 * SEG))


def _change(src: Path) -> None:
    (src / "big2").write_bytes(os.urandom(int(1.5 * SEG)))
    (src / "d" / "s3").write_bytes(b"changed" * 100)
    os.unlink(src / "d" / "s4")


#: the receiver's steps: a segment acknowledged mid-stream; END acknowledged, DEST being
#: written out while it seals; written out, the state not yet naming the sendshot; the
#: final name given, not yet written out; written out, COMMITTED not sent; COMMITTED sent
RECEIVER_CUTS = ["meta.json:3:after", "write-out:1:before", ".btrdelta-replica.json:1:before",
                 "write-out:2:before", "write-out:2:after", "COMMITTED:1:after"]


def _first_round(src: Path, dest: Path, store: SendshotStore) -> str:
    """The source's trees made and replicated once; the tree-sum of what DEST holds."""
    _trees(src)
    ch = spawn_local(str(dest))
    assert replicate(src, ch, store=store, segment=SEG).outcome == "committed"
    ch.close()
    [old] = _visible(dest)
    return tree_sum(dest / old)


@pytest.mark.parametrize("fstype", ["btrfs", "ext4"])
@pytest.mark.parametrize("point", RECEIVER_CUTS)
def test_a_power_cut_on_the_receiver(tmp_path: Path, shim: Path,
                                     monkeypatch: pytest.MonkeyPatch, fstype: str,
                                     point: str) -> None:
    with _disk(fstype) as disk:
        dest = disk.mnt / "dest"
        dest.mkdir()
        src, store = tmp_path / "src", SendshotStore(tmp_path / "store")
        old_sum = _first_round(src, dest, store)
        os.sync()  # (the first state is old news when the power goes)
        _change(src)
        monkeypatch.setenv("BTRDELTA_TEST_KILL_AT", point)
        monkeypatch.setenv("BTRDELTA_TEST_CUT", "stop")
        ch = spawn_local(str(dest))
        got: list[object] = []

        def send() -> None:
            try:
                got.append(replicate(src, ch, store=store, segment=SEG))
            except TransportError as exc:
                got.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        assert ch.proc is not None
        disk.cut(ch.proc.pid)
        sender.join(60)
        ch.close()
        heard = point.startswith("COMMITTED")
        assert isinstance(got[0], TransportError) != heard, got
        monkeypatch.delenv("BTRDELTA_TEST_CUT")
        monkeypatch.setenv("BTRDELTA_TEST_BOOT_ID", OTHER_BOOT)
        disk.restart()
        res = _completes(src, dest, store, old_sum)
        if point in ("meta.json:3:after", "write-out:1:before"):  # not on the disk yet
            assert (res.kind, res.resumed_from) == ("incremental", 0), res  # type: ignore[attr-defined]
        elif point == ".btrdelta-replica.json:1:before":  # complete, written out
            assert (res.kind, res.sent) == ("resume", 0), res  # type: ignore[attr-defined]
        elif point != "write-out:2:before":  # (the final name there, or not yet)
            assert res.message.startswith("already-current"), res  # type: ignore[attr-defined]


#: the sender's steps: the sendshot named in the cursor before the COMMIT; the COMMIT sent;
#: COMMITTED read, the cursor not yet moved
SENDER_CUTS = ["cursors.json:2:after", "COMMIT:1:after", "cursors.json:3:before"]


@pytest.mark.parametrize("point", SENDER_CUTS)
def test_a_power_cut_on_the_sender(tmp_path: Path, shim: Path, point: str) -> None:
    with _disk("btrfs") as disk:
        src, store = disk.mnt / "src", SendshotStore(disk.mnt / "store")
        dest = tmp_path / "dest"
        dest.mkdir()
        old_sum = _first_round(src, dest, store)
        _change(src)
        os.sync()  # (the source's change is old news when the power goes)
        env = {**os.environ, "BTRDELTA_TEST_KILL_AT": point, "BTRDELTA_TEST_CUT": "stop"}
        proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "replicate", str(src),
                                 str(dest), "--store", store.path, "--segment", str(SEG),
                                 "-q"], env=env, stderr=subprocess.PIPE, text=True)
        disk.cut(proc.pid)
        proc.communicate(timeout=60)
        # the receiver (a fork of the sender) goes on alone: its lock is free once its
        # conversation is over
        fd = os.open(dest / ".btrdelta-replica.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)
        disk.restart()
        _completes(src, dest, store, old_sum)
