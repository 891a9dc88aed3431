"""Every subcommand against the mistakes users make: one line, an exit code of the table.

The commands are discovered from the parser, so a new command is covered the day it is
added. Each argument a command requires (positionals and required options) is given the
same wrong value: a missing path, a directory, a file of garbage, a zstd-compressed stream,
an unreadable file (as an unprivileged user, as is every run marked "nobody"). Servers get
a busy port. Whatever the command makes of it, it must end (no hang), exit 0 or with a code
of ``errors.exit_codes()``, and on failure print exactly one line on standard error,
naming the command, never a traceback or a Python repr.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from btrdelta.cli import build_parser
from btrdelta.errors import exit_codes
from tests.conftest import committed_streams, nobody_python, read_pty

STREAM = next(s for s in committed_streams() if ".A." in s.name)  # a full stream
CODES = {code for code, _ in exit_codes()}
#: what a user's mistake must never show
LEAKS = ("Traceback", "internal error", "Errno", "PosixPath(", "object at 0x")
#: a bytes repr (b'...'), not a path that ends in b and is quoted (/tmp/tmp2szp7bpb')
BYTES_REPR = re.compile(r"(?<![\w./-])b['\"]")


def leaves(parser: argparse.ArgumentParser,
           words: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                          argparse.ArgumentParser]]:
    """Every runnable command (``("delta", "make")``...) with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*words, name))


COMMANDS = sorted(leaves(build_parser()), key=lambda c: c[0])


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's own is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="btrdelta-mistakes-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _value(kind: str, where: Path) -> str:
    """A fresh wrong value of ``kind`` in ``where`` (runs do not share files)."""
    v = where / "v"
    if kind == "missing":
        return str(where / "nonexistent" / "v")
    if kind.startswith("dir"):
        v.mkdir()
        v.chmod(0o777)
    elif kind == "garbage":
        v.write_bytes(bytes(range(256)) * 20)
    elif kind == "zstd":
        subprocess.run(["zstd", "-q", "-f", str(STREAM), "-o", str(v)], check=True)
    elif kind == "unreadable":
        v.write_bytes(b"secret\n" * 10)
        v.chmod(0)
    return str(v)


def _argv(words: tuple[str, ...], parser: argparse.ArgumentParser, value: str,
          port: int, where: Path | None = None) -> list[str]:
    argv = list(words)
    for a in parser._actions:
        if a.option_strings:
            if a.required:
                argv += [a.option_strings[0], value]
            elif "--store" in a.option_strings and where is not None:
                # a sendshot store of its own, never the machine's (/var/lib/btrdelta):
                # `sendshot create` given a directory records it there
                argv += ["--store", str(where / "sendshots")]
            elif "--port" in a.option_strings:
                argv += ["--port", str(port)]
            elif "--listen" in a.option_strings:
                argv += ["--listen", f"127.0.0.1:{port}"]
        elif a.dest != "help":
            argv.append(value)
    return argv


def run_cli(argv: list[str], *, nobody: bool = False, cwd: Path | None = None,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = [*(nobody_python() if nobody else [sys.executable]), "-m", "btrdelta", *argv]
    return subprocess.run(cmd, input=stdin, stdin=None if stdin is not None else
                          subprocess.DEVNULL, capture_output=True, timeout=60, cwd=cwd,
                          check=False)


def check(proc: subprocess.CompletedProcess[bytes], what: str) -> str:
    """The run ended well: a table code, and one clean line on failure; returns it."""
    err = proc.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode in CODES, f"{what}: exit {proc.returncode}: {err}"
    for leak in LEAKS:
        assert leak not in err, f"{what}: {leak!r} in {err}"
    assert not BYTES_REPR.search(err), f"{what}: a bytes repr in {err}"
    if proc.returncode:
        assert len(lines) == 1, f"{what}: {len(lines)} lines: {err}"
        assert lines[0].startswith("btrdelta"), f"{what}: {err}"
    return lines[0] if lines else ""


KINDS = ["missing", "dir", "garbage", "zstd", "unreadable", "dir-nobody"]


def test_commands_are_discovered() -> None:
    names = {" ".join(w) for w, _ in COMMANDS}
    assert {"receive", "send", "delta make", "delta expand", "verify", "image clone"} <= names


def test_every_command_against_wrong_values(world: Path, busy_port: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("runs commands as an unprivileged user with setpriv (needs root)")
    jobs = []
    for words, parser in COMMANDS:
        for kind in KINDS:
            where = Path(tempfile.mkdtemp(dir=world))
            where.chmod(0o755)
            argv = _argv(words, parser, _value(kind, where), busy_port, where)
            nobody = kind in ("unreadable", "dir-nobody")
            jobs.append((f"{' '.join(words)} [{kind}]: {' '.join(argv)}", argv, nobody, where))

    Job = tuple[str, list[str], bool, Path]

    def one(job: Job) -> tuple[str, subprocess.CompletedProcess[bytes]]:
        what, argv, nobody, where = job
        return what, run_cli(argv, nobody=nobody, cwd=where)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, jobs))
    failures = []
    for what, proc in results:
        try:
            check(proc, what)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


