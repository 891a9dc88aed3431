"""Read-only roots with writable overlays, diff, factory reset, backup and restore, on
loop-mounted btrfs (and ext4 as a backup location); oracles: overlayfs itself (the merged
view), tree-sums of trees changed the same way by plain file operations, btrfs-progs."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.cli import main
from btrdelta.device.backup import KEEP_DESTINATIONS, backup, restore, restore_to_dir
from btrdelta.device.overlay import diff, mount
from btrdelta.device.reset import factory_reset
from btrdelta.testing.loopfs import loop_fs
from btrdelta.tree import diff_manifests, tree_manifest, tree_sum
from tests.jsondoc import checked

from .conftest import BTRDELTA, Release, btrdelta, copy_tree
from .test_install import progs_default

pytestmark = pytest.mark.btrfs
STATE = ["etc:/etc:overlay", "var:/var:overlay", "home:/home:bind"]


def _changes(root: Path) -> None:
    """The same edits, on a mounted device or on a plain copy (the oracle)."""
    (root / "etc/new.conf").write_text("added\n")
    with open(root / "etc/apt/sources.list", "a") as f:
        f.write("deb http://example.invalid/debian bookworm main\n")
    os.unlink(root / "etc/apt/apt.conf.d/01autoremove")
    shutil.rmtree(root / "etc/apt/trusted.gpg.d")
    (root / "etc/apt/trusted.gpg.d").mkdir()
    (root / "home/user").mkdir()
    (root / "home/user/notes").write_text("mine\n")
    for rel in ("etc/new.conf", "etc/apt/sources.list", "etc/apt/apt.conf.d",
                "etc/apt/trusted.gpg.d", "etc/apt", "etc", "home/user/notes", "home/user",
                "home"):
        os.utime(root / rel, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


@pytest.fixture
def sysroot(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "sysroot"
    target.mkdir()
    yield target
    subprocess.run(["umount", "-R", str(target)], capture_output=True, check=False)


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-R", str(target)], check=True)


def test_overlay_diff_and_factory_reset(btrfs_dev: Path, small_release: Release,
                                        sysroot: Path, tmp_path: Path) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    mounted = checked("device mount", json.loads(btrdelta("device", "mount", btrfs_dev, sysroot,
                                                          "--json").stdout))
    assert mounted["root"] == "a"
    assert mounted["mounts"]
    for m in mounted["mounts"]:  # each one is a mount point now (paths inside the root)
        assert os.path.ismount(sysroot / m["path"].lstrip("/")), m
    _changes(sysroot)
    with pytest.raises(OSError, match="Read-only") as exc:
        (sysroot / "usr/lib/apt/x").write_text("the root is read-only")
    assert exc.value.errno == errno.EROFS
    _umount(sysroot)
    assert tree_sum(btrfs_dev / "roots/a") == r.old_sum
    # the oracle: a plain copy changed by the same file operations
    expected = tmp_path / "expected"
    copy_tree(btrfs_dev / "roots/a", expected)
    _changes(expected)
    mount(btrfs_dev, sysroot)
    assert diff_manifests(tree_manifest(sysroot / "etc"), tree_manifest(expected / "etc")) == []
    assert tree_sum(sysroot / "home") == tree_sum(expected / "home")
    _umount(sysroot)
    out = btrdelta("device", "diff", btrfs_dev).stdout.splitlines()
    lines = btrdelta("device", "diff", btrfs_dev, "--json").stdout.splitlines()
    assert len(lines) == len(out)
    for line in lines:  # JSON lines, one change each
        checked("device diff", json.loads(line))
    assert out == ["D /etc/apt/apt.conf.d/01autoremove", "M /etc/apt/sources.list",
                   "R /etc/apt/trusted.gpg.d/", "A /etc/new.conf"]
    # factory reset keeping home: /etc is the release's again, home stays
    reset = json.loads(btrdelta("device", "factory-reset", btrfs_dev, "--keep", "home",
                                "--json").stdout)
    assert checked("device factory-reset", reset)["kept"] == ["home"]
    assert progs_default(btrfs_dev) == "roots/factory"
    assert diff(btrfs_dev) == []
    mount(btrfs_dev, sysroot)
    assert tree_sum(sysroot / "etc") == tree_sum(btrfs_dev / "roots/factory/etc")
    assert (sysroot / "home/user/notes").read_text() == "mine\n"
    _umount(sysroot)
    st = device.status(btrfs_dev)
    assert st["pending"] is None
    assert [s["present"] for s in st["state"]] == [True, True, True]
    assert sorted(os.listdir(btrfs_dev)) == [".btrdelta", "roots", "state"]
    factory_reset(btrfs_dev)
    assert os.listdir(btrfs_dev / "state/home") == []
    # an install after the reset goes to a slot, never to the factory base
    assert device.install(btrfs_dev, r.delta).slot in ("a", "b")
    assert tree_sum(btrfs_dev / "roots/factory") == r.old_sum


def _subvolumes(top: Path) -> list[str]:
    """The kernel's list of subvolume paths (btrfs-progs)."""
    out = subprocess.run(["btrfs", "subvolume", "list", str(top)], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split(" path ", 1)[1] for line in out.splitlines())


