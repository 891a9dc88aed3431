"""One rule for a command ended by a signal: its clean-up runs as on Ctrl-C, one line
(``btrdelta CMD: interrupted``), exit 128 + the signal's number (SIGINT 130, SIGTERM 143,
SIGHUP 129), in each family of commands: a stream read (``dump``), a stream written
(``send``), a tree hashed (``tree-sum``), the receiving side of replication (``replicate
--listen``); ``receive`` in tests/receive/test_signals.py, ``update`` in
tests/update/test_update_http.py. A signal ignored when the command started (``nohup``)
stays ignored. (The servers, ``serve`` and ``image nbd``/``mount``, stop on these signals
as their normal end: exit 0, their tests.)

The signal is sent once the command is blocked where it works (its main thread in a pipe
read or write, ``/proc/PID/wchan``; the listener after its first line): before that the
interpreter may not have reached the command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from btrdelta.stream.records import End, Mkfile, Subvol, Write
from tests.conftest import Children
from tests.receive.helpers import stream_bytes

SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]


def _as_in_a_terminal(ignored: signal.Signals | None = None) -> Callable[[], None]:
    """The three signals at their default in the child (a test run started in the
    background by a non-interactive shell inherits SIGINT ignored, and Python then sets no
    Ctrl-C handler; one started under ``nohup`` inherits SIGHUP ignored, and the command
    rightly keeps ignoring it); ``ignored`` set to SIG_IGN, as ``nohup`` does with SIGHUP."""

    def child() -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if ignored is not None:
            signal.signal(ignored, signal.SIG_IGN)

    return child


def _blocked_in(proc: subprocess.Popen[bytes], where: str) -> None:
    """Until ``proc``'s main thread waits in the kernel function ``where``."""
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.returncode
        with open(f"/proc/{proc.pid}/wchan") as f:
            if where in f.read():
                return
        assert time.monotonic() < deadline, f"never blocked in {where}"
        time.sleep(0.02)


def _stream() -> bytes:
    writes = [Write(path=b"f", offset=i << 15, data=b"x" * (1 << 15)) for i in range(8)]
    return stream_bytes([Subvol(path=b"sv", uuid=uuid.uuid4(), ctransid=7),
                         Mkfile(path=b"f", ino=257), *writes, End()])


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_stream_read(sig: signal.Signals, children: Children) -> None:
    data = _stream()
    proc = children.start([sys.executable, "-m", "btrdelta", "dump", "-"],
                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, preexec_fn=_as_in_a_terminal())
    assert proc.stdin is not None
    proc.stdin.write(data[:-100])
    proc.stdin.flush()
    _blocked_in(proc, "pipe_read")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err == b"btrdelta dump: interrupted\n"


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_stream_written(tmp_path: Path, sig: signal.Signals, children: Children) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(4 << 20))  # more than a pipe holds
    proc = children.start([sys.executable, "-m", "btrdelta", "send", str(tree)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=_as_in_a_terminal())
    _blocked_in(proc, "pipe_write")  # nobody reads the stream
    proc.send_signal(sig)
    assert proc.stdout is not None
    assert proc.stderr is not None
    err = proc.stderr.readline()  # (then its exit flushes the stream's last bytes: unread)
    proc.stdout.close()
    err += proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + sig, err
    assert err == b"btrdelta send: interrupted\n"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="tree-sum hashes in worker threads only with 2 CPUs or more")
