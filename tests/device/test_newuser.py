"""A device maker's first hour, through the CLI, on loop-mounted btrfs with the real Debian
releases: each test is a step that went wrong or said too little (found by walking through
docs/device.md and ``--help`` as a new user), with the oracle the user has: exit codes, one
line on stderr, ``btrdelta tree-sum``, ``device status``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.device.boot import select_root
from btrdelta.device.layout import Layout
from btrdelta.device.state import load_state, save_state
from btrdelta.tree import tree_sum
from tests.conftest import btrfs_loop

from .conftest import Release, btrdelta, copy_tree

pytestmark = pytest.mark.btrfs
STATE = ["etc:/etc:overlay", "home:/home:bind"]


def test_restore_after_a_directory_was_removed(btrfs_dev: Path,
                                                small_release: Release,
                                                tmp_path: Path) -> None:
    """The kernel renames a removed directory to an orphan of the subvolume's root first
    and sends no utimes of the root after it (the root itself did not change): the restore
    left the root's mtime at the receive's time and failed its own check (exit 5) after
    this most ordinary of changes."""
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "apt")
    (home / "notes").write_text("one\n")
    dest = tmp_path / "backups"
    btrdelta("device", "backup", btrfs_dev, "home", dest)
    shutil.rmtree(home / "apt/methods")  # not at the top: the root's mtime stays
    (home / "notes").write_text("two\n")
    out = btrdelta("device", "backup", btrfs_dev, "home", dest).stdout
    assert "home.2.delta" in out
    want = tree_sum(home)
    (home / "notes").write_text("three: lost by the restore\n")
    got = btrdelta("device", "restore", btrfs_dev, "home", dest, check=False)
    assert got.returncode == 0, got.stderr
    assert tree_sum(home) == want
    (tmp_path / "dir").mkdir()
    got = btrdelta("device", "restore", tmp_path / "dir", "home", dest, "--to-dir",
                   check=False)
    assert got.returncode == 0, got.stderr
    assert tree_sum(tmp_path / "dir/home.2") == want


def test_backup_and_restore_mistakes_name_what_was_given(btrfs_dev: Path,
                                                        small_release: Release,
                                                        tmp_path: Path) -> None:
    """A mistyped SRC was created (empty) and answered 'no backups to restore'; a backup
    number not there 'backup 7 is missing from the index' (which?); a plain directory
    without --to-dir 'is not on btrfs'; a file as DEST 'File exists'. Each is one line
    naming what the user gave, and nothing is made."""
    device.init(btrfs_dev, small_release.old, state=STATE)
    (btrfs_dev / "state/home/notes").write_text("one\n")
    dest = tmp_path / "backups"
    btrdelta("device", "backup", btrfs_dev, "home", dest)
    plain = tmp_path / "plain"
    plain.mkdir()
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    index = dest / "home.backups.json"
    for argv, code, said in (
        (["restore", btrfs_dev, "home", tmp_path / "typo"], 1, f"{tmp_path / 'typo'}: no such "
         "directory"),
        (["restore", btrfs_dev, "hom", dest, "--as", "home"], 1,
         f"{dest / 'hom.backups.json'}: no such backup index"),
        (["restore", btrfs_dev, "home", dest, "--upto", "7"], 1, f"{index}: no backup 7 (it "
         "lists 1)"),
        (["restore", plain, "home", dest], 1, f"{plain} is not on btrfs: a device's state "
         "subvolume is restored (into a plain directory: --to-dir)"),
        (["backup", btrfs_dev, "home", afile], 1, f"{afile} is not a directory"),
    ):
        proc = btrdelta("device", *argv, check=False)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert said in proc.stderr, proc.stderr
    assert not (tmp_path / "typo").exists()
    assert os.listdir(plain) == []
    assert afile.read_bytes() == b"x"


def test_restore_to_dir_leaves_the_restored_tree_only(btrfs_dev: Path,
                                                      small_release: Release,
                                                      tmp_path: Path) -> None:
    """--to-dir left every backup of the chain (home.1, a whole copy on ext4, next to the
    home.2 asked for), and a failed restore left what it had received."""
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "apt")
    dest = tmp_path / "backups"
    btrdelta("device", "backup", btrfs_dev, "home", dest)
    (home / "notes").write_text("two\n")
    btrdelta("device", "backup", btrfs_dev, "home", dest)
    for where in (tmp_path / "dir", btrfs_dev / "restored"):  # a directory; btrfs
        where.mkdir()
        out = btrdelta("device", "restore", where, "home", dest, "--to-dir").stdout
        assert out == f"restored home to {where / 'home.2'}\n"
        assert _listing(where) == ["home.2"]
        assert tree_sum(where / "home.2") == tree_sum(home)
    index = dest / "home.backups.json"
    doc = json.loads(index.read_text())
    doc["backups"][-1]["tree_sum"] = "0" * 64  # the check fails
    index.write_text(json.dumps(doc))
    (tmp_path / "again").mkdir()
    got = btrdelta("device", "restore", tmp_path / "again", "home", dest, "--to-dir",
                   check=False)
    assert got.returncode == 5
    assert _listing(tmp_path / "again") == []


def _listing(where: Path) -> list[str]:
    """What a directory holds, but the receiver's registry of a plain directory."""
    return sorted(e for e in os.listdir(where) if e != ".btrdelta-subvols.json")