def test_a_reset_of_the_running_system_keeps_its_old_state_until_the_next_boot(
    btrfs_dev: Path, small_release: Release, sysroot: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A factory reset run on the system booted from the device (its / one of the roots,
    mounted as the initramfs does) swaps the state at once but deletes the old one only
    after a reboot: the running system's overlays and bind mounts go on working until
    then. It was deleted under them: a bind-mounted /home became an empty directory and
    every write there failed with ENOENT (session 17)."""
    from btrdelta.device import boot

    device.init(btrfs_dev, small_release.old, state=STATE)
    mount(btrfs_dev, sysroot)
    (sysroot / "home/notes").write_text("before\n")
    (sysroot / "etc/local.conf").write_text("local\n")
    monkeypatch.setattr(boot, "RUNNING_ROOT", str(sysroot))  # booted from roots/a
    assert device.status(btrfs_dev)["booted"] == "a"
    assert main(["device", "factory-reset", str(btrfs_dev), "--keep", "home"]) == 0
    assert capsys.readouterr().out == "factory reset: root factory; reset etc, var; kept home; " \
        "the running system uses the old state until the next boot; reboot now\n"
    (sysroot / "home/later").write_text("written after the reset\n")  # was ENOENT
    assert (sysroot / "home/notes").read_text() == "before\n"
    assert (sysroot / "etc/local.conf").read_text() == "local\n"
    assert progs_default(btrfs_dev) == "roots/factory"
    assert (btrfs_dev / "state/home/notes").read_text() == "before\n"  # kept as it was
    assert not (btrfs_dev / "state/home/later").exists()
    assert os.listdir(btrfs_dev / "state/etc/upper") == []
    old = [".state-reset/etc", ".state-reset/home", ".state-reset/var"]
    assert set(old) <= set(_subvolumes(btrfs_dev))
    with pytest.raises(device.DeviceError, match="reboot first"):
        factory_reset(btrfs_dev)  # in the same boot: it would delete them
    assert set(old) <= set(_subvolumes(btrfs_dev))
    # the next boot: the running system is on the new state; any command deletes the old
    _umount(sysroot)
    monkeypatch.setattr(boot, "RUNNING_ROOT", "/")
    assert factory_reset(btrfs_dev, keep=["home"])["old_kept"] is False
    assert not set(old) & set(_subvolumes(btrfs_dev))
    assert sorted(os.listdir(btrfs_dev)) == [".btrdelta", "roots", "state"]


def test_a_restore_on_the_running_system_keeps_the_old_subvolume_until_the_next_boot(
    btrfs_dev: Path, small_release: Release, sysroot: Path, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A restore run on the system booted from the device swaps the restored subvolume in
    at once but keeps the one it replaces (the running system's bind mount of /home is on
    it) until the next boot, and says so. It was deleted under the mount, and the next
    command's recovery deleted it too: /home became an empty directory where every write
    failed with ENOENT (session 18). A second restore of it in that boot is refused."""
    from btrdelta.device import boot

    device.init(btrfs_dev, small_release.old, state=STATE)
    (btrfs_dev / "state/home/notes").write_text("backed up\n")
    backups = tmp_path / "backups"
    backup(btrfs_dev, "home", str(backups))
    want = tree_sum(btrfs_dev / "state/home")
    mount(btrfs_dev, sysroot)
    (sysroot / "home/notes").write_text("after the backup\n")
    monkeypatch.setattr(boot, "RUNNING_ROOT", str(sysroot))  # booted from roots/a
    assert main(["device", "restore", str(btrfs_dev), "home", str(backups), "--json"]) == 0
    res = checked("device restore", json.loads(capsys.readouterr().out))
    assert res["tree_sum"] == want == tree_sum(btrfs_dev / "state/home")
    assert res["old_kept"] is True
    (sysroot / "home/later").write_text("written after the restore\n")  # was ENOENT
    assert (sysroot / "home/notes").read_text() == "after the backup\n"
    assert (btrfs_dev / "state/home/notes").read_text() == "backed up\n"
    assert "state/.restored-home" in _subvolumes(btrfs_dev)
    backup(btrfs_dev, "etc", str(tmp_path / "etc-backups"))  # its recovery keeps it too
    assert (sysroot / "home/later").read_text() == "written after the restore\n"
    assert "state/.restored-home" in _subvolumes(btrfs_dev)
    with pytest.raises(device.DeviceError, match="reboot first"):
        restore(btrfs_dev, "home", str(backups))
    assert (sysroot / "home/notes").read_text() == "after the backup\n"
    (backups / "more").mkdir()  # another one restored in that boot: its old one kept too
    backup(btrfs_dev, "var", str(backups / "more"))
    assert main(["device", "restore", str(btrfs_dev), "var", str(backups / "more")]) == 0
    assert "the running system uses the old var until the next boot: reboot now" in \
        capsys.readouterr().out
    # the next boot: the running system uses the restored one; any command deletes the old
    _umount(sysroot)
    monkeypatch.setattr(boot, "RUNNING_ROOT", "/")
    out = btrdelta("device", "restore", btrfs_dev, "home", backups).stdout
    assert "until the next boot" not in out
    assert "state/.restored-home" not in _subvolumes(btrfs_dev)
    assert tree_sum(btrfs_dev / "state/home") == want
    assert sorted(os.listdir(btrfs_dev / "state")) == ["etc", "home", "var"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, server: subprocess.Popen[bytes]) -> None:
    """Until ``server`` listens on ``port`` (20 s at most; it must not exit meanwhile)."""
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert server.poll() is None, "the server exited"
            time.sleep(0.05)


@pytest.fixture
def dav(tmp_path: Path) -> Iterator[str]:
    """nginx taking PUT (WebDAV module) and serving GET: an HTTP backup location."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is required under CI")
        pytest.skip("nginx not installed")
    port = _free_port()
    root = tmp_path / "www"
    (root / "backups").mkdir(parents=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; client_max_body_size 0;
  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
  scgi_temp_path {tmp_path}/scgi;
  server {{ listen 127.0.0.1:{port}; root {root};
            location /backups/ {{ dav_methods PUT MOVE DELETE; create_full_put_path on; }} }}
}}
""")
    proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(tmp_path / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}/backups"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _edit(home: Path) -> None:
    """A second day's changes: a file edited in place, one added, one removed."""
    data = home / "data"
    victims = sorted(p for p in data.rglob("*") if p.is_file() and not p.is_symlink())
    with open(victims[0], "r+b") as f:
        f.seek(100)
        f.write(b"edited")
    victims[1].unlink()
    (data / "added").write_bytes(os.urandom(5000))


