"""`btrdelta replicate SOURCE DEST --every INTERVAL` through the CLI: one process replicating a
live subvolume round after round while it changes (each round's subvolume at the receiver
equal, by tree-sum, to the source as the round found it), a round cut by the receiver's end
and resumed at the next tick, SIGTERM between rounds and during one (the transfer resumed
by a one-shot run after it), 50 rounds with RSS and open descriptors bounded.

The rounds are kept in step with the test's changes by stopping the loop (SIGSTOP) as soon
as it printed a round's JSON line, changing the source, and letting it go on (SIGCONT): the
next round sees the whole change."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from btrdelta.testing.loopfs import run as sh
from btrdelta.tree import tree_sum
from tests.conftest import Children, btrfs_loop
from tests.jsondoc import checked

BTRDELTA = [sys.executable, "-m", "btrdelta"]


@pytest.fixture
def fs() -> Iterator[Path]:
    """A loop-mounted btrfs: ``live`` (a subvolume, the source) and ``dest``."""
    with btrfs_loop("512M") as mnt:
        sh("btrfs", "-q", "subvolume", "create", str(mnt / "live"))
        (mnt / "dest").mkdir()
        yield mnt


def _loop(children: Children, src: Path, dest: str, store: Path, *flags: str
          ) -> subprocess.Popen[str]:
    return children.start([*BTRDELTA, "replicate", "--json", "--store", str(store), *flags,
                           str(src), dest], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _next(proc: subprocess.Popen[str], stop: bool = True) -> dict[str, Any]:
    """The loop's next round (its JSON line, keys checked); the loop stopped after it."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if stop:
        os.kill(proc.pid, signal.SIGSTOP)
    assert line, proc.stderr.read() if proc.stderr else "the loop exited"
    got: dict[str, Any] = checked("replicate --every", json.loads(line))
    return got


def _go(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGCONT)