def test_mistakes_get_one_line_naming_what_the_user_gave(small_release: Release,
                                                         tmp_path: Path) -> None:
    """An ext4 image: mount's own last line was all ("dmesg(1) may have more information
    after failed mount system call"); an image not initialised, and status's
    "filesystem", named the private mount directory (/tmp/btrdelta-device-XXXX)."""
    ext4 = tmp_path / "ext4.img"
    with open(ext4, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(ext4)], check=True)
    got = btrdelta("device", "init", ext4, "--factory", small_release.full, check=False)
    assert got.returncode == 1
    assert got.stderr.splitlines() == [
        f"btrdelta device init: error: {ext4} is not a btrfs filesystem (it holds ext4): a "
        "device's filesystem is made with mkfs.btrfs, then laid out with btrdelta device init"]
    img = tmp_path / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    for cmd in (("status",), ("install", small_release.delta), ("mark-good",)):
        got = btrdelta("device", cmd[0], img, *cmd[1:], check=False)
        assert got.returncode == 1
        assert got.stderr.splitlines() == [
            f"btrdelta device {cmd[0]}: error: {img}: not a btrdelta device (run `btrdelta "
            "device init` first)"]
    btrdelta("device", "init", img, "--factory", small_release.full, "--state",
             "etc:/etc", "-q")
    status = json.loads(btrdelta("device", "status", img, "--json").stdout)
    assert status["filesystem"] == str(img)
    assert "btrdelta-device-" not in json.dumps(status)


def test_a_delta_for_a_root_the_device_lacks(btrfs_dev: Path, small_release: Release,
                                             tmp_path: Path) -> None:
    """The error named the private staging name or mount directory and a UUID, not what
    the device holds nor what to do."""
    r = small_release
    btrdelta("send", "--parent", r.new, r.old, "-o", tmp_path / "back.stream")
    btrdelta("device", "init", btrfs_dev, "--factory", r.old, "--state", "etc:/etc", "-q")
    back = tmp_path / "back.stream"
    got = btrdelta("device", "install", btrfs_dev, back, check=False)  # new -> old
    assert got.returncode == 6
    [line] = got.stderr.splitlines()
    assert line.startswith(f"btrdelta device install: error: {back}: made against a root "
                           "this device does not hold (parent subvolume ")
    assert line.endswith("); its roots: a old, b old, factory old. Install a full stream, "
                         "or a delta or incremental stream made against one of them")
    assert json.loads(btrdelta("device", "status", btrfs_dev, "--json").stdout)[
        "next_boot"] == "a"
    btrdelta("device", "install", btrfs_dev, r.delta)  # old -> new: b
    btrdelta("device", "install", btrfs_dev, back)  # new (b) -> old: b again
    assert tree_sum(btrfs_dev / "roots/b") == r.old_sum


def test_disk_full_before_the_install_keeps_the_pending_trial(small_release: Release) -> None:
    """On a full disk the install cancelled the pending trial of the slot it meant to
    rebuild, then failed to write its intent: exit 1, "No space left on device" and the
    release installed before lost its boot."""
    r = small_release
    with btrfs_loop(size="256M") as dev:
        btrdelta("device", "init", dev, "--factory", r.old, "--state", "home:/home:bind",
                 "-q")
        btrdelta("device", "install", dev, r.delta, "-q")
        with open(dev / "state/home/fill", "wb") as f, contextlib.suppress(OSError):
            block = os.urandom(1 << 20)
            while True:
                f.write(block)
                f.flush()
        got = btrdelta("device", "install", dev, r.delta, check=False)
        assert got.returncode == 8, got.stderr
        [line] = got.stderr.splitlines()
        assert "disk full" in line
        status = json.loads(btrdelta("device", "status", dev, "--json").stdout)
        assert (status["next_boot"], status["trial"]["tries_left"]) == ("b", 3)
        assert tree_sum(dev / "roots/b") == r.new_sum
        (dev / "state/home/fill").unlink()
        btrdelta("device", "install", dev, r.delta)
        assert tree_sum(dev / "roots/b") == r.new_sum