def test_backups_to_several_destinations_each_stay_incremental(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """A USB stick and a server, used in turns: each destination's next backup is a delta
    from the last backup it holds (its snapshot kept on the device), restored exactly;
    a destination holding another device's backup of that name gets a whole one; the
    snapshots kept are each destination's newest, for the KEEP_DESTINATIONS used last."""
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "data")
    usb, server = tmp_path / "usb", tmp_path / "server"
    sums: dict[Path, str] = {}
    got = []
    for dest in (usb, server, usb, server, usb):
        got.append(backup(btrfs_dev, "home", f"file://{dest}" if dest == server else str(dest)))
        sums[dest] = tree_sum(home)
        _edit(home)
    assert [e["file"] for e in got] == ["home.1.stream", "home.2.stream", "home.3.delta",
                                        "home.4.delta", "home.5.delta"]
    assert [e["parent"] for e in got] == [None, None, 1, 2, 3]
    assert all(e["bytes"] < got[0]["bytes"] / 10 for e in got[2:])
    kept = sorted(p.name for p in (btrfs_dev / ".btrdelta/backups/home").iterdir())
    assert kept == ["destinations.json", "home.4", "home.5"]
    for dest, want in sums.items():
        (tmp_path / f"r-{dest.name}").mkdir()
        assert tree_sum(restore_to_dir(str(dest), "home", tmp_path / f"r-{dest.name}")) == want
    # another device's backup 5 of "home" in a destination is no parent for this one's
    index = json.loads((usb / "home.backups.json").read_text())
    shutil.copytree(usb, tmp_path / "foreign")
    index["backups"][-1]["uuid"] = "00000000-0000-0000-0000-000000000000"
    (tmp_path / "foreign/home.backups.json").write_text(json.dumps(index))
    assert backup(btrfs_dev, "home", str(tmp_path / "foreign"))["parent"] is None
    # more destinations than are kept: the one used longest ago starts whole again
    for i in range(KEEP_DESTINATIONS):
        backup(btrfs_dev, "home", str(tmp_path / f"d{i}"))
    assert backup(btrfs_dev, "home", str(usb))["parent"] is None
    assert backup(btrfs_dev, "home", str(tmp_path / "d1"))["parent"] is not None