def test_input_twice_is_a_usage_error(tmp_path: Path) -> None:
    # every command with -f FILE and a positional FILE: both at once is exit 2
    both = [(w, p) for w, p in COMMANDS
            if any("-f" in a.option_strings and a.dest == "file" for a in p._actions)
            and any(a.dest == "input" for a in p._actions)]
    assert len(both) >= 6
    for words, _ in both:
        argv = [*words, "-f", str(STREAM), str(STREAM)]
        if words[0] == "receive":
            argv.append(str(tmp_path))
        if words[0] == "delta" and words[1] in ("make", "expand"):
            argv += ["--old", str(tmp_path), "-o", str(tmp_path / "out")]
        if words == ("sign",):
            argv += ["--key", str(tmp_path / "k")]
        proc = run_cli(argv)
        assert proc.returncode == 2, (words, proc.stderr)
        assert "either with -f or as an argument" in check(proc, " ".join(words))


def test_argparse_mistakes_are_one_line() -> None:
    for argv in (["receive", "--no-such-option", "x"], ["send"], ["nosuchcommand"],
                 ["image", "nbd", "store/x", "--listen", "bogus"],
                 ["serve", ".", "--port", "99999"],
                 ["replicate", "a", "b", "--rate-limit", "bogus"]):
        proc = run_cli(argv)
        assert proc.returncode == 2, argv
        line = check(proc, " ".join(argv))
        assert "--help" in line


def test_old_snapshot_missing_is_exit_6(tmp_path: Path) -> None:
    for sub in ("make", "expand"):
        proc = run_cli(["delta", sub, "--old", str(tmp_path / "nonexistent"), "-f",
                        str(STREAM), "-o", str(tmp_path / "out")])
        assert proc.returncode == 6
        assert "old snapshot not found" in check(proc, sub)
        assert not (tmp_path / "out").exists()


def test_btrfs_backend_off_btrfs_names_the_option(tmp_path: Path) -> None:
    """It said "use the directory backend", which no option is called."""
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = run_cli(["receive", "--backend", "btrfs", "-f", str(STREAM), str(dest)])
    if proc.returncode == 0:
        pytest.skip(f"{dest} is on btrfs")
    assert "--backend dir" in check(proc, "receive --backend btrfs")
    assert os.listdir(dest) == []