def test_mount_says_which_state_it_could_not_mount(btrfs_dev: Path, small_release: Release,
                                                  tmp_path: Path) -> None:
    """A state subvolume whose path the root lacks (here /srv/data) was left out without a
    word: `mounted root a on T; overlay /etc`, and writes there hit the read-only root."""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "-q",
             "--state", "etc:/etc:overlay", "--state", "data:/srv/data:bind")
    target = tmp_path / "sysroot"
    target.mkdir()
    try:
        made = btrdelta("device", "mount", btrfs_dev, target)
        assert made.stdout.startswith(f"mounted root a on {target}; overlay /etc (undo")
        assert made.stderr.splitlines() == [
            "btrdelta device mount: warning: not mounted: /srv/data (root a has no such "
            "directory; the release should create it)"]
        subprocess.run(["umount", "-R", str(target)], check=True)
        doc = json.loads(btrdelta("device", "mount", btrfs_dev, target, "--json").stdout)
        assert doc["mounts"] == [{"mode": "overlay", "path": "/etc"}]
        assert doc["skipped"] == ["/srv/data"]
    finally:
        while os.path.ismount(target):
            subprocess.run(["umount", "-R", str(target)], check=True)


def test_mount_twice_is_refused(btrfs_dev: Path, small_release: Release,
                                tmp_path: Path) -> None:
    """A second ``device mount`` on the same target stacked a second root with its
    overlays over the first (exit 0); --help says TARGET is an empty directory."""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "-q")
    target = tmp_path / "sysroot"
    target.mkdir()
    try:
        made = btrdelta("device", "mount", btrfs_dev, target)
        # how to undo it, said where it was done (was: nowhere, in the output, --help or
        # docs/device.md)
        assert made.stdout.rstrip().endswith(f" (undo: umount -R {target})")
        got = btrdelta("device", "mount", btrfs_dev, target, check=False)
        assert got.returncode == 1
        assert got.stderr.splitlines() == [
            f"btrdelta device mount: error: {target} is a mount point already (umount -R "
            f"{target} first)"]
    finally:
        while os.path.ismount(target):  # twice when the second mount was stacked
            subprocess.run(["umount", "-R", str(target)], check=True)
    (target / "file").write_text("x")
    got = btrdelta("device", "mount", btrfs_dev, target, check=False)
    assert got.returncode == 1
    assert "is not empty" in got.stderr


def test_status_says_a_trial_ran_out(btrfs_dev: Path, small_release: Release) -> None:
    """A release booted on trial and never marked good: status said "trial: b, 0 tries
    left, 3 boots made" and nothing of what it means or what to do."""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "-q")
    btrdelta("device", "install", btrfs_dev, small_release.delta, "-q")
    layout = Layout(btrfs_dev)
    boots = [select_root(layout)[0] for _ in range(4)]  # the initramfs, four boots
    assert boots == ["b", "b", "b", "a"]
    out = btrdelta("device", "status", btrfs_dev).stdout.splitlines()
    assert out[:2] == [
        "default: a   booted: ?   next boot: a",
        "trial: b ended after 3 boots, never marked good: the default boots; the next "
        "install rebuilds b (mark-bad --slot b records the verdict)"]
    btrdelta("device", "mark-bad", btrfs_dev, "--slot", "b")
    out = btrdelta("device", "status", btrfs_dev).stdout.splitlines()
    assert out[1] == ("trial: b ended after 3 boots, marked bad: the default boots; the next "
                      "install rebuilds b")