def test_a_tree_hashed_while_a_thread_hashes_a_huge_file(tmp_path: Path,
                                                         children: Children) -> None:
    """``tree-sum`` of a tree holding a sparse file of 1 TiB, which a worker thread hashes
    (minutes of zeros): the signal ends the command within a few MiB of hashing, not when
    the file is hashed (until session 17 it waited for that; ``send --record``: the next
    test). With one CPU allowed (``taskset``) there is no worker thread (``treesum._WORKERS``):
    it failed there every time, waiting for the main thread to wait on one."""
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "huge", "wb") as f:
        f.truncate(1 << 40)
    proc = children.start([sys.executable, "-m", "btrdelta", "tree-sum", str(tree)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=_as_in_a_terminal())
    _blocked_in(proc, "futex")  # the walk done, it waits for the hashing thread
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (143, b"", b"btrdelta tree-sum: interrupted\n")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_send_record_of_a_huge_sparse_file(tmp_path: Path, children: Children) -> None:
    """``send --record`` of a tree holding a sparse file of 8 TiB (its record's digest hashes
    the holes by length: ~3 s of CPU a TiB in session 25, so the send still runs after the
    1.5 s of CPU the test waits for on a machine several times faster; 1 TiB left a factor
    of 2): the signal, once the hashing runs, ends the command with nothing left (no
    stream, no record, no temporary file). The bound:
    the hashing stops within a MiB of BLAKE3 or 16 GiB of holes hashed by length (~0.1 s
    on an idle core, ~1 s at load 10), then the clean-up: 30 s covers a load of 20; until
    session 18 the hashing thread finished the file first (a 64 GiB file: 40 s)."""
    tree, store, tmp = tmp_path / "tree", tmp_path / "store", tmp_path / "tmp"
    tree.mkdir()
    tmp.mkdir()
    with open(tree / "huge", "wb") as f:
        f.truncate(8 << 40)  # (ext4's largest: 16 TiB)
    (tree / "small").write_bytes(b"x")
    out = tmp_path / "out.stream"
    proc = children.start([sys.executable, "-m", "btrdelta", "send", str(tree), "-o",
                           str(out), "--record", "--store", str(store), "-q"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "TMPDIR": str(tmp)},
                          preexec_fn=_as_in_a_terminal())
    deadline = time.monotonic() + 60
    while _cpu_seconds(proc.pid) < 1.5:  # past start-up: hashing the file
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never started hashing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    out_, err = proc.communicate(timeout=30)
    took = time.monotonic() - start
    assert (proc.returncode, out_, err) == (143, b"", b"btrdelta send: interrupted\n"), took
    assert not out.exists()
    assert not list((store / "records").iterdir()) if (store / "records").exists() else True
    assert not list(tmp.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listener(children: Children, prelude: str, dest: Path) -> subprocess.Popen[bytes]:
    """``replicate --listen`` on a free loopback port into ``dest``, in a Python that runs
    ``prelude`` first."""
    code = prelude + "sys.argv[0] = 'btrdelta'\nfrom btrdelta.__main__ import entry\nentry()\n"
    return children.start([sys.executable, "-c", code, "replicate", "--listen",
                           f"127.0.0.1:{_free_port()}", "--no-auth", str(dest)],
                          stderr=subprocess.PIPE, preexec_fn=_as_in_a_terminal())


@pytest.mark.parametrize("sig", SIGNALS)
def test_the_receiving_side_of_replication(tmp_path: Path, sig: signal.Signals,
                                           children: Children) -> None:
    port = _free_port()
    proc = children.start([sys.executable, "-m", "btrdelta", "replicate", "--listen",
                           f"127.0.0.1:{port}", "--no-auth", str(tmp_path)],
                          stderr=subprocess.PIPE, preexec_fn=_as_in_a_terminal())
    assert proc.stderr is not None
    assert b"listening" in proc.stderr.readline()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err == b"btrdelta replicate: interrupted\n"


def _tasks(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


def _names(pid: int) -> list[str]:
    names = []
    for tid in _tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def test_the_listener_waits_with_no_thread_of_its_own(tmp_path: Path,
                                                      children: Children) -> None:
    """A new DEST's state file is made durable by a thread (``Replica``); the listener waits
    for it before it listens. Else a signal sent while it still ran could be lost (CPython
    3.11: the thread taking the GIL resets the main thread's signal check, which then stays
    in ``accept()``; a fresh-clone CI run timed out so at load 11-14). The DEST's ``fsync``
    is made slow here, so the thread outlives the start without the wait."""
    code = ("import os, sys, time\n"
            "fsync = os.fsync\n"
            "def slow(fd):\n"
            "    time.sleep(0.5)\n"
            "    fsync(fd)\n"
            "os.fsync = slow\n")
    proc = _listener(children, code, tmp_path)
    assert proc.stderr is not None
    try:
        assert b"listening" in proc.stderr.readline()
        # a joined thread can still be leaving the kernel for a moment after its Python
        # part ended (it holds no GIL then): wait for that, not for one that still runs
        tasks = _tasks(proc.pid)
        for _ in range(40):
            if tasks == [str(proc.pid)]:
                break
            time.sleep(0.05)
            tasks = _tasks(proc.pid)
        assert tasks == [str(proc.pid)], _names(proc.pid)
        assert (tmp_path / ".btrdelta-replica.json").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err


@pytest.mark.parametrize("sig", SIGNALS)
def test_the_listener_ends_on_a_signal_another_thread_took(tmp_path: Path,
                                                          sig: signal.Signals,
                                                          children: Children) -> None:
    """A signal the kernel gives to another thread of the listener (here sent to one with
    ``pthread_kill``) does not interrupt ``accept()`` in the main thread: the listener
    still ends at once, as for one the main thread took (it waited for the next connection:
    a CI run's SIGTERM was ignored for 60 s at load 9-13)."""
    code = ("import signal, sys, threading\n"
            "go = threading.Event()\n"
            "def other():\n"
            "    go.wait()\n"
            f"    signal.pthread_kill(threading.get_ident(), {int(sig)})\n"
            "    threading.Event().wait(30)\n"
            "threading.Thread(target=other, daemon=True).start()\n"
            "real = sys.stderr.write\n"
            "def write(text):\n"
            "    n = real(text)\n"
            "    if 'listening' in text:\n"
            "        sys.stderr.flush()\n"
            "        go.set()\n"
            "    return n\n"
            "sys.stderr.write = write\n")
    proc = _listener(children, code, tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert err.endswith(b"btrdelta replicate: interrupted\n"), err


def test_a_signal_ignored_at_the_start_stays_ignored(children: Children) -> None:
    """``nohup``: SIGHUP ignored when the command started does not end it."""
    data = _stream()
    proc = children.start([sys.executable, "-m", "btrdelta", "dump", "-"],
                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE,
                          preexec_fn=_as_in_a_terminal(signal.SIGHUP))
    assert proc.stdin is not None
    proc.stdin.write(data[:-100])
    proc.stdin.flush()
    _blocked_in(proc, "pipe_read")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert proc.poll() is None
    _, err = proc.communicate(data[-100:], timeout=60)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("module", ["btrdelta.cli", "btrdelta.cli.treesum_cmd"])
def test_ctrl_c_while_the_command_loads_is_one_line(module: str) -> None:
    """Ctrl-C while the CLI's modules are imported (the first ~0.2 s under load), before
    the command's own handling: exit 130 and one line. It printed a Python traceback
    (KeyboardInterrupt in an import). The SIGINT is sent by the process to itself when
    ``module`` is imported."""
    code = f"""
import builtins, os, signal, sys
real = builtins.__import__
def hooked(name, *args, **kwargs):
    m = real(name, *args, **kwargs)
    if {module!r} in sys.modules:  # (from the first import after it began loading)
        builtins.__import__ = real
        os.kill(os.getpid(), signal.SIGINT)
    return m
builtins.__import__ = hooked
sys.argv = ["btrdelta", "tree-sum", sys.prefix]
from btrdelta.__main__ import entry
entry()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=_as_in_a_terminal(), timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (130, "btrdelta: interrupted\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_pool_takes_a_task(tmp_path: Path, sig: signal.Signals,
                                            children: Children) -> None:
    """A signal that comes while ``ThreadPoolExecutor.submit`` holds its idle semaphore's
    lock (in ``_adjust_thread_count``, the second task an ``image compress`` gives a pool).
    The ``KeyboardInterrupt`` was raised there, the lock stayed taken, the worker blocked
    on it as it finished its task and the pool's shutdown waited for the worker: the
    command never ended (an ``image clone`` hung so in 1 Ctrl-C of 5 while it checked its
    store). Now the submission holds the signal back: exit 128 + it, one line. The child
    raises the signal itself at that point (``signal.raise_signal``: its handler runs
    there, as a real Ctrl-C's does at the next bytecode)."""
    image = tmp_path / "image"
    image.write_bytes(os.urandom(1 << 20))
    code = f"""
import signal, sys
import concurrent.futures.thread as cft
real = cft.ThreadPoolExecutor._adjust_thread_count
def adjust(self):
    if not self._threads:  # (a worker that will finish a task first)
        return real(self)
    cft.ThreadPoolExecutor._adjust_thread_count = real
    lock = self._idle_semaphore._cond  # (what Semaphore.acquire's `with` takes)
    lock.acquire()
    signal.raise_signal({int(sig)})
    lock.release()
    return real(self)
cft.ThreadPoolExecutor._adjust_thread_count = adjust
sys.argv = ["btrdelta", "image", "compress", "-q", "-i", {str(image)!r}, "-o",
            {str(tmp_path / "a.bdar")!r}]
from btrdelta.__main__ import entry
entry()
"""
    proc = children.start([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, preexec_fn=_as_in_a_terminal())
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the command did not end: a pool's worker waits for the lock taken")
    assert (proc.returncode, out, err) == (128 + sig, b"",
                                           b"btrdelta image compress: interrupted\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raised_in_a_finalizer_still_ends_the_command(tmp_path: Path,
                                                               sig: signal.Signals) -> None:
    """A signal whose handler runs while Python runs a finalizer (a ``__del__``, a weakref
    callback, a generator closed by the collector; here a ``gc`` callback at a collection
    as ``tree-sum`` begins): Python dropped the exception ("Exception ignored in ..." and a
    traceback) and the command ran to its end, exit 0, as if no signal had come (here after
    20 s). Now the signal is raised again in the main thread: exit 128 + it, one line, no
    sum, at once."""
    (tmp_path / "f").write_bytes(b"x")
    code = f"""
import gc, signal, sys, time
import btrdelta.cli.treesum_cmd as cmd
def collected(phase, info):
    if phase == "start" and signal.getsignal({int(sig)}) is not signal.default_int_handler:
        gc.callbacks.remove(collected)
        signal.raise_signal({int(sig)})
real = cmd.run
def run(args):
    gc.callbacks.append(collected)
    gc.collect()
    time.sleep(20)  # (the command goes on working: the signal has to end it)
    return real(args)
cmd.run = run
sys.argv = ["btrdelta", "tree-sum", {str(tmp_path)!r}]
from btrdelta.__main__ import entry
entry()
"""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          preexec_fn=_as_in_a_terminal(), check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        128 + sig, b"", b"btrdelta tree-sum: interrupted\n")
    assert time.monotonic() - start < 15