def _acked(dest: Path, at_least: int, timeout: float = 60) -> None:
    """Until the receiver in DEST acknowledged ``at_least`` bytes of its partial transfer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if json.loads((dest / ".btrdelta-partial" / "meta.json").read_text()).get(
                    "offset", 0) >= at_least:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"nothing acknowledged in {dest}")


def _leftovers(mnt: Path) -> list[str]:
    return [n for n in os.listdir(mnt) if n.startswith(".btrdelta-replicate-")]


def _change(live: Path, i: int) -> None:
    """A change of every kind a round has to carry."""
    (live / f"new{i}").write_bytes(os.urandom(5000 + i))
    with open(live / "grows", "ab") as f:
        f.write(os.urandom(70000))
    if i > 1:
        os.rename(live / f"new{i - 1}", live / f"moved{i}")
        os.link(live / f"moved{i}", live / f"link{i}")
        os.setxattr(live / f"moved{i}", "user.round", str(i).encode())
    if i > 2:
        os.unlink(live / f"link{i - 1}")
        os.truncate(live / "grows", 12345 * i)


@pytest.mark.btrfs
def test_rounds_follow_a_live_subvolume_and_a_one_shot_run_follows(
        fs: Path, children: Children) -> None:
    live, dest, store = fs / "live", fs / "dest", fs / "store"
    _change(live, 0)
    # (a round takes 0.1-0.3 s: the loop sleeps when the test stops it)
    proc = _loop(children, live, str(dest), store, "--every", "1.5s")
    first = _next(proc)
    assert (first["round"], first["outcome"], first["kind"]) == (1, "committed", "full")
    assert tree_sum(dest / first["name"]) == tree_sum(live)
    names = {first["name"]}
    for i in range(1, 5):
        _change(live, i)
        _go(proc)
        got = _next(proc)
        assert (got["round"], got["outcome"], got["kind"]) == (i + 1, "committed",
                                                               "incremental"), got
        assert got["exit_code"] == 0
        assert got["seconds"] > 0
        assert got["cpu_seconds"] > 0
        # the receiver's subvolume (btrdelta's receive on btrfs) is the round's source
        assert tree_sum(dest / got["name"]) == tree_sum(live), i
        names.add(got["name"])
    _go(proc)  # nothing written since: the receiver is current
    same = _next(proc)
    assert same["outcome"] == "refused"
    assert same["message"].startswith("already-current")
    _go(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None
    assert proc.stderr.read().splitlines()[-1].startswith("replicate: stopped after ")
    assert not _leftovers(fs)  # (the session snapshots deleted after each commit)
    assert {n for n in os.listdir(dest) if not n.startswith(".")} == names
    # a one-shot run goes on from the loop's last sendshot and cursor
    _change(live, 5)
    one = subprocess.run([*BTRDELTA, "replicate", "--json", "--store", str(store), str(live),
                          str(dest)], capture_output=True, text=True, timeout=120, check=True)
    shot = json.loads(one.stdout)
    assert (shot["kind"], shot["base"]) == ("incremental", got["sendshot"])
    assert tree_sum(dest / shot["name"]) == tree_sum(live)


def _listener(children: Children, dest: Path, port: int) -> subprocess.Popen[str]:
    proc = children.start([*BTRDELTA, "replicate", "--listen", f"127.0.0.1:{port}",
                           "--no-auth", str(dest)], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("replicate: listening on")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_until(stream: IO[str], want: str) -> str:
    while (line := stream.readline()) and want not in line:
        pass
    return line


@pytest.mark.btrfs
def test_a_round_cut_at_the_receiver_resumes_at_the_next_tick(
        fs: Path, children: Children) -> None:
    """The receiver (``--listen`` over TCP) is killed in the middle of a round: the round is
    one failed line (exit code 7 of a one-shot run), retried after the backoff while no
    receiver listens, then, with one listening again, resumed after what was acknowledged
    and committed; the receiver's subvolume is the source."""
    live, dest, store = fs / "live", fs / "dest", fs / "store"
    (live / "big").write_bytes(os.urandom(24 << 20))
    port = _free_port()
    rcv = _listener(children, dest, port)
    proc = _loop(children, live, f"tcp://127.0.0.1:{port}", store, "--every", "1h",
                 "--no-auth", "--segment", "1M", "--rate-limit", "4M")
    assert proc.stdout is not None
    _acked(dest, 4 << 20)
    rcv.kill()
    rcv.wait()
    cut = _next(proc, stop=False)
    assert (cut["round"], cut["outcome"], cut["exit_code"]) == (1, "failed", 7), cut
    assert 0 < cut["next_in"] <= 1.0
    again = _next(proc, stop=False)  # (no receiver: refused at once, the backoff doubled)
    assert (again["round"], again["outcome"], again["next_in"]) == (2, "failed", 2.0), again
    _listener(children, dest, port)
    while (done := _next(proc, stop=False))["outcome"] == "failed":  # (a slow listener)
        assert (done["exit_code"], done["next_in"] <= 8) == (7, True), done
    os.kill(proc.pid, signal.SIGSTOP)
    assert (done["outcome"], done["kind"]) == ("committed", "resume"), done
    assert done["resumed_from"] >= 4 << 20
    assert done["next_in"] > 3000  # (back to the interval)
    assert tree_sum(dest / done["name"]) == tree_sum(live)
    _go(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.mark.btrfs
@pytest.mark.parametrize("group", [False, True], ids=["loop", "loop-and-receiver"])
def test_sigterm_in_a_round_leaves_it_resumable_and_in_a_sleep_stops_at_once(
        fs: Path, children: Children, group: bool) -> None:
    """SIGTERM to the loop alone (systemd's ``KillMode=mixed``), or to the loop and its
    forked local receiver at once (the default, ``control-group``)."""
    live, dest, store = fs / "live", fs / "dest", fs / "store"
    (live / "big").write_bytes(os.urandom(16 << 20))
    proc = _loop(children, live, str(dest), store, "--every", "1h", "--segment", "1M",
                 "--rate-limit", "4M")
    _acked(dest, 1 << 20)  # in the round's stream
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(kids) == 1  # (the receiver)
    if group:
        os.kill(int(kids[0]), signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None
    assert "round 1: interrupted; stopped" in proc.stderr.read()
    # the session's snapshot is kept, named in the cursor, for the resume
    assert len(_leftovers(fs)) == 1
    assert (dest / ".btrdelta-partial").is_dir()
    one = subprocess.run([*BTRDELTA, "replicate", "--json", "--store", str(store), str(live),
                          str(dest)], capture_output=True, text=True, timeout=120, check=True)
    shot = json.loads(one.stdout)
    assert (shot["kind"], shot["outcome"]) == ("resume", "committed")
    assert shot["resumed_from"] > 0
    assert tree_sum(dest / shot["name"]) == tree_sum(live)
    assert not _leftovers(fs)
    # a loop asleep for an hour stops at once, exit 0
    proc = _loop(children, live, str(dest), store, "--every", "1h")
    assert _next(proc, stop=False)["outcome"] == "refused"  # (already current)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - t < 5


def _rss_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_fifty_rounds_keep_memory_and_descriptors_bounded(tmp_path: Path,
                                                          children: Children) -> None:
    """A plain directory changed between rounds (a round a commit: a walk, a stream, a
    record, a forked receiver; one that took so long that the next began at once finds
    nothing changed): RSS and open descriptors of the loop asleep in rounds 36-50 as in
    rounds 6-20; SIGTERM then stops it (the collection after each round once swallowed it:
    an exception raised in a weakref callback is dropped)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(3000 * i))
    # (a round takes 0.1-0.4 s: most are sampled asleep)
    proc = _loop(children, src, str(dest), tmp_path / "store", "--every", "0.5s")
    seen: dict[int, tuple[int, int]] = {}
    for n in range(1, 51):
        got = _next(proc, stop=False)
        assert (got["round"], got["exit_code"]) == (n, 0), got
        assert got["outcome"] == "committed" or got["message"].startswith("already-current")
        if got["next_in"] > 0.1:  # (a round that took less than 0.4 s: it sleeps)
            time.sleep(0.05)
            os.kill(proc.pid, signal.SIGSTOP)
            seen[n] = _rss_fds(proc.pid)
            # (changed while it sleeps: a plain directory changed during a round's walk
            # fails that round, "file changed while sending")
            (src / f"f{n % 40}").write_bytes(os.urandom(4000 + n))
            _go(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # (the signal not lost in the collection)
    early = [v for n, v in seen.items() if 6 <= n <= 20]
    late = [v for n, v in seen.items() if 36 <= n <= 50]
    assert early, seen
    assert late, seen
    assert min(f for _r, f in early) == min(f for _r, f in late)
    # (KiB; 24.3 MB at rest from round 5 to 40 on this tree; before the loop collected
    # each round's cyclic garbage, a send's hasher and its buffers among it, 29 MB at round
    # 4 and 94 MB at round 36: the CLI's collections are rare)
    rss_early, rss_late = max(r for r, _f in early), max(r for r, _f in late)
    assert rss_late - rss_early < 16 << 10, sorted(seen.items())
    names = sorted(n for n in os.listdir(dest) if not n.startswith("."))
    assert len(names) >= len(seen)


def test_every_is_a_sender_option_with_an_interval(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    bad = subprocess.run([*BTRDELTA, "replicate", "--every", "soon", str(tmp_path),
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "not an interval: 'soon'" in bad.stderr
    # (past ~292 years the wait after the first round was an internal error: OverflowError)
    (tmp_path / "src").mkdir()
    (tmp_path / "src/f").write_text("x")
    for far in ("200000d", "1e10"):
        bad = subprocess.run([*BTRDELTA, "replicate", "--every", far, "--store",
                              str(tmp_path / "store"), str(tmp_path / "src"),
                              str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2, bad
        assert f"not an interval: '{far}' (more than 0, at most 100 years" in bad.stderr
    assert not os.listdir(tmp_path / "d")
    serve = subprocess.run([*BTRDELTA, "replicate", "--every", "5m", "--serve",
                            str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert serve.returncode == 2
    assert serve.stderr.count("\n") == 1
    assert "--every is the sending side's" in serve.stderr
    helped = subprocess.run([*BTRDELTA, "replicate", "--help"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert "--every INTERVAL" in helped
    assert "systemd" in helped


def test_ctrl_c_between_rounds_stops_at_once_with_exit_0(tmp_path: Path,
                                                          children: Children) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "f").write_bytes(os.urandom(10000))
    proc = _loop(children, src, str(dest), tmp_path / "store", "--every", "1h")
    assert _next(proc, stop=False)["outcome"] == "committed"
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - t < 5
    assert proc.stderr is not None
    assert proc.stderr.read().splitlines() == ["replicate: stopped after 1 round(s)"]


def test_a_round_that_meets_a_full_disk_says_a_one_shot_runs_exit_code(
        tmp_path: Path, children: Children) -> None:
    """The sendshot store on a full file system (a 256 KiB tmpfs): the round fails with the
    exit code a one-shot run has for it, 8 (no space), not 1; the loop goes on, and a
    SIGTERM stops it (exit 0)."""
    from tests.conftest import require_btrfs

    require_btrfs()  # (root: a mount)
    src, dest, small = tmp_path / "src", tmp_path / "dest", tmp_path / "small"
    for d in (src, dest, small):
        d.mkdir()
    (src / "f").write_bytes(os.urandom(9000))
    sh("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small))
    try:
        with open(small / "filler", "wb", buffering=0) as f:
            while f.write(b"\1" * 4096) and os.statvfs(small).f_bfree:
                pass
        proc = _loop(children, src, str(dest), small / "store", "--every", "1h")
        got = _next(proc, stop=False)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        sh("umount", str(small))
    assert got["outcome"] == "failed", got
    assert "No space left on device" in got["message"], got
    assert got["exit_code"] == 8, got


def test_a_signal_noted_just_before_the_wait_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's handler only notes a signal between rounds; one that is handled after the
    loop looked at the note but before its wait's wakeup socket was in place (the final CI:
    a SIGTERM sent as the loop began its hour's sleep, not seen for 30 s) ends the wait at
    once: the wait asks ``stopped`` again once the socket is there."""
    from btrdelta.cli.replicate_cmd import wait_signalled

    noted: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, _frame: noted.append(signum))
    pair = socket.socketpair

    def late(*args: Any) -> Any:  # (the signal comes while the wait sets itself up)
        signal.raise_signal(signal.SIGUSR1)
        return pair(*args)

    monkeypatch.setattr(socket, "socketpair", late)
    began = time.monotonic()
    try:
        assert wait_signalled(timeout=20, stopped=lambda: bool(noted)) is False
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert noted == [signal.SIGUSR1]
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raised_in_a_finalizer_still_stops_the_round(
        tmp_path: Path, children: Children, sig: signal.Signals) -> None:
    """A signal whose handler runs in a round while Python runs a finalizer (here a ``gc``
    callback at a collection as the round begins): the loop's handler raised, Python
    dropped the exception ("Exception ignored in ...") and the round ran on to its end
    (here 20 s later) before the loop stopped. The loop's handler is one the CLI sends a
    dropped signal again for (as a one-shot command's, intr32): the round stops at once,
    as a round a signal stops (SIGTERM exit 0, Ctrl-C 130), nothing received."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "f").write_bytes(os.urandom(10000))
    code = f"""
import gc, signal, sys, time
import btrdelta.cli.replicate_cmd as cmd
def collected(phase, info):
    if phase == "start":
        gc.callbacks.remove(collected)
        signal.raise_signal({int(sig)})
real = cmd.replicate_round
def replicate_round(*args):
    gc.callbacks.append(collected)
    gc.collect()
    time.sleep(20)  # (the round goes on working: the signal has to end it)
    return real(*args)
cmd.replicate_round = replicate_round
sys.argv = ["btrdelta", "replicate", "--store", {str(tmp_path / "store")!r}, "--every", "1h",
            {str(src)!r}, {str(dest)!r}]
from btrdelta.__main__ import entry
entry()
"""
    start = time.monotonic()
    proc = children.start([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (
        130 if sig == signal.SIGINT else 0, b"",
        b"replicate round 1: interrupted; stopped (the next run resumes the transfer)\n")
    assert time.monotonic() - start < 15
    assert [n for n in os.listdir(dest) if not n.startswith(".")] == []