def test_init_force_lays_out_a_device_anew(btrfs_dev: Path, small_release: Release) -> None:
    """`device init --force` on a device failed with 'error: Operation not permitted' and
    nothing else: btrfs refuses to delete the default subvolume (a root), and the state
    file was already gone, so the device was no device and every re-run failed the same.
    It lays the device out anew now: the factory release in every root, a fresh state."""
    r = small_release
    btrdelta("device", "init", btrfs_dev, "--factory", r.old, "-q")
    btrdelta("device", "install", btrfs_dev, r.delta, "-q")
    btrdelta("device", "mark-good", btrfs_dev, "--slot", "b", "-q")  # the default: roots/b
    (btrfs_dev / "state/etc/upper").mkdir(parents=True, exist_ok=True)
    (btrfs_dev / "state/etc/upper/hostname").write_text("device-1\n")
    got = btrdelta("device", "init", btrfs_dev, "--factory", r.new, "--force", "--json")
    st = json.loads(got.stdout)
    assert st["default"] == "a"
    assert {st["roots"][n]["tree_sum"] for n in ("a", "b", "factory")} == {r.new_sum}
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    assert not (btrfs_dev / "state/etc/upper/hostname").exists()
    assert device.status(btrfs_dev)["next_boot"] == "a"


def test_verdicts_and_rollback_say_what_they_did(btrfs_dev: Path,
                                                 small_release: Release) -> None:
    """mark-good, mark-bad and rollback printed only the status, with no line on what
    they did; mark-bad without --slot, where / does not tell the booted root, refused a
    trial whose tries ran out ("cannot tell which root is booted here"), though status
    says the trial ended never marked good and docs/device.md that mark-bad records the
    verdict (mark-good still refuses to guess it)."""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "-q")
    btrdelta("device", "install", btrfs_dev, small_release.delta, "-q")
    layout = Layout(btrfs_dev)
    assert [select_root(layout)[0] for _ in range(4)] == ["b", "b", "b", "a"]
    got = btrdelta("device", "mark-good", btrfs_dev, check=False)
    assert got.returncode == 1
    assert "cannot tell which root is booted here: name it with --slot" in got.stderr
    out = btrdelta("device", "mark-bad", btrfs_dev).stdout.splitlines()
    assert out[:3] == [
        "marked b bad; next boot: a",
        "default: a   booted: ?   next boot: a",
        "trial: b ended after 3 boots, marked bad: the default boots; the next install "
        "rebuilds b"]
    btrdelta("device", "install", btrfs_dev, small_release.delta, "-q")
    out = btrdelta("device", "rollback", btrfs_dev).stdout.splitlines()
    assert out[:2] == ["rolled back: the trial of b cancelled; next boot: a",
                       "default: a   booted: ?   next boot: a"]
    btrdelta("device", "install", btrfs_dev, small_release.delta, "-q")
    out = btrdelta("device", "mark-good", btrfs_dev, "--slot", "b").stdout.splitlines()
    assert out[:2] == ["marked b good: it is the default",
                       "default: b   booted: ?   next boot: b"]
    out = btrdelta("device", "rollback", btrfs_dev).stdout.splitlines()
    assert out[:2] == ["rolled back from b: a is the default",
                       "default: a   booted: ?   next boot: a"]
    btrdelta("device", "mark-good", btrfs_dev, "--slot", "b")
    out = btrdelta("device", "mark-bad", btrfs_dev, "--slot", "b").stdout.splitlines()
    assert out[:2] == ["marked b bad: the default goes back to a",
                       "default: a   booted: ?   next boot: a"]
    assert json.loads(btrdelta("device", "rollback", btrfs_dev, "--json").stdout)[
        "default"] == "factory"  # --json: the document alone


def test_expect_sum_of_a_kernel_incremental_stream(btrfs_dev: Path, small_release: Release,
                                                   tmp_path: Path) -> None:
    """``btrfs send -p`` moves a removed directory's entry through the top directory as an
    orphan and sends no utimes of it after: the received root's mtime is the receive's, so
    no --expect-sum could pass (exit 5: "received root has tree-sum X, the release's is
    Y"). The sum without the top directory's mtime is accepted, and the error says it."""
    with btrfs_loop(size="512M") as src:
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(src / "v")], check=True)
        copy_tree(small_release.old / "usr", src / "v/usr")
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(src / "v"),
                        str(src / "v1")], check=True)
        shutil.rmtree(src / "v/usr/lib/apt/methods")
        (src / "v/usr/lib/apt/new").write_text("2\n")
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(src / "v"),
                        str(src / "v2")], check=True)
        for args, out in ((["v1"], "v1.stream"), (["-p", "v1", "v2"], "v1-v2.stream")):
            subprocess.run(["btrfs", "-q", "send", "-f", str(tmp_path / out),
                            *(str(src / a) if a.startswith("v") else a for a in args)],
                           check=True)
        full, loose = tree_sum(src / "v2"), tree_sum(src / "v2", ignore_root_mtime=True)
    btrdelta("device", "init", btrfs_dev, "--factory", tmp_path / "v1.stream", "--state",
             "etc:/etc", "-q")
    got = btrdelta("device", "install", btrfs_dev, tmp_path / "v1-v2.stream", "--expect-sum",
                   full, check=False)
    assert got.returncode == 5
    assert f"({loose} without its top directory's mtime" in got.stderr
    btrdelta("device", "install", btrfs_dev, tmp_path / "v1-v2.stream", "--expect-sum", loose)
    assert tree_sum(btrfs_dev / "roots/b", ignore_root_mtime=True) == loose


