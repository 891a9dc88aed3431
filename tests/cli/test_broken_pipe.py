"""A reader that goes away (``btrdelta dump | head``): every command writing a stream or
text to standard output exits as ``btrfs receive --dump | head`` does, 141 (128 +
SIGPIPE: progs is killed by it; we exit with its status after our clean-up), quietly. On
Python 3.11 the binary writers exited 0: a ``write`` of more than the buffer returned a
short count and dropped the rest. Oracle: btrfs-progs' ``receive --dump`` of the same
stream, read the same way."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.cli import main


def _cut_after_one_byte(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with its standard output read for one byte, then closed. However it
    ends (nothing read, a timeout), the child is gone when this returns or raises."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        first = proc.stdout.read(1)
        if not first:
            proc.kill()  # (no output: what it said, and nothing left running)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert len(first) == 1, (code, err)
    return code, err


def test_the_cut_leaves_no_child_when_nothing_comes(tmp_path: Path) -> None:
    """A child that writes nothing and goes on (its output closed): the helper fails, and
    the child is gone (it was left running, holding the pipes)."""
    pidfile = tmp_path / "pid"
    with pytest.raises(AssertionError):
        _cut_after_one_byte(["sh", "-c", f"echo $$ > {pidfile}; exec >&-; exec sleep 60"])
    pid = int(pidfile.read_text())
    try:
        alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        alive = False  # (reaped)
    if alive:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not alive


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tree of 4,000 files and its full stream (a dump of 1.4 MB: many pipe buffers)."""
    top = tmp_path_factory.mktemp("pipe")
    tree = top / "tree"
    tree.mkdir()
    for i in range(4000):
        (tree / f"f{i}").write_bytes(b"%d" % i)
    assert main(["send", "-q", str(tree), "-o", str(top / "t.stream")]) == 0
    return tree, top / "t.stream"


@pytest.mark.parametrize("words", [["dump", "STREAM"], ["dump", "--json", "STREAM"],
                                   ["send", "-q", "TREE"], ["tree-sum", "--manifest", "TREE"]])
def test_a_reader_gone_is_sigpipes_status(big: tuple[Path, Path], words: list[str]) -> None:
    if shutil.which("btrfs") is None:
        pytest.skip("btrfs-progs not installed (the oracle)")
    tree, stream = big
    progs, _ = _cut_after_one_byte(["btrfs", "receive", "--dump", "-f", str(stream)])
    assert progs == -signal.SIGPIPE
    argv = [{"STREAM": str(stream), "TREE": str(tree)}.get(w, w) for w in words]
    code, err = _cut_after_one_byte([sys.executable, "-m", "btrdelta", *argv])
    assert (code, err) == (128 + signal.SIGPIPE, ""), (words, err)


def test_what_is_written_is_whole(big: tuple[Path, Path]) -> None:
    """The writes made whole change nothing a reader that stays gets: progs' text."""
    if shutil.which("btrfs") is None:
        pytest.skip("btrfs-progs not installed (the oracle)")
    _, stream = big
    ours = subprocess.run([sys.executable, "-m", "btrdelta", "dump", str(stream)],
                          capture_output=True, check=True, env={**os.environ, "TZ": "UTC"})
    theirs = subprocess.run(["btrfs", "receive", "--dump", "-f", str(stream)],
                            capture_output=True, check=True, env={**os.environ, "TZ": "UTC"})
    assert ours.stdout == theirs.stdout
