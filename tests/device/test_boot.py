"""The boot side: the initramfs script (run by busybox sh on the real filesystem) against
the Python decision, and the boot hooks against the real bootloader tools (grub-editenv,
fw_setenv/fw_printenv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.device.boot import read_trial, select_root
from btrdelta.device.layout import Layout
from btrdelta.device.state import load_state

from .conftest import Release, btrdelta
from .crash import crash_install

pytestmark = pytest.mark.btrfs
CONTRIB = Path(__file__).parents[2] / "contrib" / "boot"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is required under CI (scripts/sysdeps.sh installs it)")
        pytest.skip(f"{tool} not installed")
    return path


def _script(*args: str | os.PathLike[str]) -> str:
    busybox = _need("busybox")
    proc = subprocess.run([busybox, "sh", str(CONTRIB / "btrdelta-boot.sh"),
                           *map(os.fspath, args)], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _source(mnt: Path) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_initramfs_script_counts_boots_and_mounts(btrfs_dev: Path, small_release: Release,
                                                  tmp_path: Path) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=["etc:/etc:overlay", "home:/home:bind"], tries=2)
    assert _script("select", btrfs_dev) == "default"
    device.install(btrfs_dev, r.delta)
    # what busybox decides, boot after boot, and the trial file it leaves
    seen = []
    for _ in range(3):
        seen.append(_script("select", btrfs_dev))
        trial = read_trial(device.Layout(btrfs_dev))
        assert trial is not None
        seen.append(trial.file_name)
    assert seen == ["b", "try-b+1-1", "b", "try-b+0-2", "default", "try-b+0-2"]
    st = device.status(btrfs_dev)
    assert st["trial"] == {"slot": "b", "tries_left": 0, "boots": 2}
    # the script's mount: the default root (a) with the overlay and the bind
    root = tmp_path / "root"
    root.mkdir()
    (btrfs_dev / "state/etc/upper/hostname").write_text("device-1\n")
    (btrfs_dev / "state/home/u").write_text("user\n")
    try:
        assert _script("mount", _source(btrfs_dev), btrfs_dev, root) == "default"
        assert (root / "etc/hostname").read_text() == "device-1\n"
        assert (root / "etc/apt/sources.list").exists()  # the lower layer shows through
        assert (root / "home/u").read_text() == "user\n"
        assert (root / "usr/lib/apt").is_dir()
        findmnt = subprocess.run(["findmnt", "-n", "-o", "FSROOT", str(root)],
                                 capture_output=True, text=True, check=True).stdout
        assert findmnt.strip() == "/roots/a"
    finally:
        subprocess.run(["umount", "-R", str(root)], capture_output=True, check=False)


def _hook(tmp_path: Path) -> Path:
    """A boot hook that drives the GRUB and the U-Boot examples (and logs its calls)."""
    grubenv = tmp_path / "grubenv"
    subprocess.run([_need("grub-editenv"), str(grubenv), "create"], check=True)
    uenv = tmp_path / "uboot.env"
    uenv.write_bytes(b"\0" * 0x4000)
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(f"{uenv} 0x0 0x4000\n")
    defenv = tmp_path / "default.env"
    defenv.write_text("bootdelay=1\n")
    subprocess.run([_need("fw_setenv"), "-c", str(cfg), "-f", str(defenv), "bootdelay", "1"],
                   check=True, capture_output=True)
    hook = tmp_path / "hook"
    hook.write_text(f"""#!/bin/sh