def test_device_help_teaches_the_cycle() -> None:
    """``device --help`` showed init, install and status: not where a release stream comes
    from, the reboot, mark-good (without which the update is undone by itself), nor how to
    try it all without a device."""
    out = btrdelta("device", "--help").stdout
    for step in ("btrdelta send rootfs-1 -o rootfs-1.stream", "btrdelta delta make",
                 "btrdelta device install", "# reboot", "btrdelta device mark-good",
                 "mkfs.btrfs disk.img", "btrdelta-boot.sh select"):
        assert step in out, step


_HOLD = """
import sys
from btrdelta.device.layout import open_device
with open_device(sys.argv[1]) as layout:
    print(layout.top, flush=True)
    sys.stdin.read()
"""


def _losetup(img: Path, settle: int | None = None) -> list[str]:
    """The loop devices of ``img``; with ``settle``, waits (up to 10 s) until there are that
    many: a loop device is detached after its last unmount, not always at once."""
    for _ in range(100):
        got = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
        if settle is None or len(got) == settle:
            break
        time.sleep(0.1)
    return got


def test_a_killed_command_leaves_no_private_mount(small_release: Release, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A device command given an image file mounts its top level on a private directory;
    killed there (SIGKILL, a crash), it left that mount and its loop device for ever. The
    next device command unmounts them; the mount of a command still running stays."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    img = tmp_path / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    btrdelta("device", "init", img, "--factory", small_release.full, "-q")
    assert os.listdir(tmp) == []
    holders: list[subprocess.Popen[str]] = []
    tops = []
    try:
        for _ in range(2):  # one after the other: each mount is up before the next starts
            holders.append(subprocess.Popen([sys.executable, "-c", _HOLD, str(img)], text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            tops.append(Path(holders[-1].stdout.readline().strip()))  # type: ignore[union-attr]
        killed, running = tops
        assert os.path.ismount(killed)
        assert os.path.ismount(running)
        holders[0].kill()
        holders[0].wait()
        assert os.path.ismount(killed)
        assert _losetup(img)  # one loop device each, or one for both (mount may reuse it)
        btrdelta("device", "status", img)
        assert not killed.exists()
        assert not Path(f"{killed}.lock").exists()
        assert os.path.ismount(running)
        assert len(_losetup(img, settle=1)) == 1
    finally:
        for p in holders:
            p.communicate("")
        for leftover in tmp.glob("btrdelta-device-*"):  # a failed test leaves no mount
            if os.path.ismount(leftover):
                subprocess.run(["umount", str(leftover)], check=False)
    assert os.listdir(tmp) == []
    assert _losetup(img, settle=0) == []


def test_status_says_what_a_cut_operation_was(btrfs_dev: Path, small_release: Release) -> None:
    """An install cut by a power cut after its commit point (a manual cut in the VM, session
    17): status printed the state file's record as Python, ``pending: {'op': 'install',
    'slot': 'b', 'started': 1796503670.179}``, and nothing of what it means."""
    btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "-q")
    layout = Layout(btrfs_dev)
    st = load_state(layout)
    st.pending = {"op": "install", "slot": "b", "started": 1796503670.179}
    save_state(layout, st)
    out = btrdelta("device", "status", btrfs_dev).stdout.splitlines()
    assert out[-1] == ("pending: install (slot b, started 2026-12-05 20:47:50 UTC) was cut "
                       "short: the next install, mark-good, mark-bad, rollback, factory-reset, "
                       "backup or restore finishes or undoes it"), out
    assert json.loads(btrdelta("device", "status", btrfs_dev, "--json").stdout)["pending"] \
        == st.pending
    btrdelta("device", "mark-good", btrfs_dev, "--slot", "a", "-q")  # recovers first
    assert not any(line.startswith("pending") for line in
                   btrdelta("device", "status", btrfs_dev).stdout.splitlines())
