"""`replicate` with the receiver, then the sender, killed (SIGKILL) at each durable step:
just before and just after each write of the receiver's `DEST/.btrdelta-partial/meta.json`
(a new transfer, each acknowledged segment, the stream complete) and of its state (the
sendshot named before the final name), and just after each write of the sender's
`cursors.json` (the transfer in flight, its sendshot named before the COMMIT, the commit);
then at each step of the commit, DEST a plain directory and a btrfs: the receiver before
and after each write-out of DEST (as it seals; after the final name, before COMMITTED),
the sender just after its COMMIT went out. The next run completes: the new subvolume
once (a commit the killed run made is adopted, never sent again), equal to the source
(tree-sum), the earlier one untouched, no temporary subvolume or partial transfer left,
the cursor on the committed sendshot with nothing in flight; a change after it goes as an
incremental from it.

The kill is a `sitecustomize` on the child's path that wraps `fs.atomic.write_atomic`
(every one of these files is written through it), `Replica._write_out` or the sending of
a COMMIT, and kills its own process at the N-th call."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.errors import TransportError
from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from btrdelta.update.channels import spawn_local
from btrdelta.update.replica import Replica
from btrdelta.update.replicate import replicate

SEG = 1 << 20

_SHIM = '''
import os, signal
if os.environ.get("BTRDELTA_TEST_BOOT_ID"):  # another boot (after a power cut)
    import btrdelta.update.partial as _partial
    _partial.boot_id = lambda: os.environ["BTRDELTA_TEST_BOOT_ID"]
_spec = os.environ.get("BTRDELTA_TEST_KILL_AT")
if _spec:
    _name, _n, _when = _spec.split(":")
    _seen = [0]
    # SIGSTOP: the test takes the disk as it is then (a power cut), then kills it
    _sig = signal.SIGSTOP if os.environ.get("BTRDELTA_TEST_CUT") == "stop" else signal.SIGKILL

    def _at(hit, when):
        if hit and _when == when:
            os.kill(os.getpid(), _sig)

    def _count(hit):
        if hit:
            _seen[0] += 1
            return _seen[0] == int(_n)
        return False

    if _name == "write-out":  # the receiver's syncfs of DEST (1: at the seal, 2: renamed)
        from btrdelta.update.replica import Replica
        _real_out = Replica._write_out

        def _write_out(self):
            hit = _count(True)
            _at(hit, "before")
            _real_out(self)
            _at(hit, "after")

        Replica._write_out = _write_out
    elif _name in ("COMMIT", "COMMITTED"):  # once that message is on the wire
        from btrdelta.update.channels import MessageIO
        _real_send = MessageIO.send

        def send(self, msg):
            hit = _count(type(msg).__name__.upper() == _name)
            _real_send(self, msg)
            _at(hit, "after")

        MessageIO.send = send
    else:  # a file written through fs.atomic.write_atomic
        import btrdelta.fs.atomic as _atomic
        _real = _atomic.write_atomic

        def write_atomic(path, data, **kw):
            hit = _count(os.path.basename(os.fspath(path)) == _name)
            _at(hit, "before")
            _real(path, data, **kw)
            _at(hit, "after")

        _atomic.write_atomic = write_atomic
'''


@pytest.fixture
def shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "shim"
    d.mkdir()
    (d / "sitecustomize.py").write_text(_SHIM)
    root = Path(__file__).resolve().parents[2]
    path = [str(d), str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    return d


def _visible(dest: Path) -> list[str]:
    return sorted(n for n in os.listdir(dest) if not n.startswith("."))


def _round_one(tmp_path: Path) -> tuple[Path, Path, SendshotStore, str]:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"s{i}").write_bytes(os.urandom(i * 301))
    (src / "big").write_bytes(os.urandom(2 * SEG))
    dest = tmp_path / "dest"
    dest.mkdir()
    store = SendshotStore(tmp_path / "store")
    ch = spawn_local(str(dest))
    assert replicate(src, ch, store=store, segment=SEG).outcome == "committed"
    ch.close()
    [old] = _visible(dest)
    old_sum = tree_sum(dest / old)
    # the second round: new and changed files, three segments or so
    (src / "big2").write_bytes(os.urandom(int(1.5 * SEG)))
    (src / "d" / "s3").write_bytes(b"changed" * 100)
    os.unlink(src / "d" / "s4")
    return src, dest, store, old_sum


def _sender_killed_at(src: Path, dest: Path, store: SendshotStore, point: str) -> None:
    """``btrdelta replicate`` of ``src`` into ``dest``, its sender killed at ``point``."""
    env = {**os.environ, "BTRDELTA_TEST_KILL_AT": point}
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "replicate", str(src), str(dest),
                           "--store", store.path, "--segment", str(SEG), "-q"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr
    _receiver_ended(dest)


def _receiver_ended(dest: Path, timeout: float = 60.0) -> None:
    """Wait until the killed sender's local receiver (its child, left reading the end of
    its stdin) has let go of DEST's lock: a run started before is refused ``busy`` (under
    load, before that receiver even marked its lock "closing"), as it must be."""
    from btrdelta.update.replicalock import LOCK_FILE

    path = dest / LOCK_FILE
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed sender's receiver never ended"
                time.sleep(0.05)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


def _receiver_killed_at(src: Path, dest: Path, store: SendshotStore,
                        monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """``replicate`` of ``src`` into ``dest``, its receiver (a local child) killed at
    ``point``."""
    monkeypatch.setenv("BTRDELTA_TEST_KILL_AT", point)
    ch = spawn_local(str(dest))
    with pytest.raises(TransportError):
        replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert ch.proc is not None
    assert ch.proc.returncode == -9, ch.err  # killed there, not finished


def _completes(src: Path, dest: Path, store: SendshotStore, old_sum: str) -> object:
    """The next run (nothing killed) completes; everything is as after an uncut one: the
    receiver holds the new tree once. (When the killed run's receiver had committed, the
    next run finds it, adopted when the sender had not heard of the commit, and is refused
    ``already-current``: the source is unchanged since, a plain directory's incremental
    carries no change and is not committed.) Then a change goes as an incremental from
    that state, not the whole tree again. Returns what the next run did."""
    os.environ.pop("BTRDELTA_TEST_KILL_AT", None)
    committed = _visible(dest)[1:]
    ch = spawn_local(str(dest))
    res = first = replicate(src, ch, store=store, segment=SEG)
    ch.close()
    if committed:
        assert (res.outcome, res.message.split(":")[0]) == ("refused", "already-current"), res
    else:
        assert (res.outcome, res.adopted) == ("committed", ""), res
    old, new = _visible(dest)  # the new tree once, never twice
    assert tree_sum(dest / old) == old_sum
    assert tree_sum(dest / new) == tree_sum(src)
    assert not [n for n in os.listdir(dest) if n.startswith(".btrdelta-tmp-")]
    assert not (dest / ".btrdelta-partial").exists()
    cursor = store.cursors()[Replica(dest).ident]
    assert not cursor.get("inflight"), cursor
    # pruned: the cursor's record and, a patch record, the bases it is read with
    every = {r.digest: r for r in store.records_list()}
    chain = [cursor["digest"]]
    while every[chain[-1]].head.base is not None:
        chain.append(str(every[chain[-1]].head.base))
    assert sorted(every) == sorted(chain)
    assert cursor["name"] == new, cursor
    held = cursor["digest"]
    (src / "after").write_bytes(b"a" * 3000)
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind, res.base) == ("committed", "incremental", held), res
    assert res.size < SEG // 4, res
    assert _visible(dest) == [old, new, res.name]
    assert tree_sum(dest / res.name) == tree_sum(src)
    return first


#: the receiver's writes in the second round: meta.json at the start (1), after each of the
#: three or so segments (2-4), the stream complete; the state once, before the final name
RECEIVER_POINTS = [("meta.json", 1, "before"), ("meta.json", 1, "after"),
                   ("meta.json", 2, "before"), ("meta.json", 2, "after"),
                   ("meta.json", 3, "after"), ("meta.json", 4, "after"),
                   (".btrdelta-replica.json", 1, "before"),
                   (".btrdelta-replica.json", 1, "after")]


@pytest.mark.parametrize(("name", "n", "when"), RECEIVER_POINTS)
def test_a_receiver_killed_at_each_durable_step(tmp_path: Path, shim: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                name: str, n: int, when: str) -> None:
    src, dest, store, old_sum = _round_one(tmp_path)
    _receiver_killed_at(src, dest, store, monkeypatch, f"{name}:{n}:{when}")
    assert len(_visible(dest)) == 1  # nothing under a final name
    _completes(src, dest, store, old_sum)


#: the sender's cursor writes in the second round: the transfer in flight (1), its
#: sendshot named before the COMMIT (2), the commit (3)
SENDER_POINTS = [("cursors.json", 1, "after"), ("cursors.json", 2, "before"),
                 ("cursors.json", 2, "after"), ("cursors.json", 3, "before"),
                 ("cursors.json", 3, "after")]


@pytest.mark.parametrize(("name", "n", "when"), SENDER_POINTS)
def test_a_sender_killed_at_each_durable_step(tmp_path: Path, shim: Path,
                                              name: str, n: int, when: str) -> None:
    src, dest, store, old_sum = _round_one(tmp_path)
    _sender_killed_at(src, dest, store, f"{name}:{n}:{when}")
    _completes(src, dest, store, old_sum)


@pytest.mark.btrfs
@pytest.mark.parametrize(("n", "when"), [(2, "after"), (3, "before"), (3, "after")])
def test_a_sender_killed_after_its_commit_on_btrfs(tmp_path: Path, shim: Path,
                                                   n: int, when: str) -> None:
    """A writable source subvolume (read from the session's snapshot), the sender killed
    just after the cursor names the sendshot before the COMMIT (2), and after COMMITTED
    around the final cursor (3): the next run resumes or adopts, the cursor right, the
    session's snapshot gone (the final cursor and the snapshot's deletion are concurrent:
    a kill before the deletion leaves a snapshot no cursor names, which the next run
    deletes)."""
    from tests.conftest import btrfs_loop

    with btrfs_loop("400M") as fs:
        live, dest, store = fs / "vol", fs / "dest", SendshotStore(tmp_path / "store")
        old = replicated_subvolume(live, dest, store)
        old_sum = tree_sum(dest / old)
        (live / "more").write_bytes(os.urandom(SEG))
        _sender_killed_at(live, dest, store, f"cursors.json:{n}:{when}")
        _completes(live, dest, store, old_sum)
        subvols = subprocess.run(["btrfs", "subvolume", "list", "-o", str(fs)], check=True,
                                 capture_output=True, text=True).stdout
        assert [ln.split()[-1] for ln in subvols.splitlines() if "dest/" not in ln] == \
            ["vol"], subvols


def replicated_subvolume(live: Path, dest: Path, store: SendshotStore) -> str:
    """A writable subvolume ``live`` (two segments of data) replicated once into a new
    directory ``dest``; the name it has there."""
    subprocess.run(["btrfs", "subvolume", "create", str(live)], check=True,
                   capture_output=True)
    (live / "big").write_bytes(os.urandom(2 * SEG))
    dest.mkdir()
    ch = spawn_local(str(dest))
    assert replicate(live, ch, store=store, segment=SEG).outcome == "committed"
    ch.close()
    [old] = _visible(dest)
    return old


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.btrfs
def test_a_sender_killed_before_its_first_cursor_leaks_no_snapshot(tmp_path: Path,
                                                                   shim: Path) -> None:
    """A first replication of a writable subvolume, the sender killed after it took the
    session's snapshot but before the cursor named it (the first cursor write): the
    snapshot is left; the next run deletes it and commits. Snapshots that are not its own
    stay: another store's, one of a sender still running (a live pid), one of another
    subvolume, one a cursor names."""
    from btrdelta.update.replicate import _store_tag
    from tests.conftest import btrfs_loop

    with btrfs_loop("400M") as fs:
        live, other = fs / "vol", fs / "other"
        for sub in (live, other):
            subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True,
                           capture_output=True)
        (live / "big").write_bytes(os.urandom(2 * SEG))
        dest = fs / "dest"
        dest.mkdir()
        store = SendshotStore(tmp_path / "store")
        _sender_killed_at(live, dest, store, "cursors.json:1:before")
        [leaked] = [n for n in os.listdir(fs) if n.startswith(".btrdelta-replicate-")]
        tag, dead = _store_tag(store).decode(), _dead_pid()
        kept = {f".btrdelta-replicate-{'1' * 16}-{'0' * 8 if tag != '0' * 8 else 'f' * 8}"
                f"-{dead}": live,                                         # another store's
                f".btrdelta-replicate-{'2' * 16}-{tag}-{os.getpid()}": live,  # running
                f".btrdelta-replicate-{'3' * 16}-{tag}-{dead}": other,    # another source
                f".btrdelta-replicate-{'4' * 16}-{tag}-{dead}": live}     # a cursor's
        for name, sub in kept.items():
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(sub), str(fs / name)],
                           check=True, capture_output=True)
        store.edit_cursor("elsewhere", lambda _: (None, {"inflight": {
            "session": "4" * 32, "snapshot": f"/moved/{'4' * 16}/.." + "/" + list(kept)[3]}}))
        ch = spawn_local(str(dest))
        assert replicate(live, ch, store=store, segment=SEG).outcome == "committed"
        ch.close()
        assert tree_sum(dest / _visible(dest)[0]) == tree_sum(live)
        left = sorted(n for n in os.listdir(fs) if n.startswith(".btrdelta-replicate-"))
        assert leaked not in left
        assert left == sorted(kept), left
        for name in kept:
            subprocess.run(["btrfs", "subvolume", "delete", str(fs / name)], check=True,
                           capture_output=True)


def _in_dest(kind: str, tmp_path: Path) -> Iterator[Path]:
    """``tmp_path`` (a plain directory DEST: the directory backend), or a btrfs loop."""
    if kind == "dir":
        yield tmp_path
        return
    from tests.conftest import btrfs_loop

    with btrfs_loop("400M") as fs:
        yield fs


#: the end of a transfer on the receiver: its write-out of DEST (``syncfs``) while it
#: seals the subvolume (1: END acknowledged, before the state names the sendshot and the
#: subvolume its final name), and after the final name (2: before the COMMITTED)
COMMIT_POINTS = [("write-out", 1, "before"), ("write-out", 1, "after"),
                 ("write-out", 2, "before"), ("write-out", 2, "after")]


@pytest.mark.parametrize("kind", ["dir", pytest.param("btrfs", marks=pytest.mark.btrfs)])
@pytest.mark.parametrize(("name", "n", "when"), COMMIT_POINTS)
def test_a_receiver_killed_at_each_step_of_the_commit(tmp_path: Path, shim: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      kind: str, name: str, n: int,
                                                      when: str) -> None:
    """Killed before its final name, the next run resumes the complete transfer (nothing
    sent again but the COMMIT); killed after it, before the sender heard COMMITTED, the
    next run adopts it and sends nothing (the source is unchanged: ``already-current``,
    not a second copy); then a change goes as an incremental from it."""
    for top in _in_dest(kind, tmp_path):
        src, dest, store, old_sum = _round_one(top)
        _receiver_killed_at(src, dest, store, monkeypatch, f"{name}:{n}:{when}")
        assert len(_visible(dest)) == 1 + (n == 2)  # the final name once renamed
        cursor = store.cursors()[Replica(dest).ident]
        assert cursor["inflight"]["sendshot"], cursor  # in doubt: named before the COMMIT
        _completes(src, dest, store, old_sum)


@pytest.mark.parametrize("kind", ["dir", pytest.param("btrfs", marks=pytest.mark.btrfs)])
def test_a_sender_killed_once_its_commit_is_sent(tmp_path: Path, shim: Path,
                                                 kind: str) -> None:
    """The sender killed (SIGKILL) just after its COMMIT went out: the receiver commits and
    its COMMITTED finds no one. The next run adopts the subvolume (the cursor names the
    sendshot in flight), sends nothing, and the receiver holds the new tree once."""
    for top in _in_dest(kind, tmp_path):
        src, dest, store, old_sum = _round_one(top)
        _sender_killed_at(src, dest, store, "COMMIT:1:after")
        # the receiver (a fork of the sender) goes on alone: its lock is free once its
        # conversation is over
        fd = os.open(dest / ".btrdelta-replica.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)
        assert len(_visible(dest)) == 2, _visible(dest)
        _completes(src, dest, store, old_sum)


def test_a_complete_transfer_written_out_is_resumed_after_a_restart(
        tmp_path: Path, shim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the whole stream is applied and DEST written out (before the state names the
    sendshot), the partial transfer says so (``complete``, no boot id): a receiver that
    loses its power there, before its final name, is resumed after the restart with only
    the COMMIT (a meta of an earlier boot is discarded, and its stream sent again whole)."""
    src, dest, store, old_sum = _round_one(tmp_path)
    monkeypatch.setenv("BTRDELTA_TEST_KILL_AT", ".btrdelta-replica.json:1:before")
    ch = spawn_local(str(dest))
    with pytest.raises(TransportError):
        replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert ch.proc is not None
    assert ch.proc.returncode == -9, ch.err
    meta = json.loads((dest / ".btrdelta-partial" / "meta.json").read_text())
    assert (meta["complete"], meta["boot"]) == (True, None), meta
    monkeypatch.delenv("BTRDELTA_TEST_KILL_AT")
    ch = spawn_local(str(dest))
    res = replicate(src, ch, store=store, segment=SEG)
    ch.close()
    assert (res.outcome, res.kind, res.sent) == ("committed", "resume", 0), res
    assert res.resumed_from == res.size, res
    old, new = _visible(dest)
    assert tree_sum(dest / old) == old_sum
    assert tree_sum(dest / new) == tree_sum(src)


@pytest.mark.parametrize("lost", [False, True])
def test_a_resume_trusts_the_record_counter_only_while_it_lasts(
        tmp_path: Path, shim: Path, monkeypatch: pytest.MonkeyPatch, lost: bool) -> None:
    """The count of records a killed receiver applied lives in tmpfs: the next run resumes
    after them. When that counter is gone without a restart (``/dev/shm`` emptied by hand),
    the applied records cannot be counted and the transfer starts again from its first
    byte, never resumed on a wrong count; either way DEST ends with the source's tree."""
    from btrdelta.update.partial import PartialTransfer

    src, dest, store, old_sum = _round_one(tmp_path)
    _receiver_killed_at(src, dest, store, monkeypatch, "meta.json:3:after")
    counter = PartialTransfer(dest, "dir").counter()  # (this DEST's, not another's)
    assert counter is not None
    assert os.path.exists(counter)
    if lost:
        os.unlink(counter)
    res = _completes(src, dest, store, old_sum)
    resumed = res.resumed_from  # type: ignore[attr-defined]
    assert (resumed == 0) if lost else (resumed > SEG // 2), res
