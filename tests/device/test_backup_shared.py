"""Backups into a directory that holds more than this device's backups: another device's
backup of the same name running at the same time, and entries that are not backup files.
Oracles: the tree-sums of the backed-up subvolumes against their restores (``btrfs
receive`` of the kernel's send streams under ``device restore --to-dir``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from btrdelta import device
from btrdelta.device import backup as backup_mod
from btrdelta.device import backuplock
from btrdelta.device.backup import backup, restore_to_dir
from btrdelta.errors import BtrdeltaError
from btrdelta.tree import tree_sum
from tests.conftest import btrfs_loop
from tests.transport.nginx import nginx

from .conftest import BTRDELTA, Release, btrdelta, copy_tree

STATE = ["etc:/etc:overlay", "home:/home:bind"]


def _device(mnt: Path, release: Release, note: str) -> Path:
    device.init(mnt, release.old, state=STATE)
    home = mnt / "state/home"
    copy_tree(release.new / "usr/lib/apt", home / "apt")
    (home / "notes").write_text(note)
    return home


def _dav(workdir: Path, methods: str = "PUT MOVE DELETE") -> contextlib.AbstractContextManager[int]:
    """nginx taking ``methods`` (WebDAV) below ``/backups/`` of ``workdir/www``."""
    (workdir / "www/backups").mkdir(parents=True, exist_ok=True)
    return nginx(workdir / "nginx", f"""listen 127.0.0.1:{{port}}; root {workdir}/www;
        client_max_body_size 0;
        location /backups/ {{ dav_methods {methods}; create_full_put_path on; }}""")


def _held_by_a(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Backups in thread ``A`` stop before their index is written (holding their lock)
    until the second event is set; the first says they stopped."""
    paused, go = threading.Event(), threading.Event()
    real = backup_mod._Store.put_index

    def put_index(self: Any, name: str, entries: list[dict[str, Any]]) -> None:
        if threading.current_thread().name == "A":
            paused.set()
            assert go.wait(60)
        real(self, name, entries)

    monkeypatch.setattr(backup_mod._Store, "put_index", put_index)
    return paused, go