set -e
echo "$@" >> {tmp_path}/calls
GRUBENV={grubenv} {CONTRIB}/grub.sh "$@"
FW_ENV_CONFIG={cfg} {CONTRIB}/uboot.sh "$@"
""")
    hook.chmod(0o755)
    return hook


def _env(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    grub = subprocess.run(["grub-editenv", str(tmp_path / "grubenv"), "list"],
                          capture_output=True, text=True, check=True).stdout
    uboot = subprocess.run(["fw_printenv", "-c", str(tmp_path / "fw_env.config")],
                           capture_output=True, text=True, check=True).stdout

    def parse(text: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in text.splitlines()
                    if line.startswith("btrdelta_"))

    return parse(grub), parse(uboot)


def test_hooks_drive_grub_and_uboot_environments(btrfs_dev: Path, small_release: Release,
                                                 tmp_path: Path) -> None:
    r = small_release
    hook = _hook(tmp_path)
    device.init(btrfs_dev, r.old, state=[], hook=str(hook), tries=3)
    assert _env(tmp_path) == ({"btrdelta_default": "a"}, {"btrdelta_default": "a"})
    device.install(btrfs_dev, r.delta)
    want = {"btrdelta_default": "a", "btrdelta_try": "b", "btrdelta_left": "3"}
    assert _env(tmp_path) == (want, want)
    device.mark_good(btrfs_dev, slot="b")
    assert _env(tmp_path) == ({"btrdelta_default": "b"}, {"btrdelta_default": "b"})
    device.install(btrfs_dev, r.old, booted="b")
    device.rollback(btrfs_dev, booted="b")  # the trial of a is cancelled
    want = {"btrdelta_default": "b", "btrdelta_try": "a", "btrdelta_left": "0"}
    assert _env(tmp_path) == (want, want)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["good a", "try b 3", "good b", "try a 3", "cancel a"]


def test_failing_hook_is_an_error(btrfs_dev: Path, small_release: Release,
                                  tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\necho 'no bootloader environment' >&2\nexit 1\n")
    hook.chmod(0o755)
    device.init(btrfs_dev, small_release.old, state=[])
    st_path = btrfs_dev / ".btrdelta/state.json"
    st_path.write_text(st_path.read_text().replace('"hook": null', f'"hook": "{hook}"'))
    with pytest.raises(device.DeviceError, match="no bootloader environment"):
        device.install(btrfs_dev, small_release.delta)
    st = device.status(btrfs_dev)
    assert st["trial"] is None  # the bootloader was not told: nothing selected
    assert st["next_boot"] == "a"
    assert st["pending"] is None


def test_the_running_roots_mark_good_keeps_an_install_made_since(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """The health check's ``mark-good`` of the running root (the default, a) comes after an
    update was installed in the same boot (b on trial): it removed every trial file and
    told the bootloader "good a" (GRUB and U-Boot drop their trial then), so the update
    that `install` had reported as the next boot never booted, silently."""
    r = small_release
    hook = _hook(tmp_path)
    device.init(btrfs_dev, r.old, state=[], hook=str(hook), tries=3)
    device.install(btrfs_dev, r.delta)
    st = json.loads(btrdelta("device", "mark-good", btrfs_dev, "--slot", "a",
                             "--json").stdout)
    assert st["default"] == "a"
    assert st["roots"]["a"]["verdict"] == "good"
    assert st["next_boot"] == "b"
    assert st["trial"] == {"slot": "b", "tries_left": 3, "boots": 0}
    want = {"btrdelta_default": "a", "btrdelta_try": "b", "btrdelta_left": "3"}
    assert _env(tmp_path) == (want, want)
    assert select_root(Layout(btrfs_dev))[0] == "b"
    out = btrdelta("device", "mark-good", btrfs_dev, "--slot", "a").stdout.splitlines()
    assert out[0] == "marked a good: it is the default; next boot: b, on trial", out
    # b boots and is marked good: its own trial ends
    device.mark_good(btrfs_dev, slot="b")
    assert _env(tmp_path) == ({"btrdelta_default": "b"}, {"btrdelta_default": "b"})
    assert device.status(btrfs_dev)["trial"] is None


def test_systemd_boot_entries_leave_no_trial_after_good(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """``good SLOT`` means no trial (docs/device.md, boot hooks): the systemd-boot hook
    dropped only SLOT's counted entry, so after a factory reset with an update pending
    (b on trial) ``btrdelta-b+3.conf`` stayed, the oneshot the ``try`` had set: the next
    boot was b, not the factory base. Oracle: the entries systemd-boot reads."""
    esp = tmp_path / "esp"
    entries = esp / "loader" / "entries"
    entries.mkdir(parents=True)
    for slot in ("a", "b", "factory"):
        (entries / f"btrdelta-{slot}.template").write_text(
            f"title {slot}\nlinux /vmlinuz\noptions rootflags=subvol=roots/{slot} ro\n")
    hook = tmp_path / "hook"
    hook.write_text(f'#!/bin/sh\nESP={esp} exec {CONTRIB}/systemd-boot.sh "$@"\n')
    hook.chmod(0o755)

    def confs() -> list[str]:
        return sorted(n for n in os.listdir(entries) if n.endswith(".conf"))

    device.init(btrfs_dev, small_release.old, state=[], hook=str(hook), tries=3)
    assert confs() == ["btrdelta-a.conf"]
    device.install(btrfs_dev, small_release.delta)
    assert confs() == ["btrdelta-a.conf", "btrdelta-b+3.conf"]
    btrdelta("device", "factory-reset", btrfs_dev)
    assert device.status(btrfs_dev)["next_boot"] == "factory"
    assert confs() == ["btrdelta-a.conf", "btrdelta-factory.conf"]


def test_a_hook_failing_to_take_the_trial_again_leaves_none(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """mark-good of the running root tells the hook ``good`` (which drops the bootloader's
    trial), then ``try`` of the trial it keeps; when that fails, the trial file goes too
    (as an install's failed ``try``): the initramfs and the bootloader agree, the default
    boots next."""
    hook = tmp_path / "hook"
    hook.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
if [ "$1" = try ] && [ -e {tmp_path}/broken ]; then echo 'no environment' >&2; exit 1; fi
""")
    hook.chmod(0o755)
    device.init(btrfs_dev, small_release.old, state=[], hook=str(hook), tries=3)
    device.install(btrfs_dev, small_release.delta)
    (tmp_path / "broken").touch()
    got = btrdelta("device", "mark-good", btrfs_dev, "--slot", "a", check=False)
    assert got.returncode == 1, got.stderr
    assert "boot hook" in got.stderr
    assert "no environment" in got.stderr
    st = device.status(btrfs_dev)
    assert (st["default"], st["trial"], st["next_boot"]) == ("a", None, "a")
    assert (tmp_path / "calls").read_text().splitlines()[-2:] == ["good a", "try b 3"]


