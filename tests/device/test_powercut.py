"""Power cuts in a virtual machine (``make vmtest``; skipped by ``make test``).

The device is a raw btrfs image initialized on the host with Debian bookworm minbase as its
factory release (a marker ``/etc/btrdelta-release`` says ``old``/``new``/``bad``), state
subvolumes etc (overlay), var (overlay), home (bind) with a marker each. qemu boots Debian's
kernel with the busybox initramfs of :mod:`btrdelta.testing.vm`; installs and factory
resets run inside the VM and qemu is killed (SIGKILL) at a random moment of them. The next
boot must find the old or the new root, never neither, with every state subvolume intact;
the host then checks the image (tree-sums against the source trees, consistent state) and
re-runs the operation, which must complete. Figures go to ``VM_CACHE/figures.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.device.backup import backup, restore, restore_to_dir
from btrdelta.device.reset import factory_reset
from btrdelta.testing.loopfs import mounted_image
from btrdelta.testing.vm import VmKit, VmResult
from btrdelta.tree import tree_sum

from .conftest import btrdelta, copy_tree

ENABLED = bool(os.environ.get("BTRDELTA_VMTEST"))
RUNS = int(os.environ.get("BTRDELTA_VMTEST_RUNS", "12"))
CACHE = Path(os.environ.get("BTRDELTA_VM_CACHE", "/var/tmp/btrdelta-vm"))
SEED = int(os.environ.get("BTRDELTA_VMTEST_SEED", str(int(time.time()))))
pytestmark = [pytest.mark.btrfs, pytest.mark.timeout(5400),
              pytest.mark.skipif(not ENABLED, reason="power-cut VM test: make vmtest")]
STATE = ["etc:/etc:overlay", "var:/var:overlay", "home:/home:bind"]
FIGURES: dict[str, list[str]] = {}


class Releases:
    """Copies of the release trees (``release_trees``: the cached Debian pair, else one made
    from this machine's packages) with a release marker, their sums, streams."""

    def __init__(self, work: Path, old: Path, new: Path) -> None:
        self.trees: dict[str, Path] = {}
        for name, src in (("old", old), ("new", new), ("bad", new)):
            dst = work / name
            copy_tree(src, dst)
            (dst / "etc/btrdelta-release").write_text(f"{name}\n")
            self.trees[name] = dst
        self.sums = {k: tree_sum(v) for k, v in self.trees.items()}
        self.full = work / "old.stream"
        self.delta = work / "old-new.delta"
        stream = work / "old-new.stream"
        btrdelta("send", self.trees["old"], "-o", self.full)
        btrdelta("send", "--parent", self.trees["old"], self.trees["new"], "-o", stream)
        btrdelta("delta", "make", "-f", stream, "--old", self.trees["old"], "-o", self.delta)


@contextmanager
def mounted(image: Path) -> Iterator[Path]:
    # returns once the filesystem is gone, not only this namespace's mount of it: the last
    # commit of a mount another namespace still held reached the next run's fresh image
    # (session 11: install run 6 booted neither root, the image a mix of run 5's last commit
    # over the base image)
    with mounted_image(image, options="subvolid=5") as mnt:
        yield mnt


@pytest.fixture(scope="module")
def kit() -> VmKit:
    # the seed first: a failure is re-run with BTRDELTA_VMTEST_SEED (it was nowhere but in
    # figures.json, written only when a test passed)
    print(f"vmtest seed {SEED}", flush=True)
    return VmKit.prepare(CACHE)


@pytest.fixture(scope="module")
def releases(release_trees: tuple[Path, Path]) -> Releases:
    # not below /tmp: the VM mounts a tmpfs there over the host's files it sees
    work = CACHE / "releases"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return Releases(work, *release_trees)


@pytest.fixture(scope="module")
def base_image(releases: Releases) -> Path:
    image = CACHE / "base.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(3 << 30)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    with mounted(image) as mnt:
        device.init(mnt, releases.full, state=STATE, tries=2)
        (mnt / "state/home/marker").write_text("state-ok\n")
        (mnt / "state/etc/upper/hostname").write_text("vm-device\n")
        (mnt / "state/var/upper/local-data").write_text("var-ok\n")
    return image


def fresh(base: Path, name: str) -> Path:
    image = CACHE / f"{name}.img"
    image.unlink(missing_ok=True)  # a new file: nothing still open on the old one reaches it
    subprocess.run(["cp", "--sparse=always", str(base), str(image)], check=True)
    return image


class Span:
    """When to cut a command: its length in the VM (``BTRDELTA-START`` to power off) and the
    moment of one of its steps (``mark``), from its uninterrupted run. Under TCG the VM's
    speed follows the host's load (session 26: an uninterrupted update took 26.1 s, then 11
    of its 12 cut runs ended before their cut, which fell at 17.6-25.7 s): a cut run that
    ends before its cut shortens both in proportion, so the next cuts fall within the
    command again."""

    def __init__(self, ran: VmResult, mark: float | None = None) -> None:
        assert ran.started is not None
        self.first = self.length = ran.seconds - ran.started
        self.mark = mark

    def ran(self, res: VmResult) -> None:
        """Learn from cut run ``res``: shorter when it ended before its cut."""
        if res.killed or res.started is None:
            return
        took = res.seconds - res.started
        if took < self.length:
            if self.mark is not None:
                self.mark *= took / self.length
            self.length = took

    def near_end(self, rng: random.Random, i: int) -> float:
        """Cut ``i``: anywhere (odd ``i``), or in the last 4 s (up to 1 s after: a run
        slower than the last)."""
        end = self.length
        return rng.uniform(0.0, end) if i % 2 else rng.uniform(end - 4, end + 1)

    def __str__(self) -> str:
        shorter = (f", {self.length:.1f} s after the runs that ended before their cut"
                   if self.length < self.first else "")
        return f"{self.first:.1f} s{shorter}"


def boot(kit: VmKit, image: Path) -> dict[str, str]:
    res = kit.run(image, "boot")
    got = res.result()
    assert got, "\n".join(res.lines[-30:])
    return got


def _state_consistent(mnt: Path) -> str:
    """``old`` (as before the reset), ``new`` (reset) — never a mix; home always kept."""
    assert (mnt / "state/home/marker").read_text() == "state-ok\n"
    etc = (mnt / "state/etc/upper/hostname").exists()
    var = (mnt / "state/var/upper/local-data").exists()
    assert etc == var, "a factory reset left the state subvolumes half reset"
    return "old" if etc else "new"


def test_power_cut_during_install(kit: VmKit, releases: Releases, base_image: Path) -> None:
    r = releases
    # an install that runs to its end: its length sets the range of the power cuts
    image = fresh(base_image, "install")
    ran = kit.run(image, "run", f"device install -v /dev/vda {r.delta}")
    assert ran.done_rc() == 0, "\n".join(ran.lines[-30:])
    commit = ran.when("install: commit")  # the step's start: the trial file comes next
    assert commit is not None, "\n".join(ran.lines[-30:])
    span = Span(ran, commit)
    first = boot(kit, image)  # the trial: new, healthy, marked good from inside the VM
    assert first == {"choice": "b", "release": "new", "state": "ok", "etc": "local",
                     "health": "ok"}
    assert boot(kit, image)["release"] == "new"
    with mounted(image) as mnt:
        assert device.status(mnt)["default"] == "b"
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    for i in range(RUNS):
        image = fresh(base_image, "install")
        # half of the cuts anywhere in the command, half within 3 s of its commit point
        at = span.mark or 0.0
        delay = rng.uniform(0.0, span.length) if i % 2 else rng.uniform(at - 3, at + 3)
        cut = kit.run(image, "run", f"device install /dev/vda {r.delta}", kill_after=delay)
        span.ran(cut)
        if not cut.killed:  # it ran to its end before the cut: it must have succeeded
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        got = boot(kit, image)
        assert got["state"] == "ok", (i, delay, got)
        assert got["etc"] == "local", (i, delay, got)
        if not cut.killed:
            assert (got["choice"], got["release"]) == ("b", "new"), (i, delay, got)
        assert got["release"] in ("old", "new"), (i, delay, got)
        assert (got["choice"], got["release"]) in (("default", "old"), ("b", "new")), got
        with mounted(image) as mnt:
            assert tree_sum(mnt / "roots/a") == r.sums["old"]
            if got["release"] == "new":
                assert tree_sum(mnt / "roots/b") == r.sums["new"]
            res = device.install(mnt, r.delta)  # the re-run completes
            assert res.tree_sum == r.sums["new"]
        what = f"{'cut' if cut.killed else 'finished'}, booted {got['release']}"
        outcomes[what] += 1
        print(f"install run {i + 1}/{RUNS}: power cut {delay:.1f} s after start: {what}",
              flush=True)
    FIGURES["install"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted install in the VM: {span} from the command's start to power "
        f"off, commit step at {commit:.1f} s ({kit.accel}); cuts: half uniform over it, "
        f"half within 3 s of the commit step; seed {SEED}"]
    _write_figures()


def test_power_cut_during_factory_reset(kit: VmKit, releases: Releases,
                                        base_image: Path) -> None:
    image = fresh(base_image, "reset")
    ran = kit.run(image, "run", "device factory-reset /dev/vda --keep home")
    assert ran.done_rc() == 0, "\n".join(ran.lines[-30:])
    span = Span(ran)
    with mounted(image) as mnt:
        assert _state_consistent(mnt) == "new"
    rng = random.Random(SEED + 1)
    outcomes: Counter[str] = Counter()
    for i in range(RUNS):
        image = fresh(base_image, "reset")
        delay = rng.uniform(0.0, span.length)
        cut = kit.run(image, "run", "device factory-reset /dev/vda --keep home",
                      kill_after=delay)
        span.ran(cut)
        if not cut.killed:
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        got = boot(kit, image)
        assert got["state"] == "ok", (i, delay, got)
        assert got["release"] == "old", (i, delay, got)  # factory and slot a: both old
        with mounted(image) as mnt:
            seen = _state_consistent(mnt)
            default = device.status(mnt)["default"]
            assert default in ("a", "factory")
            if not cut.killed:
                assert (seen, default) == ("new", "factory"), (i, delay, seen, default)
            factory_reset(mnt, keep=["home"])  # the re-run completes
            assert _state_consistent(mnt) == "new"
            assert device.status(mnt)["default"] == "factory"
            assert tree_sum(mnt / "roots/factory") == releases.sums["old"]
        what = f"{'cut' if cut.killed else 'finished'}, state {seen}, root {default}"
        outcomes[what] += 1
        print(f"reset run {i + 1}/{RUNS}: power cut {delay:.1f} s after start: {what}",
              flush=True)
    FIGURES["factory-reset"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted reset in the VM: {span} ({kit.accel}); seed {SEED + 1}"]
    _write_figures()


def test_bad_update_comes_back_by_boot_counting(kit: VmKit, releases: Releases,
                                                base_image: Path) -> None:
    image = fresh(base_image, "bad")
    with mounted(image) as mnt:
        device.install(mnt, releases.trees["bad"], tries=2)
    seq = [boot(kit, image) for _ in range(3)]
    assert [(b["choice"], b["release"], b["health"]) for b in seq] == [
        ("b", "bad", "fail"), ("b", "bad", "fail"), ("default", "old", "ok")]
    with mounted(image) as mnt:
        st = device.status(mnt)
        assert st["trial"] == {"slot": "b", "tries_left": 0, "boots": 2}
        assert st["default"] == "a"
    FIGURES["bad update"] = ["boots: b (health check fails), b (fails), a (old root back, "
                             "no command run)"]
    _write_figures()


def test_atomic_writes_survive_a_power_cut(kit: VmKit) -> None:
    """``write_atomic`` (the state file's) and ``create_file`` (the replica state's), then
    the power cut as soon as they returned (:mod:`btrdelta.testing.cutwrite`): every file
    has its last content. Before session 12 the unnamed file was ``fsync``-ed before its
    link only, which btrfs skips (an inode without links): the replaced state file, a new
    one and a created one came back empty (an install cut at its start left
    ``.btrdelta/state.json`` empty and the device refused every command)."""
    from btrdelta.testing.cutwrite import EXPECTED

    image = CACHE / "cutwrite.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    module = "btrdelta.testing.cutwrite"
    cut = kit.run(image, "run", "write", module=module)
    assert "WRITTEN" in cut.lines, "\n".join(cut.lines[-30:])
    assert cut.done_rc() is None  # cut: the command never returned
    read = kit.run(image, "run", "read", module=module)
    got = {f[1]: bytes.fromhex(f[2] if len(f) > 2 else "")
           for f in (line.split() for line in read.lines) if f and f[0] == "READ"}
    image.unlink()
    assert got == EXPECTED, "\n".join(read.lines[-30:])


#: what the home of the restore test holds of a release tree (~26 MB: a restore of its two
#: backups, whole then a delta, takes 16-18 s in the VM under TCG, Python's start included)
HOME_PARTS = ("etc", "var/lib/dpkg", "usr/bin")


def _home_parts(tree: Path, home: Path) -> None:
    """``home/data`` made the parts of release tree ``tree``."""
    for part in HOME_PARTS:
        (home / "data" / part).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["rsync", "-aHAX", "--delete", f"{tree}/{part}/",
                        f"{home}/data/{part}/"], check=True)


@dataclass(frozen=True)
class Backups:
    where: Path  # the backups of state/home: whole (the old parts), a delta (the new ones)
    sums: dict[str, str]  # "current": state/home on the device; "restored": backup 2
    base: Path  # the device image, state/home changed since its last backup


@pytest.fixture(scope="module")
def backups(releases: Releases, base_image: Path) -> Backups:
    where = CACHE / "backups"
    shutil.rmtree(where, ignore_errors=True)
    image = fresh(base_image, "restore-base")
    with mounted(image) as mnt:
        home = mnt / "state/home"
        for name in ("old", "new"):
            _home_parts(releases.trees[name], home)
            backup(mnt, "home", str(where))
        restored = tree_sum(home)
        shutil.rmtree(home / "data/usr")
        (home / "data/written-since").write_text("after the last backup\n")
        current = tree_sum(home)
    assert [e["file"] for e in json.loads((where / "home.backups.json").read_text())[
        "backups"]] == ["home.1.stream", "home.2.delta"]
    return Backups(where, {"current": current, "restored": restored}, image)


def _restore_left(mnt: Path) -> list[str]:
    """What a restore cut short left for the next command's recovery to remove."""
    return [str(p.relative_to(mnt)) for p in (mnt / ".btrdelta/restore",
                                              mnt / "state/.restored-home") if p.exists()]


def test_power_cut_during_restore(kit: VmKit, backups: Backups) -> None:
    """``device restore`` of state/home from its backups (a whole stream and a delta, in a
    directory of the host the guest reads over 9p): after a cut the next boot finds
    state/home as it was or as restored, never missing, empty or half received; the
    re-run restores it and leaves nothing behind."""
    command = f"device restore /dev/vda home {backups.where}"
    image = fresh(backups.base, "restore")
    ran = kit.run(image, "run", command)
    assert ran.done_rc() == 0, "\n".join(ran.lines[-30:])
    span = Span(ran)
    with mounted(image) as mnt:
        assert tree_sum(mnt / "state/home") == backups.sums["restored"]
        assert _restore_left(mnt) == []
    by_sum = {v: k for k, v in backups.sums.items()}
    rng = random.Random(SEED + 6)
    outcomes: Counter[str] = Counter()
    for i in range(RUNS):
        # half the cuts anywhere, half in its last 4 s: the swap comes after the receive and
        # the check of the tree-sum, a tree-sum (~1 s under TCG) and the state file before
        # the end (Python's start over 9p under TCG takes the first half)
        delay = span.near_end(rng, i)
        image = fresh(backups.base, "restore")
        cut = kit.run(image, "run", command, kill_after=delay)
        span.ran(cut)
        if not cut.killed:
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        got = boot(kit, image)
        assert got["state"] == "ok", (i, delay, got)  # state/home there, its marker in it
        assert (got["release"], got["etc"]) == ("old", "local"), (i, delay, got)
        with mounted(image) as mnt:
            seen = by_sum.get(tree_sum(mnt / "state/home"), "neither")
            assert seen in ("current", "restored"), (i, delay, seen)
            if not cut.killed:
                assert seen == "restored", (i, delay)
            left = _restore_left(mnt)
            res = restore(mnt, "home", str(backups.where))  # the re-run completes
            assert res["tree_sum"] == backups.sums["restored"], (i, delay, res)
            assert tree_sum(mnt / "state/home") == backups.sums["restored"]
            assert _restore_left(mnt) == [], (i, delay)
        what = f"{'cut' if cut.killed else 'finished'}: home {seen}"
        outcomes[what] += 1
        print(f"restore run {i + 1}/{RUNS}: power cut {delay:.1f} s after start: {what}; "
              f"left for the re-run's recovery: {', '.join(left) or 'nothing'}", flush=True)
    FIGURES["restore"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted restore in the VM: {span} ({kit.accel}); cuts: half uniform over "
        f"it, half in its last 4 s (or 1 s after); seed {SEED + 6}"]
    _write_figures()


STICK = "/run/stick"  # where the guest mounts the USB stick (a second disk, ext4)


@dataclass(frozen=True)
class Stick:
    image: Path  # ext4, holding backup 1 of state/home (whole)
    sums: dict[int, str]  # the tree-sum of each backup: 1 on the stick, 2 the next
    base: Path  # the device image, state/home changed since backup 1


@pytest.fixture(scope="module")
def stick(releases: Releases, base_image: Path) -> Stick:
    image = CACHE / "stick-base.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    device_image = fresh(base_image, "backup-base")
    sums = {}
    with mounted(device_image) as mnt, mounted_image(image) as usb:
        for n, name in ((1, "old"), (2, "new")):
            _home_parts(releases.trees[name], mnt / "state/home")
            if n == 1:
                backup(mnt, "home", str(usb))
            sums[n] = tree_sum(mnt / "state/home")
    return Stick(image, sums, device_image)


def _check_stick(usb: Path, sums: dict[int, str], work: Path) -> list[int]:
    """The backups the stick's index lists, its last one restored (into ``work``) to its
    tree-sum: a cut never lists a backup whose file is missing or partial."""
    index = json.loads((usb / "home.backups.json").read_text())
    listed = [int(e["n"]) for e in index["backups"]]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    got = restore_to_dir(str(usb), "home", work)
    assert tree_sum(got) == sums[listed[-1]]
    shutil.rmtree(work)
    return listed


def test_power_cut_during_backup(kit: VmKit, stick: Stick, tmp_path: Path) -> None:
    """``device backup`` of state/home onto a USB stick (ext4, the guest's second disk)
    holding its previous backup: an incremental, delta-compressed. After a cut the device
    boots as before, home untouched; the stick's index lists backup 1, or 1 and 2, and
    its last one restores to that backup's tree-sum; the re-run backs up home and its
    backup restores to it."""
    command = f"device backup /dev/vda home {STICK}"
    image = fresh(stick.base, "backup")
    usb = fresh(stick.image, "stick")
    ran = kit.run(image, "run", command, stick=(usb, STICK))
    assert ran.done_rc() == 0, "\n".join(ran.lines[-30:])
    span = Span(ran)
    with mounted_image(usb) as at:
        assert _check_stick(at, stick.sums, tmp_path / "restored") == [1, 2]
        assert (at / "home.2.delta").exists()
    rng = random.Random(SEED + 7)
    outcomes: Counter[str] = Counter()
    for i in range(RUNS):
        # half the cuts anywhere, half in the last 4 s (the index written after the file)
        delay = span.near_end(rng, i)
        image = fresh(stick.base, "backup")
        usb = fresh(stick.image, "stick")
        cut = kit.run(image, "run", command, stick=(usb, STICK), kill_after=delay)
        span.ran(cut)
        if not cut.killed:
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        got = boot(kit, image)
        assert (got["release"], got["state"], got["etc"]) == ("old", "ok", "local"), got
        with mounted(image) as mnt, mounted_image(usb) as at:
            assert tree_sum(mnt / "state/home") == stick.sums[2]
            listed = _check_stick(at, stick.sums, tmp_path / "restored")
            assert listed in ([1], [1, 2]), (i, delay, listed)
            if not cut.killed:
                assert listed == [1, 2], (i, delay)
            files = sorted(p.name for p in at.iterdir() if p.name != "lost+found")
            entry = backup(mnt, "home", str(at))  # the re-run completes
            # the next number: 3 when the cut left backup 2 listed, or its snapshot on the
            # device (the file on the stick unlisted)
            again = _check_stick(at, {**stick.sums, entry["n"]: stick.sums[2]},
                                 tmp_path / "restored")
            assert again == [*listed, entry["n"]], (i, delay, again, entry)
        what = f"{'cut' if cut.killed else 'finished'}: backups {'+'.join(map(str, listed))}"
        outcomes[what] += 1
        print(f"backup run {i + 1}/{RUNS}: power cut {delay:.1f} s after start: {what}; "
              f"stick {', '.join(files)}; re-run: backup {entry['n']} {entry['file']}",
              flush=True)
    FIGURES["backup"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted backup in the VM: {span} ({kit.accel}); cuts: half uniform over "
        f"it, half in its last 4 s (or 1 s after); seed {SEED + 7}"]
    _write_figures()


def _write_figures() -> None:
    (CACHE / "figures.json").write_text(json.dumps(FIGURES, indent=1))