def test_receive_as_a_user_says_it_needs_root(world: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    dest = Path(tempfile.mkdtemp(dir=world))
    dest.chmod(0o777)
    stream = dest / "s.stream"
    shutil.copy(STREAM, stream)
    stream.chmod(0o644)
    proc = run_cli(["receive", "-f", str(stream), str(dest)], nobody=True)
    assert proc.returncode == 8
    line = check(proc, "receive as nobody")
    assert "needs root" in line
    assert "uid 65534" in line
    assert [p.name for p in dest.iterdir()] == ["s.stream"]  # nothing left behind


def test_servers_name_a_busy_port_and_a_bad_address(tmp_path: Path, busy_port: int) -> None:
    cases = [
        (["serve", str(tmp_path), "--port", str(busy_port)], f"127.0.0.1:{busy_port}"),
        (["serve", str(tmp_path), "--bind", "999.1.1.1", "--port", "0"], "999.1.1.1"),
        (["serve", str(tmp_path), "--bind", "no-such-host.invalid", "--port", "0"],
         "no-such-host.invalid"),
    ]
    for argv, named in cases:
        proc = run_cli(argv)
        assert proc.returncode == 1, argv
        assert named in check(proc, " ".join(argv))


def test_first_hour_argument_mistakes_name_the_command_to_type(tmp_path: Path) -> None:
    # two trees given to send (as to diff), receive's arguments swapped or DEST left out,
    # image clone's SOURCE and STORE/NAME swapped: exit 2, one line, named by the command,
    # with the command line that was meant; nothing is written
    old, new, store = tmp_path / "old", tmp_path / "new", tmp_path / "store"
    old.mkdir()
    new.mkdir()
    url = "http://127.0.0.1:9/v2.bdar"
    cases = [
        (["send", str(old), str(new), "-o", str(tmp_path / "s")],
         f"btrdelta send -p {old} {new}"),
        (["receive", str(tmp_path), str(STREAM)], f"btrdelta receive {STREAM} {tmp_path}"),
        (["receive", str(STREAM)], f"btrdelta receive {STREAM} DEST"),
        (["image", "clone", str(store / "v2"), url],
         f"btrdelta image clone {url} {store / 'v2'}"),
    ]
    for argv, meant in cases:
        proc = run_cli(argv)
        line = check(proc, " ".join(argv))
        assert proc.returncode == 2, (argv, line)
        assert line.startswith(f"btrdelta {' '.join(argv[:2 if argv[0] == 'image' else 1])}:")
        assert meant in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


def test_positional_words_meant_for_options_name_the_command_to_type(tmp_path: Path) -> None:
    # walking the README on Debian trees: the old snapshot, the output, an image or the
    # second tree given as a plain word (as to diff or cp) said only "the following
    # arguments are required: --old" or "unrecognized arguments: X"; a tree given as the
    # stream said "X: Is a directory" (exit 1). Now exit 2, one line, the command meant,
    # nothing written
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    out, image = tmp_path / "out", tmp_path / "img"
    image.write_bytes(b"\0" * 4096)
    cases = [
        (["delta", "make", "-f", str(STREAM), str(old), "-o", str(out)],
         f"give the old snapshot with --old: btrdelta delta make -f {STREAM} --old {old} "
         f"-o {out}"),
        (["delta", "make", str(STREAM), "--old", str(old), str(out)],
         f"write the delta to a file with -o: btrdelta delta make {STREAM} --old {old} "
         f"-o {out}"),
        (["delta", "expand", str(STREAM), str(old)],
         f"btrdelta delta expand {STREAM} --old {old}"),
        (["delta", "expand", "-q", str(STREAM), "--old", str(old), str(out)],
         f"write the stream to a file with -o: btrdelta delta expand -q {STREAM} --old {old} "
         f"-o {out}"),
        (["send", str(new), str(out)], f"btrdelta send {new} -o {out}"),
        (["image", "compress", str(image), str(out)],
         f"btrdelta image compress -i {image} -o {out}"),
        (["image", "compress", "--level", "3", str(image), "--output", str(out)],
         f"btrdelta image compress --level 3 -i {image} --output {out}"),
        (["tree-sum", "--holes", str(old), str(new)],
         f"to compare two trees: btrdelta tree-sum --holes {old} --compare {new}"),
        (["receive", "-f", str(old), str(new)],
         f"{old} is a directory, not a stream file (a stream of a tree: btrdelta send {old} "
         "-o FILE)"),
        (["dump", str(old)], f"{old} is a directory, not a stream file"),
    ]
    for argv, meant in cases:
        proc = run_cli(argv)
        line = check(proc, " ".join(argv))
        assert proc.returncode == 2, (argv, line)
        assert meant in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "new", "old"]
    assert not any(new.iterdir())


def test_unknown_words_are_named_by_the_command(tmp_path: Path) -> None:
    # not by `btrdelta`, whose --help does not list the command's options
    proc = run_cli(["delta", "make", "--old", str(tmp_path), str(STREAM), "extra"])
    assert proc.returncode == 2
    line = check(proc, "delta make extra")
    assert line.startswith("btrdelta delta make: error: unrecognized arguments: extra")
    assert "see btrdelta delta make --help" in line


def test_a_full_output_is_named(tmp_path: Path) -> None:
    # "No space left on device": of which file? (a file object's write does not say)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 100_000)
    image = tmp_path / "img"
    image.write_bytes(os.urandom(1 << 20))
    for argv, named in ((["send", str(tree), "-o", "/dev/full"], "/dev/full"),
                        (["image", "compress", "-i", str(image), "-o", "/dev/full"],
                         "/dev/full")):
        proc = run_cli(argv)
        assert proc.returncode == 8, argv  # (a full disk: 8 in every command; was 1)
        assert f"{named}: No space left on device" in check(proc, " ".join(argv))
    with open("/dev/full", "wb") as full:
        for argv in (["dump", str(STREAM)], ["send", str(tree)]):
            proc = subprocess.run([sys.executable, "-m", "btrdelta", *argv], stdout=full,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  timeout=60, check=False)
            assert proc.returncode == 8, argv
            assert "standard output: No space left on device" in check(proc, argv[0])


def test_send_to_a_terminal_is_refused_before_any_progress(tmp_path: Path) -> None:
    # the refusal came after the progress display had started (two bars, then the error)
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "send", str(tmp_path)],
                              stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                              timeout=60, check=False)
        os.set_blocking(master, False)
        out_bytes = read_pty(master)
    finally:
        os.close(master)
        os.close(slave)
    out = out_bytes.decode()
    assert proc.returncode == 1
    assert out.strip() == ("btrdelta send: error: refusing to write a binary stream to a "
                           "terminal (use -o FILE)"), out