def test_a_trial_the_bootloader_ran_out_is_not_armed_again(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a hook the bootloader counts the tries (GRUB: ``btrdelta_left``); the trial
    file keeps the count the install gave. b was tried 3 times in later boots and failed,
    a came back: the running root's mark-good must not arm b's trial again (it kept the
    trial of another slot whatever its age, and GRUB tried the bad b again after every
    boot of a). A trial is kept behind a hook only when its install was made in this
    boot."""
    from btrdelta.update import partial

    r = small_release
    hook = _hook(tmp_path)
    device.init(btrfs_dev, r.old, state=[], hook=str(hook), tries=3)
    device.install(btrfs_dev, r.delta)
    monkeypatch.setattr(partial, "boot_id", lambda: "a-later-boot")
    grubenv = str(tmp_path / "grubenv")
    for left in ("2", "1", "0"):  # GRUB's three tries of b, each a failed boot
        subprocess.run(["grub-editenv", grubenv, "set", f"btrdelta_left={left}"], check=True)
    st = device.mark_good(btrfs_dev, slot="a")
    assert (st["default"], st["trial"], st["next_boot"]) == ("a", None, "a")
    grub, _uboot = _env(tmp_path)
    assert grub == {"btrdelta_default": "a"}
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "good a"


def test_an_install_cut_before_its_hook_tells_it_in_the_same_boot(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """SIGKILL after the commit point, before ``HOOK try``: the trial file is there but the
    bootloader was never told. The next command of the same boot (nothing booted since)
    tells the hook, and the install counts as made in this boot: mark-good of the running
    root keeps it (docs/device.md, boot hooks)."""
    r = small_release
    hook = _hook(tmp_path)
    device.init(btrfs_dev, r.old, state=[], hook=str(hook), tries=3)
    assert crash_install(btrfs_dev, r.delta, step="hook")
    assert (tmp_path / "calls").read_text().splitlines() == ["good a"]
    assert _env(tmp_path)[0] == {"btrdelta_default": "a"}  # the bootloader does not know
    st = device.mark_good(btrfs_dev, slot="a", booted="a")
    assert (st["default"], st["next_boot"]) == ("a", "b")
    want = {"btrdelta_default": "a", "btrdelta_try": "b", "btrdelta_left": "3"}
    assert _env(tmp_path) == (want, want)
    assert (tmp_path / "calls").read_text().splitlines() == [
        "good a", "try b 3", "good a", "try b 3"]
    notes = [e.get("what", "") for e in load_state(Layout(btrfs_dev)).log
             if e.get("event") == "recover"]
    assert any(n.startswith("told the boot hook of the trial of b") for n in notes), notes


@pytest.mark.parametrize("booted", ["a", "b"])
def test_an_install_cut_before_its_hook_in_a_later_boot(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, booted: str) -> None:
    """The same cut, then a reboot. Booted into a, the bootloader never heard of b's trial
    (or tried it and spent it): the trial file goes, and status says a boots next. Booted
    into b, the bootloader was told and counts the tries: the trial stays and mark-good of
    b ends it."""
    from btrdelta.update import partial

    r = small_release
    hook = _hook(tmp_path)
    device.init(btrfs_dev, r.old, state=[], hook=str(hook), tries=3)
    assert crash_install(btrfs_dev, r.delta, step="hook")
    monkeypatch.setattr(partial, "boot_id", lambda: "a-later-boot")
    st = device.mark_good(btrfs_dev, slot=booted, booted=booted)
    assert (st["default"], st["trial"], st["next_boot"]) == (booted, None, booted)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["good a", *(["cancel b"] if booted == "a" else []), f"good {booted}"]
    assert _env(tmp_path)[0] == {"btrdelta_default": booted}
    assert read_trial(Layout(btrfs_dev)) is None
    assert st["pending"] is None
    notes = [e.get("what", "") for e in load_state(Layout(btrfs_dev)).log
             if e.get("event") == "recover"]
    assert any(n.startswith("dropped the trial of b") for n in notes) == (booted == "a")