def test_backup_to_ext4_and_http_restore_elsewhere(btrfs_dev: Path, small_release: Release,
                                                   dav: str) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=STATE)
    home = btrfs_dev / "state/home"
    copy_tree(r.new / "usr/lib/apt", home / "data")
    with loop_fs("ext4", size="256M") as ext4:
        dest = ext4 / "backups"
        first = backup(btrfs_dev, "home", str(dest))
        sums = [tree_sum(home)]
        _edit(home)
        out = btrdelta("device", "backup", btrfs_dev, "home", dest, "--json").stdout
        second = checked("device backup", json.loads(out))
        sums.append(tree_sum(home))
        assert first["file"] == "home.1.stream"
        assert second["file"] == "home.2.delta"
        assert second["parent"] == 1
        assert second["bytes"] < first["bytes"] / 10  # incremental and delta-compressed
        assert [first["tree_sum"], second["tree_sum"]] == sums
        # back onto any filesystem (ext4: directories), and onto a fresh device
        (ext4 / "restored").mkdir()
        got = restore_to_dir(str(dest), "home", ext4 / "restored")
        assert tree_sum(got) == sums[1]
        with loop_fs("btrfs", size="1G") as other:
            device.init(other, r.new, state=STATE)
            out = btrdelta("device", "restore", other, "home", dest, "--json").stdout
            assert tree_sum(other / "state/home") == sums[1] == checked("device restore",
                                                                       json.loads(out))["tree_sum"]
            restore(other, "home", str(dest), upto=1)
            assert tree_sum(other / "state/home") == sums[0]
            (other / "state/home/written").write_text("the restored subvolume is writable\n")
    # the same chain through HTTP PUT/GET (nginx)
    first = backup(btrfs_dev, "home", dav, full=True)
    (home / "later").write_text("x")
    second = backup(btrfs_dev, "home", dav)
    assert second["file"].endswith(".delta")
    with loop_fs("btrfs", size="512M") as other:
        (other / "r").mkdir()
        got = restore_to_dir(dav, "home", other / "r")
        assert tree_sum(got) == tree_sum(home)


