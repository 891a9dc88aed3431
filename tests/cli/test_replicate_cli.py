"""`btrdelta replicate` through the CLI: the shared progress (bytes and rate; a bar on a
terminal by default, plain lines into a file only with --progress, nothing with -q, never
escape codes into a file). Oracle: tree-sum of what the receiver holds equals the source's."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrdelta.tree import tree_sum
from tests.conftest import read_pty
from tests.jsondoc import checked

BTRDELTA = [sys.executable, "-m", "btrdelta"]


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    (src / "small").write_bytes(b"x" * 100)
    return src


def _run(tmp_path: Path, dest: str, *flags: str, stderr: int | None = None,
         ) -> subprocess.CompletedProcess[str]:
    d = tmp_path / dest
    d.mkdir()
    return subprocess.run([*BTRDELTA, "replicate", *flags, "--segment", "1M", "--store",
                           str(tmp_path / f"store-{dest}"), str(tmp_path / "src"), str(d)],
                          text=True, check=False, timeout=120, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if stderr is None else stderr)


def _same_tree(tmp_path: Path, dest: str) -> None:
    (got,) = [p for p in (tmp_path / dest).iterdir() if not p.name.startswith(".")]
    sums = [subprocess.run([*BTRDELTA, "tree-sum", str(p)], capture_output=True, text=True,
                           check=True).stdout.split()[0] for p in (tmp_path / "src", got)]
    assert sums[0] == sums[1]


def test_progress_in_a_file_only_with_progress_and_never_with_quiet(tmp_path: Path) -> None:
    _source(tmp_path)
    plain = _run(tmp_path, "plain")
    assert plain.returncode == 0, plain.stderr
    # not a terminal: only the summary
    assert [ln.split(":")[0] for ln in plain.stderr.splitlines()] == ["replicate"]
    assert "sent of" in plain.stderr
    shown = _run(tmp_path, "shown", "--progress")
    assert shown.returncode == 0, shown.stderr
    assert "\r" not in shown.stderr
    assert "\x1b" not in shown.stderr
    lines = shown.stderr.splitlines()
    assert lines[-2].startswith("replicate: 3.0 MiB, ")  # bytes, then the rate
    assert lines[-2].endswith("/s")
    assert "sent of" in lines[-1]
    quiet = _run(tmp_path, "quiet", "-q", "--progress")
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    for dest in ("plain", "shown", "quiet"):
        _same_tree(tmp_path, dest)


def test_a_terminal_gets_the_bar_by_default(tmp_path: Path) -> None:
    _source(tmp_path)
    master, slave = os.openpty()
    try:
        proc = _run(tmp_path, "tty", stderr=slave)
        os.close(slave)
        out_bytes = read_pty(master)
    finally:
        os.close(master)
    out = out_bytes.decode()
    assert proc.returncode == 0, out
    # drawn in place (a fresh pty reports no size, as some serial consoles): bytes, rate
    assert "\rreplicate: 0.00B [" in out, out
    assert "B/s]" in out
    _same_tree(tmp_path, "tty")


def test_json_report_and_the_sendshot_it_recorded(tmp_path: Path) -> None:
    _source(tmp_path)
    proc = _run(tmp_path, "j", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal, no --progress: nothing but the JSON
    report = checked("replicate", json.loads(proc.stdout))
    assert report["outcome"] == "committed"
    assert report["kind"] == "full"
    assert report["sent"] == report["size"] > 3 << 20
    (got,) = [p for p in (tmp_path / "j").iterdir() if not p.name.startswith(".")]
    assert report["name"] == got.name
    store = ["sendshot", "--store", str(tmp_path / "store-j"), "--json"]
    listed = subprocess.run([*BTRDELTA, *store, "list"], capture_output=True, text=True,
                            check=True).stdout
    (shot,) = checked("sendshot list", json.loads(listed))
    assert shot["id"] == report["sendshot"]
    made = subprocess.run([*BTRDELTA, *store, "create", str(got), "--source",
                           str(tmp_path / "src")], capture_output=True, text=True, check=True)
    assert checked("sendshot create", json.loads(made.stdout))["source"] == str(tmp_path / "src")
    _same_tree(tmp_path, "j")


def test_a_receiver_that_exits_says_why(tmp_path: Path) -> None:
    """A receiver that cannot receive into DEST (the btrfs backend on another filesystem)
    exits before it answers: the sender's one line carries the receiver's reason (was:
    only 'the peer closed the connection'). The receiver got its options after --serve
    DEST, which takes one argument: every local --backend said 'argument --serve:
    expected one argument'."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    dest = tmp_path / "dest"
    dest.mkdir()
    store = ["--store", str(tmp_path / "store")]
    proc = subprocess.run([*BTRDELTA, "replicate", "-q", *store, "--backend", "btrfs",
                           str(tmp_path / "src"), str(dest)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 7
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "the peer closed the connection" in proc.stderr
    assert f"said: error: {dest} is not on btrfs: the btrfs backend needs it" in proc.stderr
    assert os.listdir(dest) == []
    proc = subprocess.run([*BTRDELTA, "replicate", "-q", *store, "--backend", "dir",
                           str(tmp_path / "src"), str(dest)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _same_tree(tmp_path, "dest")


def test_a_missing_local_dest_is_said_before_any_receiver(tmp_path: Path) -> None:
    # it was the receiver's exit: 'the peer closed the connection; ... said: error:
    # destination ... is not a directory', exit 7 (a transport error)
    (tmp_path / "src").mkdir()
    missing = tmp_path / "no" / "such"
    proc = subprocess.run([*BTRDELTA, "replicate", "--store", str(tmp_path / "store"),
                           str(tmp_path / "src"), str(missing)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"btrdelta replicate: error: destination {missing} does not exist "
                           f"(make it first: mkdir -p {missing})\n")
    assert not missing.exists()


def test_a_planted_replica_state_is_refused_not_followed(tmp_path: Path) -> None:
    """DEST/.btrdelta-replica.json as a FIFO hung `replicate --serve` in open, as a symlink
    it was read wherever it pointed (/dev/zero: without end): now one line, at once."""
    outside = tmp_path / "outside.json"
    outside.write_text('{"id": "x", "received": {}}')
    for planted in ("fifo", "symlink"):
        dest = tmp_path / planted
        dest.mkdir()
        if planted == "fifo":
            os.mkfifo(dest / ".btrdelta-replica.json")
        else:
            (dest / ".btrdelta-replica.json").symlink_to(outside)
        proc = subprocess.run([*BTRDELTA, "replicate", "--serve", str(dest)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        want = "not a regular file" if planted == "fifo" else "a symlink"
        assert f"damaged replica state: {want}" in proc.stderr
        assert sorted(p.name for p in dest.iterdir()) == [".btrdelta-replica.json"]


def test_a_failed_transfer_is_one_error_line(tmp_path: Path) -> None:
    """`replicate --serve` given bytes that are not a sender's (or a sender's cut inside a
    message) exits 9 with the one error line every command prints (`make fuzz` found it
    printing `replicate --serve: failed: ...`, which no caller took for an error)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    for said in (b"not a replication peer at all", b"btrdelta-repl\0\1\0\0\0\xff\xff\0\0"):
        proc = subprocess.run([*BTRDELTA, "replicate", "--serve", str(dest)], input=said,
                              capture_output=True, check=False, timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode == 9, err
        assert err.count("\n") == 1, err
        assert err.startswith("btrdelta replicate: error: sender: offset "), err
        assert not [p for p in os.listdir(dest) if not p.startswith(".")], os.listdir(dest)


def test_verbose_says_the_receiver_and_the_base(tmp_path: Path) -> None:
    _source(tmp_path)
    for flag in ("-v", "--verbose"):
        proc = _run(tmp_path, f"dest{flag}", flag)
        assert proc.returncode == 0, proc.stderr
        summary, detail = proc.stderr.splitlines()
        assert "sent of" in summary
        assert detail.startswith("  receiver ")
        assert "base none (a full stream), 0 sendshot(s) pruned" in detail
        _same_tree(tmp_path, f"dest{flag}")


def test_a_damaged_cursor_file_exits_3_naming_it(tmp_path: Path) -> None:
    """cursors.json that is not JSON exited 1; one of another shape was read as no cursors
    at all (and prune could then delete what receivers hold): both are bad state, exit 3."""
    _source(tmp_path)
    damaged = ['{"version": 1, "receivers": {"ab', "[]",
               '{"version": 1, "receivers": {"x": 3}}', '{"receivers": {}}']
    for i, text in enumerate(damaged):
        store = tmp_path / f"store-c{i}"
        store.mkdir()
        (store / "cursors.json").write_text(text)
        proc = _run(tmp_path, f"c{i}")
        assert proc.returncode == 3, (text, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"{store / 'cursors.json'}: damaged cursor file: " in proc.stderr
        assert not [p for p in (tmp_path / f"c{i}").iterdir() if not p.name.startswith(".")]
        assert (store / "cursors.json").read_text() == text  # left for the user to look at


def _fill(mnt: Path, room: int) -> None:
    """Fill file system ``mnt`` (as root: its reserved blocks too) but ``room`` KiB."""
    (mnt / "room").write_bytes(b"x" * (room << 10))
    with open(mnt / "filler", "ab", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(os.urandom(1024)):
            pass
    (mnt / "room").unlink()


def test_a_store_on_a_full_disk_is_named(tmp_path: Path) -> None:
    """A one-shot replicate whose sendshot store is on a full file system (a small loop
    ext4) said only "No space left on device", not which file: the store's file is named
    (a new store: its seed; one with a record, the source changed: its cursor file; 8 KiB
    left: the directory of the new record, 13 KiB), exit 8 (as every command's full disk),
    one line. With room again the next run replicates: the DEST's tree-sum is the
    source's."""
    from btrdelta.testing.loopfs import loop_fs
    from tests.conftest import require_btrfs

    require_btrfs()  # (root: a mount)
    src = _source(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with loop_fs("ext4", size="8M") as small:
        store = small / "store"
        (store / "records").mkdir(parents=True)  # (else their mkdir fails: it names them)
        argv = [*BTRDELTA, "replicate", "--store", str(store), str(src), str(dest)]
        for room, named in ((0, "seed"), (0, "cursors.json"), (8, "records")):
            _fill(small, room)
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                  check=False)
            assert (proc.returncode, proc.stderr) == (8, f"btrdelta replicate: error: "
                                                         f"{store}/{named}: No space left "
                                                         "on device\n")
            (small / "filler").unlink()
            done = json.loads(subprocess.run([*argv, "--json"], capture_output=True,
                                             check=True, timeout=120).stdout)
            assert tree_sum(dest / done["name"]) == tree_sum(src), named
            (src / "big").write_bytes(os.urandom(3 << 20))


def test_a_damaged_key_file_exits_3_naming_it(tmp_path: Path) -> None:
    src = _source(tmp_path)
    subprocess.run([*BTRDELTA, "key", "generate", "-o", str(tmp_path / "good")], check=True,
                   capture_output=True)
    good_key, good_pub = tmp_path / "good.key", tmp_path / "good.pub"
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    bad_pub = tmp_path / "bad.pub"
    bad_pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA truncated\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    cases = [
        (["replicate", str(src), "tcp://127.0.0.1:9", "--key", str(bad), "--peer",
          str(good_pub)], bad, "not a PEM or OpenSSH private key"),
        (["replicate", str(src), "tcp://127.0.0.1:9", "--key", str(good_key), "--peer",
          str(bad_pub)], bad_pub, "not an Ed25519 public key"),
        (["replicate", "--listen", "127.0.0.1:0", "--key", str(bad), "--allow",
          str(good_pub), str(dest)], bad, "not a PEM or OpenSSH private key"),
        (["replicate", "--listen", "127.0.0.1:0", "--key", str(good_key), "--allow",
          str(bad_pub), str(dest)], bad_pub, "not an Ed25519 public key"),
    ]
    for argv, named, what in cases:
        proc = subprocess.run([*BTRDELTA, *argv], capture_output=True, text=True, check=False,
                              timeout=60)
        assert proc.returncode == 3, (argv, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"{named}: {what}" in proc.stderr


def test_the_receiver_starts_before_the_send_side_is_imported(tmp_path: Path) -> None:
    """A local receiver is started before the sender imports its send side (the two
    start-ups overlap: the first byte waits for the receiver's), and ``--serve`` imports
    no module of the send side at all."""
    (tmp_path / "d").mkdir()
    script = (
        "import sys\nimport btrdelta.cli.replicate_cmd as r\nfrom btrdelta.cli import main\n"
        "real = r._connect\n"
        "def connect(args):\n"
        "    print(sorted(m for m in sys.modules if m.startswith('btrdelta.send')))\n"
        "    return real(args)\n"
        "r._connect = connect\n"
        f"code = main(['replicate', '-q', '--store', {str(tmp_path / 'store')!r}, "
        f"{str(_source(tmp_path))!r}, {str(tmp_path / 'd')!r}])\n"
        "print(code)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    assert out == ["[]", "0"]
    _same_tree(tmp_path, "d")
    serve = ("import sys\nfrom btrdelta.cli import main\n"
             f"main(['replicate', '--serve', {str(tmp_path / 'd')!r}])\n"
             "print(sorted(m for m in sys.modules if m.startswith('btrdelta.send')), "
             "file=sys.stderr)")
    err = subprocess.run([sys.executable, "-c", serve], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                         check=True, timeout=60).stderr
    assert err.splitlines()[-1] == "[]"


def test_a_local_receiver_is_a_fork_not_a_new_interpreter(tmp_path: Path) -> None:
    """The CLI's local DEST is received by a fork of the sender (no interpreter started, no
    CLI imported again: what the first byte waited for), which leaves with the receiver's
    exit code; a sender already running a thread starts a new interpreter instead (a fork
    copies only the calling thread)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "t").mkdir()
    script = (
        "import subprocess, sys, threading\n"
        "from btrdelta.cli import main\n"
        "import btrdelta.update.channels as c\n"
        "spawned = []\n"
        "real = c.spawn_local\n"
        "def spawn(*a, **k):\n"
        "    spawned.append(1)\n"
        "    return real(*a, **k)\n"
        "c.spawn_local = spawn\n"
        "popen = subprocess.Popen.__init__\n"
        "def no_serve(self, args, *a, **k):\n"
        "    assert '--serve' not in args or spawned, args\n"
        "    popen(self, args, *a, **k)\n"
        "subprocess.Popen.__init__ = no_serve\n"
        f"src, store = {str(_source(tmp_path))!r}, {str(tmp_path / 'store')!r}\n"
        f"print(main(['replicate', '-q', '--store', store, src, {str(tmp_path / 'd')!r}]), "
        "len(spawned))\n"
        "stop = threading.Event()\n"
        "threading.Thread(target=stop.wait).start()\n"
        f"print(main(['replicate', '-q', '--store', store + '2', src, "
        f"{str(tmp_path / 't')!r}]), len(spawned))\n"
        "stop.set()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    assert out == ["0 0", "0 1"]
    _same_tree(tmp_path, "d")
    _same_tree(tmp_path, "t")


def test_a_forked_receiver_killed_or_failing_is_reported(tmp_path: Path) -> None:
    """:func:`fork_local`'s child as :class:`subprocess.Popen`'s: its exit code and what it
    said on its standard error once the channel is closed; a killed one is -9."""
    from btrdelta.cli import main
    from btrdelta.update.channels import fork_local

    def serve(dest: Path) -> int:
        return main(["replicate", "--serve", str(dest)])

    ch = fork_local(str(tmp_path / "missing"), lambda: serve(tmp_path / "missing"))
    ch.close()
    assert ch.proc is not None
    assert ch.proc.returncode == 1  # (as the command's: `replicate --serve` of it)
    assert ch.err == f"btrdelta replicate: error: destination {tmp_path / 'missing'} does " \
                     f"not exist (make it first: mkdir -p {tmp_path / 'missing'})"
    (tmp_path / "d").mkdir()
    ch = fork_local(str(tmp_path / "d"), lambda: serve(tmp_path / "d"))
    assert ch.read(18).startswith(b"btrdelta-repl")  # (its HELLO)
    assert ch.proc is not None
    ch.proc.kill()
    ch.close()
    assert ch.proc.returncode == -9


def test_tcp_without_keys_is_a_usage_error(tmp_path: Path) -> None:
    """`--listen` or a tcp:// DEST without the keys TLS needs, or without DEST, is a usage
    mistake (exit 2, one line naming what is missing), as argparse's own are; was exit 1."""
    src = _source(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    for argv, named in (
        (["replicate", str(src), "tcp://127.0.0.1:9"], "tcp:// needs --key"),
        (["replicate", "--listen", "127.0.0.1:0", str(dest)], "--listen needs --key"),
        (["replicate", "--listen", "127.0.0.1:0"], "--listen needs DEST"),
        (["replicate", str(src)], "replicate needs SOURCE and DEST"),
    ):
        proc = subprocess.run([*BTRDELTA, *argv], capture_output=True, text=True, check=False,
                              timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert named in proc.stderr


def test_a_resume_that_diverges_twice_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the stream made again for a resume differs from the receiver's part (the source
    # changed under a live send): the CLI starts one new conversation; when that diverges
    # too, nothing new is on the receiver and the run must fail, not exit 0
    from btrdelta.cli import main
    from btrdelta.update import replicate as mod

    calls: list[str] = []

    def diverging(source: str, ch: object, **_: object) -> mod.ReplicateResult:
        calls.append(source)
        return mod.ReplicateResult("diverged", "resume", message="the stream made again "
                                   "differs from the one the receiver holds part of")

    monkeypatch.setattr(mod, "replicate", diverging)
    _source(tmp_path)
    (tmp_path / "d").mkdir()
    code = main(["replicate", "--store", str(tmp_path / "store"), str(tmp_path / "src"),
                 str(tmp_path / "d")])
    assert len(calls) == 2
    assert code == 9
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["btrdelta replicate: error: the stream made again differs from the one "
                   "the receiver holds part of"]


def test_help_says_the_exit_codes_and_the_remote_command() -> None:
    """A new user scripting replicate finds its exit codes and what --remote-cmd defaults
    to in --help (was: neither; the codes only in the table of `btrdelta --help`)."""
    out = subprocess.run([*BTRDELTA, "replicate", "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    text = " ".join(out.split())
    assert "Exit codes: 0 also when the receiver is already current;" in text
    assert "9 refused by the protocol (no-common-base, diverged, exists, busy)" in text
    assert "default: btrdelta, found on the remote PATH" in text


def test_progress_says_at_once_that_it_began(tmp_path: Path) -> None:
    # a transfer slower than the 5 s between plain lines (a rate limit): its first line
    # comes at the start, not only when it is done
    _source(tmp_path)
    (tmp_path / "slow").mkdir()
    started = time.monotonic()
    with subprocess.Popen([*BTRDELTA, "replicate", "--progress", "--segment", "1M",
                           "--rate-limit", "1M", "--store", str(tmp_path / "store-slow"),
                           str(tmp_path / "src"), str(tmp_path / "slow")],
                          text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        first_at = time.monotonic() - started
        rest = proc.stderr.read()
        ended_at = time.monotonic() - started
        assert proc.wait(timeout=120) == 0, first + rest
    assert first == "replicate: 0 B\n"  # (nothing sent yet: no rate)
    assert ended_at - first_at > 2.0  # (3 MiB at 1 MiB/s: it came long before the end)
    lines = rest.splitlines()
    assert lines[-2].startswith("replicate: 3.0 MiB, ")
    assert lines[-2].endswith("/s")
    assert "sent of" in lines[-1]
    _same_tree(tmp_path, "slow")


def _replicate_to_fake_ssh(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """``replicate`` of a new source to ``ssh://host/x`` whose ``ssh`` is the Python
    ``script`` (speaking to the sender on its standard input and output)."""
    _source(tmp_path)
    fake = tmp_path / "fake_ssh.py"
    fake.write_text(script)
    return subprocess.run(
        [*BTRDELTA, "replicate", "--store", str(tmp_path / "store"), "--ssh",
         f"{sys.executable} {fake}", str(tmp_path / "src"), "ssh://host/x"],
        capture_output=True, text=True, timeout=120, check=False)


def test_a_receivers_refusal_is_printed_as_one_line(tmp_path: Path) -> None:
    """The receiver (``ssh://``: another machine) is a peer: its REFUSE text is printed in
    the sender's error line. A newline in it printed a line of the peer's own ('btrdelta
    replicate: ...' forged) and an ESC its terminal codes; now they are escaped, one line.
    The receiver here is a fake ``ssh`` speaking the protocol by hand."""
    proc = _replicate_to_fake_ssh(
        tmp_path,
        "import os\n"
        "from btrdelta.protocol import Connection, Refuse\n"
        "from btrdelta.protocol.messages import Hello\n"
        "from btrdelta.update.channels import MessageIO, PipeChannel\n"
        "ch = PipeChannel(os.fdopen(0, 'rb', buffering=0), os.fdopen(1, 'wb', buffering=0))\n"
        "io = MessageIO(ch, Connection('receiver'))\n"
        "hello = io.expect(Hello)\n"
        "io.send(Hello('receiver', hello.versions, (), 'fake', '/x'))\n"
        "io.send(Refuse('failed', 'no room\\nbtrdelta replicate: forged \\x1b[31mred\\x1b[0m'))\n")
    assert proc.returncode == 9, proc
    assert proc.stderr == ("btrdelta replicate: error: the peer refused: failed: no room\\n"
                           "btrdelta replicate: forged \\x1b[31mred\\x1b[0m\n"), proc.stderr


def test_a_receivers_last_error_line_is_printed_escaped(tmp_path: Path) -> None:
    """A receiver that ends the conversation (a missing DEST, ssh refused) has the last line
    it wrote on its standard error quoted in the sender's error line: another machine's
    text, printed raw before (an ESC wrote its terminal codes; a line of its own could not
    come from it, being one line already). The receiver here is a fake ``ssh`` that writes
    and exits."""
    proc = _replicate_to_fake_ssh(
        tmp_path, "import sys\n"
        "sys.stderr.write('btrdelta replicate: no \\x1b[31mred\\x1b[0m DEST\\n')\n"
        "sys.exit(1)\n")
    assert proc.returncode != 0, proc
    assert proc.stderr == ("btrdelta replicate: error: ssh host: the peer closed the "
                           "connection; ssh://host/x said: no \\x1b[31mred\\x1b[0m DEST\n"), \
        proc.stderr


def test_a_receivers_id_is_shown_as_one_line(tmp_path: Path) -> None:
    """A receiver's id is its own text (DEST's ``.btrdelta-replica.json``, another machine's
    over ssh): ``replicate -v`` and ``sendshot list`` printed it raw, so an id with a
    newline and an ESC printed a forged line and terminal codes. Now its control
    characters are escaped as it is read (what ``sendshot forget`` then takes)."""
    _source(tmp_path)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / ".btrdelta-replica.json").write_text(json.dumps(
        {"version": 1, "id": "evil\nbtrdelta replicate: forged \x1b[31mred", "received": {}}))
    shown = "evil\\nbtrdelta replicate: forged \\x1b[31mred"
    store = str(tmp_path / "store")
    proc = subprocess.run([*BTRDELTA, "replicate", "-v", "--store", store,
                           str(tmp_path / "src"), str(dest)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    summary, detail = proc.stderr.splitlines()
    assert "sent of" in summary
    assert detail.startswith(f"  receiver {shown}, base none"), detail
    listed = subprocess.run([*BTRDELTA, "sendshot", "--store", store, "list"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert len(listed.splitlines()) == 2, listed
    assert f"held by {shown} ({dest})" in listed
    _same_tree(tmp_path, "d")
    forgot = subprocess.run([*BTRDELTA, "sendshot", "--store", store, "forget", shown],
                            capture_output=True, text=True, timeout=60)
    assert forgot.returncode == 0, forgot.stderr