@pytest.mark.parametrize("where", ["directory", "http"])
def test_two_devices_backing_up_one_name_at_once(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Device A's backup of ``home`` stops after its file is put, before its index is
    written; device B's backup of ``home`` to the same place starts meanwhile. Before the
    lock, B took A's number and its file replaced A's: in a directory the index A wrote
    last named B's file with A's tree-sum (A's backup lost: its restore failed its check);
    over HTTP (nginx's WebDAV, where nothing was locked) the index B wrote first was
    replaced by A's (B's entry lost). Now B waits for A's ``home.backups.lock`` (over HTTP
    taken by MOVE with ``Overwrite: F``) and says so once, naming A's PID: the index lists
    both, each restores to its device's tree, no HTTP lock is left."""
    paused, go = _held_by_a(monkeypatch)
    lines: list[str] = []
    files = tmp_path / ("www/backups" if where == "http" else "shared")
    with btrfs_loop(size="2G") as other, \
            _dav(tmp_path) if where == "http" else contextlib.nullcontext(0) as port:
        dest = f"http://127.0.0.1:{port}/backups" if where == "http" else str(files)
        homes = {"A": _device(btrfs_dev, small_release, "device A\n"),
                 "B": _device(other, small_release, "device B\n")}
        want = {k: tree_sum(h) for k, h in homes.items()}
        got: dict[str, Any] = {}

        def run(who: str, fs: Path) -> None:
            try:
                got[who] = backup(fs, "home", dest, on_wait=lines.append)
            except BaseException as exc:  # (seen by the assertions below)
                got[who] = exc

        a = threading.Thread(target=run, args=("A", btrfs_dev), name="A")
        b = threading.Thread(target=run, args=("B", other), name="B")
        a.start()
        assert paused.wait(120)
        b.start()
        b.join(4)  # (B ends here without the lock, or waits for A with it)
        go.set()
        a.join(120)
        b.join(120)
        assert not a.is_alive()
        assert not b.is_alive()
        assert all(isinstance(r, dict) for r in got.values()), got
        index = json.loads((files / "home.backups.json").read_text())
        numbers = {e["n"]: e["tree_sum"] for e in index["backups"]}
        assert numbers == {got["A"]["n"]: want["A"], got["B"]["n"]: want["B"]}, numbers
        left = [] if where == "http" else ["home.backups.lock"]
        assert sorted(os.listdir(files)) == sorted(
            [*(e["file"] for e in index["backups"]), "home.backups.json", *left])
        assert len(lines) == 1
        assert re.fullmatch(rf"waiting for {dest}/home\.backups\.lock, held by PID "
                            rf"{os.getpid()} on '.+' since \d{{4}}-.* UTC", lines[0]), lines
        for who in ("A", "B"):
            out = tmp_path / f"restored-{who}"
            out.mkdir()
            assert tree_sum(restore_to_dir(dest, "home", out, upto=got[who]["n"])) \
                == want[who]


def test_a_directory_named_like_a_backup_file_is_left_alone(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """A directory ``home.7.stream`` and a symlink ``home.8.delta`` in DEST are no backup
    files a cut backup left: the backup neither fails (it failed with EISDIR after writing
    its index, so the device never noted DEST and its next backup was whole) nor removes
    them; an unlisted regular file is still removed."""
    home = _device(btrfs_dev, small_release, "first\n")
    dest = tmp_path / "backups"
    (dest / "home.7.stream").mkdir(parents=True)
    (dest / "home.7.stream/mine").write_text("not a backup\n")
    (dest / "home.8.delta").symlink_to("home.7.stream")
    (dest / "home.9.delta").write_bytes(b"a cut backup's file")
    got = btrdelta("device", "backup", btrfs_dev, "home", dest, "--json")
    assert json.loads(got.stdout)["removed"] == ["home.9.delta"]
    assert (dest / "home.7.stream/mine").read_text() == "not a backup\n"
    assert os.readlink(dest / "home.8.delta") == "home.7.stream"
    (home / "notes").write_text("second\n")
    want = tree_sum(home)
    second = json.loads(btrdelta("device", "backup", btrfs_dev, "home", dest,
                                 "--json").stdout)
    assert (second["parent"], second["file"]) == (1, "home.2.delta"), second
    out = tmp_path / "restored"
    out.mkdir()
    assert tree_sum(restore_to_dir(str(dest), "home", out)) == want


def test_an_http_lock_left_by_a_cut_backup(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock left on the server by this device's backup cut short (its release never
    ran, as at a power cut) is removed by its next backup there, which does not wait; a
    lock another device left is waited for (said once, naming its holder) until it goes."""
    _device(btrfs_dev, small_release, "first\n")
    lock = tmp_path / "www/backups/home.backups.lock"
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        with monkeypatch.context() as m:
            m.setattr(backuplock, "_release", lambda *a: None)
            backup(btrfs_dev, "home", dest)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        lines: list[str] = []
        assert backup(btrfs_dev, "home", dest, on_wait=lines.append)["parent"] == 1
        assert lines == []
        assert not lock.exists()
        assert sorted(os.listdir(lock.parent)) == [
            "home.1.stream", "home.2.delta", "home.backups.json"]
        lock.write_text(json.dumps({"pid": 4242, "host": "other", "since": 1.8e9,
                                    "token": "theirs"}))
        said = threading.Event()

        def wait_line(line: str) -> None:
            lines.append(line)
            said.set()

        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(
            backup(btrfs_dev, "home", dest, on_wait=wait_line)))
        t.start()
        assert said.wait(30)
        assert lines == [f"waiting for {dest}/home.backups.lock, held by PID 4242 on "
                         "'other' since 2027-01-15 08:00:00 UTC"]
        assert t.is_alive()
        lock.unlink()
        t.join(60)
        assert len(got) == 1
        assert got[0]["n"] == 3
        assert not lock.exists()


def test_an_http_lock_taken_by_another_is_not_released_by_the_first(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup's HTTP lock removed by hand while it runs and taken by another device:
    the first backup's release DELETE-d the lock URL whatever it held, so the other
    device's lock went too (rev32). Now the release compares the lock's token with its own
    first: the other's lock stays, and the first says so. Oracles: the lock file on the
    server (nginx's WebDAV), the index, the restored tree."""
    paused, go = _held_by_a(monkeypatch)
    home = _device(btrfs_dev, small_release, "first\n")
    want = tree_sum(home)
    lock = tmp_path / "www/backups/home.backups.lock"
    theirs = json.dumps({"pid": 4242, "host": "other", "since": 1.8e9, "token": "theirs"})
    lines: list[str] = []
    got: list[Any] = []
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        a = threading.Thread(target=lambda: got.append(
            backup(btrfs_dev, "home", dest, on_wait=lines.append)), name="A")
        a.start()
        assert paused.wait(120)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        lock.unlink()  # (by hand)
        lock.write_text(theirs)  # (another device's backup takes it)
        go.set()
        a.join(120)
        assert not a.is_alive()
        assert lock.read_text() == theirs
        assert lines == [f"{dest}/home.backups.lock is no longer this backup's lock (held "
                         "by PID 4242 on 'other' since 2027-01-15 08:00:00 UTC): left to "
                         "its holder"]
        assert sorted(os.listdir(lock.parent)) == [
            "home.1.stream", "home.backups.json", "home.backups.lock"]
        out = tmp_path / "restored"
        out.mkdir()
        assert tree_sum(restore_to_dir(dest, "home", out, upto=got[0]["n"])) == want


def test_a_backup_whose_http_lock_was_taken_writes_no_index(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup whose lock another device took while it sent (its own cut off from the
    server past the lease and broken with ``--break-lock``, or removed by hand): it wrote
    its index over the other's. Now it checks the lock before its index: one error naming
    the holder, the index as the other left it. Oracles: the index and lock files on the
    server (nginx's WebDAV)."""
    home = _device(btrfs_dev, small_release, "first\n")
    theirs = json.dumps({"pid": 4242, "host": "other", "since": 1.8e9, "token": "theirs"})
    sent, go = threading.Event(), threading.Event()
    real = backup_mod._send

    def send(*args: Any) -> Any:
        got = real(*args)
        sent.set()
        assert go.wait(60)
        return got

    lock = tmp_path / "www/backups/home.backups.lock"
    index = lock.parent / "home.backups.json"
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        first = backup(btrfs_dev, "home", dest)
        before = index.read_bytes()
        monkeypatch.setattr(backup_mod, "_send", send)
        (home / "notes").write_text("second\n")
        lines: list[str] = []
        got: list[Any] = []

        def run() -> None:
            try:
                got.append(backup(btrfs_dev, "home", dest, on_wait=lines.append))
            except BaseException as exc:  # (seen below)
                got.append(exc)

        a = threading.Thread(target=run)
        a.start()
        assert sent.wait(120)
        lock.unlink()
        lock.write_text(theirs)
        go.set()
        a.join(120)
        assert not a.is_alive()
        assert isinstance(got[0], BtrdeltaError), got
        held = "held by PID 4242 on 'other' since 2027-01-15 08:00:00 UTC"
        assert str(got[0]) == (
            f"{dest}/home.backups.lock: no longer this backup's lock ({held}: broken with "
            "--break-lock, or removed by hand and taken): nothing more written (the file "
            "this backup put is not in the index)")
        assert lines == [f"{dest}/home.backups.lock is no longer this backup's lock "
                         f"({held}): left to its holder"]
        assert index.read_bytes() == before
        assert [e["n"] for e in json.loads(before)["backups"]] == [first["n"]]
        assert lock.read_text() == theirs


def test_a_stale_http_lock_ends_the_wait_and_break_lock_takes_it(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A lock a device that is gone left on the server was waited for forever (rev32). Its
    holder renews a live lock (a count PUT beside it, every ``RENEW`` s); a lock neither
    changed nor renewed for ``LEASE`` s of the waiter's clock ends the wait in one line
    naming its holder and ``--break-lock`` (exit 1, the lock left), and ``--break-lock``
    takes it. A live holder's lock is not taken with ``--break-lock`` either: the waiter
    waits for its end. (Lease and renewal shortened.) Oracles: the lock and index files
    on the server (nginx's WebDAV), the restored trees."""
    from btrdelta.cli import main

    monkeypatch.setattr(backuplock, "LEASE", 3.0)
    monkeypatch.setattr(backuplock, "RENEW", 0.3)
    home = _device(btrfs_dev, small_release, "first\n")
    lock = tmp_path / "www/backups/home.backups.lock"
    gone = {"pid": 4242, "host": "other", "since": 1.8e9, "token": "theirs"}
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        argv = ["device", "backup", str(btrfs_dev), "home", dest]
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps(gone))
        (lock.parent / "home.backups.lock.theirs").write_text("7\n")  # (renewed once)
        capsys.readouterr()
        t0 = time.monotonic()
        assert main(argv) == 1
        assert time.monotonic() - t0 >= 3.0
        err = capsys.readouterr().err.splitlines()
        held = "held by PID 4242 on 'other' since 2027-01-15 08:00:00 UTC"
        assert err[0] == f"waiting for {dest}/home.backups.lock, {held}"
        assert re.fullmatch(
            rf"btrdelta device backup: error: {dest}/home\.backups\.lock: {held}, not renewed for "
            r"\d+ s \(a live backup renews it every 0.3 s: .*\); if no backup of that name "
            r"runs there, run again with --break-lock to take it", err[1]), err
        assert len(err) == 2
        assert json.loads(lock.read_text()) == gone
        assert sorted(os.listdir(lock.parent)) == ["home.backups.lock",
                                                   "home.backups.lock.theirs"]
        assert main([*argv, "--break-lock"]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err[1].startswith(f"removed {dest}/home.backups.lock ({held}, not renewed "), err
        assert err[1].endswith(" s: --break-lock)"), err
        assert sorted(os.listdir(lock.parent)) == ["home.1.stream", "home.backups.json"]

        # a live holder (device A, stopped before its index while renewing) is waited for
        # by device B's backup with --break-lock
        paused, go = _held_by_a(monkeypatch)
        (home / "notes").write_text("second\n")
        want = tree_sum(home)
        got: list[Any] = []
        a = threading.Thread(target=lambda: got.append(backup(btrfs_dev, "home", dest)),
                             name="A")
        with btrfs_loop(size="2G") as other:
            theirs = tree_sum(_device(other, small_release, "device B\n"))
            a.start()
            assert paused.wait(120)
            threading.Timer(8.0, go.set).start()  # (past two leases)
            t0 = time.monotonic()
            assert main(["device", "backup", str(other), "home", dest, "--break-lock"]) == 0
            assert time.monotonic() - t0 >= 7.0
            a.join(120)
            assert not a.is_alive()
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1, err
            assert err[0].startswith(f"waiting for {dest}/home.backups.lock, held by PID "
                                     f"{os.getpid()} "), err
            index = json.loads((lock.parent / "home.backups.json").read_text())
            assert [(e["n"], e["parent"]) for e in index["backups"]] == [
                (1, None), (2, 1), (3, None)]
            assert got[0]["n"] == 2
            for n, tree in ((2, want), (3, theirs)):
                out = tmp_path / f"restored-{n}"
                out.mkdir()
                assert tree_sum(restore_to_dir(dest, "home", out, upto=n)) == tree
            assert sorted(os.listdir(lock.parent)) == [
                "home.1.stream", "home.2.delta", "home.3.stream", "home.backups.json"]


def test_a_lock_token_that_is_a_path_reaches_nothing_outside_the_lock(
        btrfs_dev: Path, small_release: Release, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A lock's ``token`` is another device's text, put into the URLs of its renewals
    (``NAME.backups.lock.TOKEN``): a stale lock whose token was ``/../work.backups.json``
    made ``--break-lock`` DELETE the index of another backup name beside it (nginx resolves
    the ``..``), and its waits GET it (rev33). A token that is not a plain word is no token:
    the lock is broken, nothing else is touched. Oracles: the files on the server (nginx's
    WebDAV), the restored tree."""
    from btrdelta.cli import main

    monkeypatch.setattr(backuplock, "LEASE", 2.0)
    home = _device(btrfs_dev, small_release, "first\n")
    want = tree_sum(home)
    www = tmp_path / "www/backups"
    lock = www / "home.backups.lock"
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        other = www / "work.backups.json"
        other.write_text('{"backups": []}\n')  # (another name's index)
        lock.write_text(json.dumps({"pid": 4242, "host": "other", "since": 1.8e9,
                                    "token": "/../work.backups.json"}))
        capsys.readouterr()
        assert main(["device", "backup", str(btrfs_dev), "home", dest, "--break-lock"]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err[1].startswith(f"removed {dest}/home.backups.lock (held by PID 4242 "), err
        assert other.read_text() == '{"backups": []}\n'
        assert sorted(os.listdir(www)) == ["home.1.stream", "home.backups.json",
                                           "work.backups.json"]
        out = tmp_path / "restored"
        out.mkdir()
        assert tree_sum(restore_to_dir(dest, "home", out, upto=1)) == want


def test_a_server_taking_no_move_is_refused(btrfs_dev: Path, small_release: Release,
                                           tmp_path: Path) -> None:
    """nginx with ``dav_methods PUT`` only cannot hold a lock (a conditional PUT is no lock
    there: nginx ignores ``If-None-Match``): the backup is refused in one line saying what
    the server must take, exit 7, nothing written on the server."""
    _device(btrfs_dev, small_release, "first\n")
    with _dav(tmp_path, "PUT") as port:
        url = f"http://127.0.0.1:{port}/backups"
        proc = btrdelta("device", "backup", btrfs_dev, "home", url, check=False)
    assert proc.returncode == 7, proc.stderr
    assert re.fullmatch(
        rf"btrdelta device backup: error: {url}/home\.backups\.lock\.[0-9a-f]+: DELETE "
        r"answered 405: a backup destination over HTTP needs a server taking PUT, MOVE and "
        r"DELETE and serving GET \(nginx: dav_methods PUT MOVE DELETE\)\n", proc.stderr)
    assert os.listdir(tmp_path / "www/backups") == []


def test_a_directory_lock_wait_is_said_and_ctrl_c_ends_it(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """A backup into a directory whose lock another backup holds says so after about a
    second, naming the holder (before: nothing, it looked hung), and a Ctrl-C ends the wait
    (exit 130, nothing written); with the lock released it goes on."""
    _device(btrfs_dev, small_release, "first\n")
    dest = tmp_path / "backups"
    dest.mkdir()
    argv = [*BTRDELTA, "device", "backup", str(btrfs_dev), "home", str(dest)]
    with open(dest / "home.backups.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(json.dumps({"pid": 4242, "host": "other", "since": 1.8e9}))
        held.flush()
        for stop in (True, False):
            with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) as proc:
                t0 = time.monotonic()
                assert proc.stderr is not None
                ready = select.select([proc.stderr], [], [], 30)[0]
                if not ready:
                    proc.kill()
                assert ready, "no line while waiting"
                line = proc.stderr.readline()
                assert 0.9 < time.monotonic() - t0 < 30
                assert line == f"waiting for {dest}/home.backups.lock, held by PID 4242 " \
                    "on 'other' since 2027-01-15 08:00:00 UTC\n"
                if stop:
                    proc.send_signal(signal.SIGINT)
                    out, err = proc.communicate(timeout=30)
                    assert proc.returncode == 130, err
                    assert sorted(os.listdir(dest)) == ["home.backups.lock"]
                else:
                    fcntl.flock(held, fcntl.LOCK_UN)
                    out, err = proc.communicate(timeout=120)
                    assert proc.returncode == 0, err
                    assert out.startswith("backup 1 of home: home.1.stream (whole")


def test_numbers_skip_entries_of_any_type(btrfs_dev: Path, small_release: Release,
                                          tmp_path: Path) -> None:
    """A directory ``home.1.stream`` and a dangling symlink ``home.2.delta`` in DEST take
    their numbers: the first backup is number 3 (before: number 1, which failed on the
    directory after its snapshot was taken)."""
    home = _device(btrfs_dev, small_release, "first\n")
    dest = tmp_path / "backups"
    (dest / "home.1.stream").mkdir(parents=True)
    (dest / "home.2.delta").symlink_to("nowhere")
    got = json.loads(btrdelta("device", "backup", btrfs_dev, "home", dest, "--json").stdout)
    assert (got["n"], got["file"]) == (3, "home.3.stream")
    out = tmp_path / "restored"
    out.mkdir()
    assert tree_sum(restore_to_dir(str(dest), "home", out)) == tree_sum(home)


def test_a_lock_that_is_no_regular_file_is_named(btrfs_dev: Path, small_release: Release,
                                                tmp_path: Path) -> None:
    """DEST (a USB stick: untrusted) whose ``home.backups.lock`` is a FIFO, a symlink or a
    directory: the backup is refused in one line naming that path, exit 3, before anything
    is written there (a FIFO said only 'error: [Errno 22] Invalid argument', exit 1), and
    the symlink's target is not touched. Oracle: DEST's listing, the target's bytes."""
    _device(btrfs_dev, small_release, "first\n")
    target = tmp_path / "target"
    target.write_text("mine\n")
    for kind, make in (("fifo", os.mkfifo), ("symlink", lambda p: p.symlink_to(target)),
                       ("directory", os.mkdir)):
        dest = tmp_path / kind
        dest.mkdir()
        lock = dest / "home.backups.lock"
        make(lock)
        proc = subprocess.run([*BTRDELTA, "device", "backup", str(btrfs_dev), "home",
                               str(dest)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, proc
        assert proc.stderr == (f"btrdelta device backup: error: {lock}: not a regular file "
                               "(a backup's lock must be one)\n")
        assert os.listdir(dest) == ["home.backups.lock"]
    assert target.read_text() == "mine\n"


def test_a_backup_replaces_no_backup_file_over_http(btrfs_dev: Path, small_release: Release,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTP a file of a backup's number already on the server is never replaced. One
    that a backup cut short put before its index takes its number (the backup is the next
    one). One that appears after the number was chosen (another device's backup of that
    number, put while this backup's lock was broken: rev33) makes the backup fail in one
    line, its index not written, no part file left; before, its PUT replaced the other's
    file. Oracles: the files on the server (nginx's WebDAV), the restored tree."""
    home = _device(btrfs_dev, small_release, "first\n")
    www = tmp_path / "www/backups"
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        (www / "home.1.stream").write_bytes(b"left by a backup cut short\n")
        got = backup(btrfs_dev, "home", dest)
        assert (got["n"], got["file"]) == (2, "home.2.stream")
        out = tmp_path / "restored"
        out.mkdir()
        assert tree_sum(restore_to_dir(dest, "home", out)) == tree_sum(home)
        index = (www / "home.backups.json").read_bytes()
        theirs = b"another device's backup number 3\n"
        real = backup_mod._send

        def send(*args: Any) -> Any:  # (after this backup chose its number)
            for kind in ("stream", "delta"):
                (www / f"home.3.{kind}").write_bytes(theirs)
            return real(*args)

        monkeypatch.setattr(backup_mod, "_send", send)
        (home / "notes").write_text("second\n")
        with pytest.raises(BtrdeltaError) as caught:
            backup(btrfs_dev, "home", dest)
        assert re.fullmatch(
            rf"{re.escape(dest)}/home\.3\.(stream|delta): another backup put a file of this "
            r"number meanwhile \(this backup's lock was broken or removed while it sent\): "
            r"left as it is, nothing more written", str(caught.value)), str(caught.value)
        assert (www / "home.backups.json").read_bytes() == index
        assert {p.name: p.read_bytes() for p in www.glob("home.3.*")} == {
            "home.3.stream": theirs, "home.3.delta": theirs}
        assert not list(www.glob("*.part"))


def test_a_damaged_destinations_file_is_read_as_none(btrfs_dev: Path, small_release: Release,
                                                     tmp_path: Path) -> None:
    """The device's note of the destinations its backups went to
    (``backups/NAME/destinations.json``), damaged as a bad disk leaves a JSON file (a
    number past a float's range, arrays nested past Python's recursion limit): read as
    none, as a damaged file always was (it only says which snapshots other destinations'
    next backups start from); it was an internal error (OverflowError, RecursionError) of
    every backup. Oracle: the restore's tree-sum."""
    home = _device(btrfs_dev, small_release, "first\n")
    dest = tmp_path / "backups"
    btrdelta("device", "backup", btrfs_dev, "home", dest)
    (note,) = btrfs_dev.rglob("destinations.json")
    for i, damaged in enumerate(['{"destinations": {"x": 1e400}}', "[" * 100_000]):
        note.write_text(damaged)
        (home / "notes").write_text(f"change {i}\n")
        btrdelta("device", "backup", btrfs_dev, "home", dest)
        out = tmp_path / f"restored-{i}"
        out.mkdir()
        assert tree_sum(restore_to_dir(str(dest), "home", out)) == tree_sum(home)


def test_a_damaged_note_of_this_devices_locks_is_read_as_none(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """The device's note of its HTTP locks (``.btrdelta/backup-locks.json``) damaged:
    arrays nested past the recursion limit were an internal error of every backup over
    HTTP (json's RecursionError, fuzz33); now read as none, as any damaged note (a lock of
    this device left on a server is then waited for as another's). Oracles: the files on
    the server (nginx's WebDAV), the restored tree."""
    home = _device(btrfs_dev, small_release, "first\n")
    notes = btrfs_dev / ".btrdelta" / "backup-locks.json"
    notes.write_text("[" * 100_000)
    with _dav(tmp_path) as port:
        dest = f"http://127.0.0.1:{port}/backups"
        proc = subprocess.run([*BTRDELTA, "device", "backup", str(btrfs_dev), "home", dest,
                               "-q"], capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stderr) == (0, ""), proc
        assert sorted(os.listdir(tmp_path / "www/backups")) == [
            "home.1.stream", "home.backups.json"]
        out = tmp_path / "restored"
        out.mkdir()
        assert tree_sum(restore_to_dir(dest, "home", out)) == tree_sum(home)
