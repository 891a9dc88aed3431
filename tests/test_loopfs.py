"""btrdelta.testing.loopfs: a loop filesystem is cleaned up even when Ctrl-C interrupts the
cleanup itself (the signal reaches ``umount`` too), and a retried cleanup never detaches a
loop device that is no longer its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from btrdelta.testing import loopfs
from tests.conftest import btrfs_loop, require_btrfs

pytestmark = pytest.mark.btrfs


def _source(mnt: Path) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True,
                          text=True, check=True).stdout.strip()


def _attached(image: Path) -> bool:
    return str(image) in subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                                        check=True).stdout


def test_cleanup_interrupted_in_umount_is_finished_at_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = subprocess.run

    def ctrl_c_in_umount(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        if cmd[0] == "umount":
            raise KeyboardInterrupt  # umount got the SIGINT too: nothing was unmounted
        return real(cmd, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt), btrfs_loop("256M") as mnt:  # noqa: PT012
        image = mnt.parent / "fs.img"
        assert _attached(image)
        monkeypatch.setattr(subprocess, "run", ctrl_c_in_umount)
    monkeypatch.undo()
    left = [e for e in loopfs._LIVE if e[0] == str(mnt)]
    try:
        assert os.path.ismount(mnt)
        assert left, "the interrupted loop filesystem is no longer registered for atexit"
    finally:  # what the atexit handler does, for this entry only
        for entry in left:
            loopfs._LIVE.remove(entry)
        loopfs._cleanup(str(mnt), _source(mnt) if os.path.ismount(mnt) else "", str(image))
        if os.path.ismount(mnt):  # the test failed: leave nothing behind
            real(["umount", str(mnt)], check=False)
    assert not os.path.ismount(mnt)
    assert not _attached(image)
    assert not mnt.parent.exists()


def test_retried_cleanup_leaves_a_reused_loop_device_alone(tmp_path: Path) -> None:
    with btrfs_loop("256M") as mnt:
        dev = _source(mnt)
        image = mnt.parent / "fs.img"
    # the number is free again: someone else's losetup takes it (here, or another process
    # already did: the check is the same)
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    ours = subprocess.run(["losetup", dev, str(other)], check=False).returncode == 0
    try:
        loopfs._cleanup(str(mnt), dev, str(image))  # the atexit retry of the cleanup above
        assert subprocess.run(["losetup", dev], capture_output=True,
                              check=False).returncode == 0, f"{dev} was detached"
    finally:
        if ours:
            subprocess.run(["losetup", "-d", dev], check=False)


def test_mounted_image_returns_once_the_filesystem_is_gone(tmp_path: Path) -> None:
    require_btrfs()
    image = tmp_path / "device.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True)
    holder: subprocess.Popen[bytes] | None = None
    released = threading.Event()
    try:
        with loopfs.mounted_image(image) as mnt:
            (mnt / "f").write_bytes(b"x" * 100_000)
            # a process copies the mount table (unshare -m, a browser's sandbox) and keeps it
            holder = subprocess.Popen(["unshare", "-m", "sh", "-c", "echo ready; exec sleep 60"],
                                      stdout=subprocess.PIPE)
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"ready\n"
            # it lets the copy go 1 s later (a poll() of its exit once the loop device was
            # gone could come first: the copy goes early in the holder's exit; CI run)
            threading.Timer(1.0, lambda: (released.set(), holder.kill())).start()
        assert released.is_set(), "returned while another namespace held the mount"
        assert not _attached(image)
        assert not os.path.ismount(mnt)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()


def test_a_sigterm_to_the_test_run_unmounts_its_loop_filesystems(tmp_path: Path) -> None:
    """A pytest run killed by SIGTERM while a test holds a loop btrfs (a ``timeout`` of
    the run) tears its fixtures down: the filesystem is unmounted and its loop device
    detached (before tests/conftest.py's handler both were left)."""
    said = tmp_path / "mounted"
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 't'}",
         f"{__file__}::test_holds_a_loop_filesystem_until_killed"],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "LOOPFS_TEST_HOLD": str(said)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while not said.exists() or not said.read_text().endswith("\n"):
            assert child.poll() is None, "the run ended without a loop filesystem"
            assert time.monotonic() < end, "no loop filesystem after 120 s"
            time.sleep(0.1)
        mnt, image = said.read_text().split()
        assert _source(Path(mnt))
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) != 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert subprocess.run(["findmnt", mnt], capture_output=True).returncode != 0
    assert not _attached(Path(image))


def test_holds_a_loop_filesystem_until_killed() -> None:
    """(The run the test above kills; skipped in any other run.)"""
    said = os.environ.get("LOOPFS_TEST_HOLD")
    if not said:
        pytest.skip("run by test_a_sigterm_to_the_test_run_unmounts_its_loop_filesystems")
    with btrfs_loop("256M") as mnt:
        image = next(line.split("(")[-1].rstrip(")") for line in subprocess.run(
            ["losetup", "-a"], capture_output=True, text=True, check=True).stdout.splitlines()
            if line.startswith(_source(mnt) + ":"))
        Path(said).write_text(f"{mnt} {image}\n")
        time.sleep(300)


def test_an_image_stays_off_a_tmpfs_tmp() -> None:
    """On Debian 13 /tmp is a tmpfs in RAM (half of it): a loop filesystem whose caller
    names no directory keeps its image on the disk, and writing more than /tmp holds works
    (with the image in /tmp the writes failed once the tmpfs was full; the send tests'
    4G btrfs filled a 4 GiB /tmp, session 33). Here /tmp is a 64 MiB tmpfs of a mount
    namespace of the child's own; btrfs scrub reads the 160 MiB back from the device."""
    require_btrfs()
    script = textwrap.dedent("""
        import os, subprocess, sys
        from btrdelta.testing.loopfs import loop_fs
        with loop_fs("btrfs", size="512M") as mnt:
            with open(mnt / "data", "wb") as f:
                for _ in range(40):
                    f.write(os.urandom(4 << 20))
                f.flush()
                os.fsync(f.fileno())
            subprocess.run(["btrfs", "scrub", "start", "-Bq", str(mnt)], check=True)
            print(subprocess.run(["stat", "-f", "-c", "%T", str(mnt.parent)], check=True,
                                 capture_output=True, text=True).stdout.strip())
    """)
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         'mount -t tmpfs -o size=64m tmpfs /tmp && exec "$0" -c "$1"', sys.executable, script],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split(), proc.stdout
    assert proc.stdout.split()[-1] != "tmpfs", proc.stdout