def test_init_force_refuses_the_device_the_running_system_booted_from(
        btrfs_dev: Path, small_release: Release, sysroot: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``device init --force`` deletes every root and state subvolume: on the device the
    running system booted from, its / and its overlays' upper layers. Refused with one line
    (nothing touched); from another system (a rescue boot) it lays the device out anew."""
    from btrdelta.device import boot

    device.init(btrfs_dev, small_release.old, state=STATE)
    mount(btrfs_dev, sysroot)
    (sysroot / "etc/local.conf").write_text("local\n")
    monkeypatch.setattr(boot, "RUNNING_ROOT", str(sysroot))  # booted from roots/a
    before = tree_sum(btrfs_dev / "state")
    argv = ["device", "init", str(btrfs_dev), "--factory", str(small_release.new), "--force"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the running system booted from its root a" in err, err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert device.status(btrfs_dev)["default"] == "a"
    assert tree_sum(btrfs_dev / "state") == before
    assert (sysroot / "etc/local.conf").read_text() == "local\n"
    _umount(sysroot)
    monkeypatch.setattr(boot, "RUNNING_ROOT", "/")
    assert main([*argv, "--state", "etc:/etc:overlay"]) == 0
    assert tree_sum(btrfs_dev / "roots/a") == small_release.new_sum
    assert os.listdir(btrfs_dev / "state") == ["etc"]


def test_init_refuses_a_filesystem_whose_default_subvolume_boots_something(
        btrfs_dev: Path, small_release: Release, capsys: pytest.CaptureFixture[str]) -> None:
    """A filesystem whose default subvolume is not the top level boots that subvolume
    (snapper-style root filesystems): `device init` would make roots/a the default and the
    host's next boot would come up in it. Refused with one line, nothing laid out; --force
    takes the filesystem over."""
    subprocess.run(["btrfs", "subvolume", "create", str(btrfs_dev / "@")], check=True,
                   capture_output=True)
    subprocess.run(["btrfs", "subvolume", "set-default", str(btrfs_dev / "@")], check=True)
    argv = ["device", "init", str(btrfs_dev), "--factory", str(small_release.old)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "its default subvolume is not the top level" in err, err
    assert len(err.strip().splitlines()) == 1
    assert progs_default(btrfs_dev) == "@"
    assert not {"roots", "state"} & set(os.listdir(btrfs_dev))  # nothing laid out
    assert main([*argv, "--force", "--state", "etc:/etc:overlay"]) == 0
    assert progs_default(btrfs_dev) == "roots/a"
    assert (btrfs_dev / "@").is_dir()


def test_init_refuses_a_filesystem_that_holds_other_things(
        btrfs_dev: Path, small_release: Release, capsys: pytest.CaptureFixture[str]) -> None:
    """A host's own btrfs whose default subvolume is still the top level (its root mounted
    with ``subvol=@``, as Debian's and Ubuntu's installers lay it out), or a disk holding
    data: `device init` would make roots/a the default and lay the device out beside them.
    Refused with one line naming what is there, nothing laid out, the default unchanged;
    --force lays the device out and keeps what was there."""
    subprocess.run(["btrfs", "subvolume", "create", str(btrfs_dev / "@")], check=True,
                   capture_output=True)
    (btrfs_dev / "@" / "etc").mkdir()
    (btrfs_dev / "notes.txt").write_text("mine\n")
    before = tree_sum(btrfs_dev)
    argv = ["device", "init", str(btrfs_dev), "--factory", str(small_release.old)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is not empty (it holds @, notes.txt)" in err, err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert "ID 5 (FS_TREE)" in subprocess.run(
        ["btrfs", "subvolume", "get-default", str(btrfs_dev)], capture_output=True, text=True,
        check=True).stdout
    assert tree_sum(btrfs_dev) == before  # nothing laid out (not even .btrdelta)
    assert main([*argv, "--force", "--state", "etc:/etc:overlay"]) == 0
    assert progs_default(btrfs_dev) == "roots/a"
    assert (btrfs_dev / "notes.txt").read_text() == "mine\n"
    assert (btrfs_dev / "@" / "etc").is_dir()


def test_a_backup_to_a_btrdelta_serve_url_says_serve_takes_no_put(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """``btrdelta serve`` answers GET and HEAD only: a ``device backup`` to its URL fails
    with one line that says the server takes no PUT (and which server does), exit 7,
    nothing written below the served directory. Its first request is the lock's
    (``docs/device.md`` §7): the stream's PUT, whose 501 came before its whole body was
    sent, is not reached (``tests/transport/test_client.py`` keeps that answer read)."""
    device.init(btrfs_dev, small_release.old, state=STATE)
    www = tmp_path / "www"
    (www / "backups").mkdir(parents=True)
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        server = subprocess.Popen([*BTRDELTA, "serve", str(www), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=logf)
    try:
        _wait_port(port, server)
        url = f"http://127.0.0.1:{port}/backups"
        proc = btrdelta("device", "backup", btrfs_dev, "home", url, check=False)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert proc.returncode == 7, proc.stderr
    assert re.fullmatch(
        rf"btrdelta device backup: error: {url}/home\.backups\.lock\.[0-9a-f]+: DELETE "
        r"answered 501: btrdelta serve answers GET and HEAD only; a backup destination over "
        r"HTTP needs a server taking PUT, MOVE and DELETE and serving GET \(nginx: "
        r"dav_methods PUT MOVE DELETE\)\n", proc.stderr), proc.stderr
    assert list((www / "backups").iterdir()) == []
