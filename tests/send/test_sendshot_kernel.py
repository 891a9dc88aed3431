"""Sendshots and the kernel: identities a receiver of kernel streams knows, adopting a tree
(`sendshot create`), `send --parent-uuid`, the temporary snapshot's life, files not read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.errors import BtrdeltaError
from btrdelta.receive import receive
from btrdelta.send.sendshot import send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.stream import StreamReader
from btrdelta.stream.records import (
    Chmod,
    Chown,
    Link,
    Mkdir,
    Mkfifo,
    Mkfile,
    Symlink,
    Utimes,
    Write,
)
from btrdelta.tree import tree_sum
from tests.send.conftest import run

pytestmark = pytest.mark.btrfs


def _fill(live: Path, n: int = 12) -> None:
    (live / "d").mkdir()
    for i in range(n):
        (live / "d" / f"f{i}").write_bytes(os.urandom(30_000 + i))


def _snapshots(mnt: Path) -> list[str]:
    return [ln.split()[-1] for ln in run("btrfs", "subvolume", "list", mnt).splitlines()]


def test_kernel_and_btrdelta_streams_alternate(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    snd, rcv = two_fs
    store = str(tmp_path / "store")
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    # 1. kernel full of a read-only snapshot A
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "A")
    run("sh", "-c", f"btrfs send -q {snd / 'A'} | btrfs receive -q {rcv}")
    # 2. the receiver's copy adopted as a base (its received UUID is A's UUID)
    assert main(["sendshot", "--store", store, "create", str(rcv / "A"),
                 "--source", str(live)]) == 0
    (live / "d" / "f1").write_bytes(b"changed")
    # 3. btrdelta incremental of the live subvolume against it: the kernel applies it
    assert main(["send", str(live), "-o", str(tmp_path / "b"), "--from-sendshot", "latest",
                 "--store", store, "--name", "B"]) == 0
    run("btrfs", "receive", "-f", tmp_path / "b", rcv)
    assert tree_sum(rcv / "B") == tree_sum(live)
    # 4. btrdelta full of read-only snapshot C (its own UUID), then a kernel -p C D on top
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "C")
    assert main(["send", str(snd / "C"), "-o", str(tmp_path / "c"), "--record",
                 "--store", store]) == 0
    run("btrfs", "receive", "-f", tmp_path / "c", rcv)
    (live / "d" / "f2").unlink()
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "D")
    run("sh", "-c", f"btrfs send -q -p {snd / 'C'} {snd / 'D'} | btrfs receive -q {rcv}")
    assert tree_sum(rcv / "D") == tree_sum(live)


def test_parent_uuid_names_the_kernel_identity(two_fs: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    snd, rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live, 4)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "A")
    run("sh", "-c", f"btrfs send -q {snd / 'A'} | btrfs receive -q {rcv}")
    new = tmp_path / "new"
    subprocess.run(["cp", "-a", str(snd / "A"), str(new)], check=True)
    (new / "extra").write_bytes(b"x" * 5000)
    # the tree-derived UUID: a receiver of the kernel's stream cannot find the parent
    assert main(["send", str(new), "-p", str(snd / "A"), "-o", str(tmp_path / "s1")]) == 0
    proc = subprocess.run(["btrfs", "receive", "-f", str(tmp_path / "s1"), str(rcv)],
                          capture_output=True, check=False)
    assert proc.returncode != 0
    assert b"cannot find parent" in proc.stderr
    for flag in ("btrfs", run("btrfs", "subvolume", "show", snd / "A").split(
            "UUID:", 1)[1].split()[0]):
        out = tmp_path / f"s-{flag[:5]}"
        assert main(["send", str(new), "-p", str(snd / "A"), "-o", str(out),
                     "--parent-uuid", flag, "--name", f"n{flag[:5]}"]) == 0
        run("btrfs", "receive", "-f", out, rcv)
        assert tree_sum(rcv / f"n{flag[:5]}") == tree_sum(new)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_temporary_snapshot_deleted_on_failure(two_fs: tuple[Path, Path], tmp_path: Path,
                                               exc: type[BaseException]) -> None:
    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    written = [0]

    def write(data: object) -> None:
        written[0] += len(data)  # type: ignore[arg-type]
        if written[0] > 100_000:
            assert any(n.startswith(".btrdelta-send-") for n in _snapshots(snd))
            raise exc()

    store = SendshotStore(tmp_path / "store")
    with pytest.raises(exc):
        send_with_sendshots(write, live, store=store)
    assert _snapshots(snd) == ["live"]
    assert store.records_list() == []  # nothing recorded for a stream that did not end


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_no_record_of_an_incremental_that_failed(two_fs: tuple[Path, Path], tmp_path: Path,
                                                 exc: type[BaseException]) -> None:
    """The record of a change sweep is written while the stream is sent: a stream that does
    not end leaves neither it nor its temporary file, and the next send works."""
    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    store = SendshotStore(tmp_path / "store")
    first = send_with_sendshots(bytearray().extend, live, store=store)
    for i in range(6):
        (live / "d" / f"f{i}").write_bytes(os.urandom(40_000))

    def write(data: object) -> None:
        if len(data) > 10_000:  # type: ignore[arg-type]
            raise exc()

    with pytest.raises(exc):
        send_with_sendshots(write, live, store=store, from_sendshot="latest")
    assert os.listdir(tmp_path / "store" / "records") == [f"{first.recorded.digest}.sendshot"]  # type: ignore[union-attr]
    assert _snapshots(snd) == ["live"]
    again = send_with_sendshots(bytearray().extend, live, store=store, from_sendshot="latest")
    assert again.reused == len(os.listdir(live / "d")) - 6
    assert again.recorded is not None
    assert [s.digest for s in store.records_list()] == [first.recorded.digest,  # type: ignore[union-attr]
                                                        again.recorded.digest]


def test_unchanged_files_are_not_read(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live, 20)
    store = SendshotStore(tmp_path / "store")
    sink = bytearray()
    first = send_with_sendshots(sink.extend, live, store=store)
    assert first.reused == 0
    (live / "d" / "f3").write_bytes(b"new content")
    second = send_with_sendshots(sink.extend, live, store=store, from_sendshot="latest")
    assert second.reused == 19
    assert second.stats.bytes_read < 20_000  # only d/f3 was read (hashed and sent)
    assert second.base is not None
    assert second.base.digest == first.recorded.digest  # type: ignore[union-attr]


def test_a_sendshot_send_imports_no_typing(two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    """``send --record`` and ``send --from-sendshot`` of a live subvolume (the change sweep)
    import neither ``typing`` (~3 % of a small send: btrdelta's annotations are not
    evaluated, zstandard's C backend is loaded without its package: ``btrdelta/_zstd.py``)
    nor ``locale`` (argparse's messages are not looked up: ``cli/_common.py``), also from
    a store that replicates (a receiver's cursor file: ``send/cursors.py`` imported
    ``typing``)."""
    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    store, out = tmp_path / "store", tmp_path / "s"
    script = (
        "import sys\nfrom btrdelta.cli import main\n"
        f"a = main(['send', {str(live)!r}, '-o', {str(out)!r}, '--record', '--store', "
        f"{str(store)!r}, '-q'])\n"
        f"open({str(live / 'd' / 'f1')!r}, 'ab').write(b'x')\n"
        # (a store that replicates too: a receiver's cursor holds the first record)
        f"d = [n for n in __import__('os').listdir({str(store / 'records')!r})\n"
        "     if n.endswith('.sendshot')][0].split('.')[0]\n"
        f"open({str(store / 'cursors.json')!r}, 'w').write("
        "'{\"version\": 1, \"receivers\": {\"r\": {\"digest\": \"%s\"}}}' % d)\n"
        f"b = main(['send', {str(live)!r}, '-o', {str(out)!r}, '--record', '--store', "
        f"{str(store)!r}, '--from-sendshot', 'latest', '-q'])\n"
        "print(a, b, sorted(m for m in ('typing', 'zstandard', 'locale') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 0 []"
    assert len(os.listdir(store / "records")) == 2
    assert json.loads((store / "cursors.json").read_text())["receivers"]["r"]["digest"]


def test_plain_directory_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 10)
    assert main(["send", str(src), "-o", str(tmp_path / "s"), "--record", "--store",
                 str(tmp_path / "store")]) == 0
    assert "only as consistent as the tree was still" in capsys.readouterr().err
    with pytest.raises(BtrdeltaError, match="no sendshot matches"):
        send_with_sendshots(bytearray().extend, src, store=SendshotStore(tmp_path / "store"),
                            from_sendshot="abcd")


def test_hard_link_named_in_a_later_directory(tmp_path: Path) -> None:
    """A record lists a hard-linked inode where its first name is met; its other names may
    be in directories recorded after it."""
    src = tmp_path / "src"
    (src / "z").mkdir(parents=True)
    (src / "z" / "file").write_bytes(os.urandom(20_000))
    os.link(src / "z" / "file", src / "a_link")
    store = ["--store", str(tmp_path / "store")]
    dest = tmp_path / "dest"
    dest.mkdir()
    for i in range(2):
        if i:
            (src / "z" / "new").write_bytes(b"n" * 100)
        out = tmp_path / f"s{i}"
        args = ["send", str(src), "-o", str(out), "--record", *store, "--name", f"v{i}"]
        assert main([*args, *(["--from-sendshot", "latest"] if i else [])]) == 0
        assert main(["receive", "-f", str(out), str(dest)]) == 0
        assert tree_sum(dest / f"v{i}") == tree_sum(src)


def test_a_full_send_hashes_the_files_it_sends_as_it_reads_them(
        two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    """Files of 1 MiB or more that cannot be a CLONE of another are read once: hashed for
    the record from the bytes sent. Oracle: the record of the same snapshot adopted
    (`sendshot create`: every file read and hashed first) has the same digests, data ranges
    and block digests."""
    import io

    from btrdelta.send.sendshot import adopt
    from btrdelta.stream import StreamReader
    from btrdelta.stream.records import Clone

    snd, _rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    big = os.urandom(3 << 20)
    (live / "unique").write_bytes(big[: (2 << 20) + 123])  # a size of its own, a short tail
    with open(live / "sparse", "wb") as f:  # a hole between two data ranges
        f.write(b"a" * 70_000)
        f.seek(3 << 20)
        f.write(b"z" * 5000)
    (live / "same1").write_bytes(os.urandom(1 << 20))  # one size, other bytes
    (live / "same2").write_bytes(os.urandom(1 << 20))
    (live / "copy1").write_bytes(big[: (1 << 20) + 7])  # identical: one is a CLONE
    (live / "copy2").write_bytes(big[: (1 << 20) + 7])
    (live / "small").write_bytes(b"s" * 5000)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "S")
    store = SendshotStore(tmp_path / "store")
    out = bytearray()
    sent = send_with_sendshots(out.extend, snd / "S", store=store)
    adopted = adopt(store, snd / "S")

    def inodes(rec: object) -> dict[int, tuple[object, ...]]:
        reader, f = store.open(rec)  # type: ignore[arg-type]
        try:
            return {i.ino: (i.size, i.flags, i.segments, i.digest, i.bdigest, i.blocks)
                    for i in reader.inodes()}
        finally:
            f.close()

    assert sent.recorded is not None
    assert inodes(sent.recorded) == inodes(adopted)
    records = list(StreamReader(io.BytesIO(bytes(out))))
    assert sum(isinstance(r, Clone) for r in records) == 1
    total = sum(p.stat().st_size for p in live.iterdir())
    # read once (the hole not at all), but the copies and the small file: hashed first
    assert sent.stats.bytes_read <= total - (3 << 20) + 2 * ((1 << 20) + 7) + 5000


#: modules a `send --from-sendshot` of a btrfs snapshot does without (each costs ms of start-up
#: that `btrfs send -p` does not have): dataclasses (inspect, ast, dis, tokenize), ctypes,
#: tempfile (shutil, random, bz2, lzma), thread pools, `signal` (its three enums: the CLI
#: takes `_signal`), the copy module (fs.content has what a send takes of it), what other
#: commands use, and the parts of the send's own packages for other sends: a file compared
#: with its old version on disk, a tree walked, a stream decoded, the CLI's inputs and path
#: checks (session 29)
_NOT_ON_THE_SEND_PATH = {
    "dataclasses", "inspect", "ast", "dis", "tokenize", "ctypes", "tempfile", "shutil",
    "random", "bz2", "lzma", "concurrent.futures", "textwrap", "json", "pathlib",
    "subprocess", "hashlib", "pyfastcdc", "signal", "crc32c", "btrdelta.update", "btrdelta.receive",
    "btrdelta.delta", "btrdelta.cli.receive_cmd", "btrdelta.fs.copy", "btrdelta.fs.remove",
    "btrdelta.send.compare", "btrdelta.send.walk", "btrdelta.stream.decode",
    "btrdelta.stream.reader", "btrdelta.cli._input", "btrdelta.cli._paths",
}
#: the byte code of btrdelta's modules such a send imports (compiled, marshalled: what its
#: start-up unmarshals and runs, ~1.7 µs a KB unmarshalled): 1,023 KB without session 29's
#: moves of what it did not run, 941 KB with them; a module or function added to the path
#: must fit or move something else out (the figure is Python 3.11's); 979 KB at session 32's
#: middle, raised by 2 KB for the block index's lookups before its dict (a changed 640 MiB
#: file's round: ~40-200 ms of indexing spared; 2 KB unmarshalled: ~4 us); raised by 4 KB
#: in session 33 for fix33's cursor edits under the store's lock, the hasher held weakly
#: (no reference cycle per send) and full-disk errors naming their file (984.5 KB), and
#: room for huge33's sparse-digest dispatch (its work in lazily imported modules); since
#: then compiled under each module's name in the package (``btrdelta/send/store.py``), not
#: its path, so the figure does not depend on where the checkout is (a longer path gave a
#: few hundred bytes more): 982.7 KB at session 33's end
_SEND_PATH_CODE = 985_500
_IMPORTED = ("import marshal, sys\nfrom btrdelta.cli import main\ncode = main({argv!r})\n"
             "py = [m.__file__ for n, m in list(sys.modules.items()) if n.startswith('btrdelta')"
             " and (getattr(m, '__file__', None) or '').endswith('.py')]\n"
             "size = sum(len(marshal.dumps(compile(open(f, 'rb').read(),\n"
             "                                     f[f.rindex('/btrdelta/') + 1:], 'exec')))\n"
             "           for f in py)\n"
             "print(code, size, sorted(set(sys.modules) & {heavy!r}))")


def test_send_from_a_record_imports_no_heavy_module(two_fs: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """`send SNAP --from-sendshot latest --record` of the kernel's read-only snapshot (the
    in-place benchmark's command) in a fresh interpreter: the modules it imported (sys.modules
    at the end) include none of ``_NOT_ON_THE_SEND_PATH``, and btrdelta's of them compile to
    at most ``_SEND_PATH_CODE`` bytes of byte code; its stream is received by the kernel
    (tree-sum equal to the snapshot)."""
    snd, rcv = two_fs
    live, store = snd / "live", tmp_path / "store"
    run("btrfs", "subvolume", "create", live)
    _fill(live, 20)
    for i in (0, 1):
        if i:
            (live / "d" / "f3").write_bytes(b"changed")
            os.rename(live / "d" / "f4", live / "f4")
        run("btrfs", "subvolume", "snapshot", "-r", live, snd / f"s{i}")
        argv = ["send", str(snd / f"s{i}"), "-o", str(tmp_path / f"s{i}.stream"), "--record",
                "--store", str(store), "-q", *(["--from-sendshot", "latest"] if i else [])]
        out = run(sys.executable, "-c",
                  _IMPORTED.format(argv=argv, heavy=_NOT_ON_THE_SEND_PATH)).split(" ", 2)
        assert out[0] == "0"
        if i:
            assert out[2].strip() == "[]"
            if sys.version_info[:2] == (3, 11):
                assert int(out[1]) <= _SEND_PATH_CODE, out[1]
        run("btrfs", "receive", "-f", tmp_path / f"s{i}.stream", rcv)
    assert tree_sum(rcv / "s1") == tree_sum(snd / "s1")


def test_adopted_snapshot_of_the_source_is_swept_not_read(two_fs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """Moving from kernel incrementals to sendshots: the last snapshot the kernel sent,
    adopted with --source naming the live subvolume it was taken of, is a base like a
    record btrdelta made; after the snapshot is deleted, the next send reads only what
    changed (a large file: only its rewritten blocks), and the kernel applies it."""
    snd, rcv = two_fs
    store = str(tmp_path / "store")
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live)
    big = live / "big"
    big.write_bytes(os.urandom(4 << 20))
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "A")
    run("sh", "-c", f"btrfs send -q {snd / 'A'} | btrfs receive -q {rcv}")
    assert main(["sendshot", "--store", store, "create", str(snd / "A"),
                 "--source", str(live)]) == 0
    run("btrfs", "subvolume", "delete", snd / "A")
    with open(big, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"B" * 8192)
    (live / "d" / "f3").write_bytes(b"small change")
    run("sync")
    out = tmp_path / "b"
    with open(out, "wb") as f:
        res = send_with_sendshots(f.write, live, store=SendshotStore(store),
                                  from_sendshot="latest", name=b"B")
    # the two rewritten blocks (hashed, then sent) and the small file, not 4 MiB + 12 files
    assert res.stats.bytes_read <= 4 * 8192 + 100, res.stats.bytes_read
    run("btrfs", "receive", "-f", out, rcv)
    assert tree_sum(rcv / "B") == tree_sum(live)
    # a snapshot of another subvolume named as --source: not swept (every file read)
    other = snd / "other"
    run("btrfs", "subvolume", "create", other)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "C")
    store2 = SendshotStore(tmp_path / "store2")
    assert main(["sendshot", "--store", str(store2.path), "create", str(snd / "C"),
                 "--source", str(other)]) == 0
    (head,) = [s.head for s in store2.records_list()]
    assert head.subvol_uuid is None
    assert head.generation == 0


def test_prune_counts_an_adopted_base_with_the_sends_of_its_source(
    two_fs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A receiver's copy adopted with ``--source`` is of that source's lineage for
    ``prune`` as for ``send --from-sendshot latest``: ``prune --keep 1`` deletes it once
    two sends followed (and the second, a patch record of the first, keeps it). It was
    grouped apart (no subvolume UUID) and kept forever."""
    snd, rcv = two_fs
    store = str(tmp_path / "store")
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    _fill(live, 3)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "A")
    run("sh", "-c", f"btrfs send -q {snd / 'A'} | btrfs receive -q {rcv}")
    assert main(["sendshot", "--store", store, "create", str(rcv / "A"),
                 "--source", str(live)]) == 0
    for name in ("B", "C"):
        (live / "d" / f"{name}").write_bytes(os.urandom(5000))
        assert main(["send", str(live), "-o", str(tmp_path / name), "--from-sendshot",
                     "latest", "--record", "--store", store, "--name", name]) == 0
    capsys.readouterr()
    assert main(["sendshot", "--store", store, "--json", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    ids = [r["id"] for r in listed]
    assert len(ids) == 3
    assert [r["base"] for r in listed] == [None, None, ids[1]]  # C: a patch record of B
    assert main(["sendshot", "--store", store, "--json", "prune", "--keep", "1"]) == 0
    # (C is a patch record of B, a whole one: B is kept with it)
    assert sorted(json.loads(capsys.readouterr().out)["deleted"]) == sorted(ids[:1])
    assert [s.digest for s in SendshotStore(store).records_list()] == ids[1:]


def test_a_killed_senders_snapshot_is_deleted_by_the_next_send(two_fs: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """`kill -9` of a send --record of a writable subvolume leaves its temporary snapshot; the next
    send of that subvolume deletes it, and only it: not one whose sender lives, not one of
    another subvolume, not a writable one, not a name of another shape."""
    import signal
    import time

    snd, rcv = two_fs
    live, other = snd / "live", snd / "other"
    for sv in (live, other):
        run("btrfs", "subvolume", "create", sv)
    _fill(live)
    # standard output a pipe nobody reads: the send blocks once it is full, snapshot taken
    store = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "send", str(live), "--record",
                             "--store", store],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(".btrdelta-send-") for n in _snapshots(snd)):
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    (leftover,) = [n for n in _snapshots(snd) if n.startswith(".btrdelta-send-")]
    dead = 4_000_000 + 1  # above any pid_max: no such process
    keep = [f".btrdelta-send-{os.getpid()}-0000beef",  # a live sender's
            f".btrdelta-send-{dead}-0000cafe-x"]       # not our name
    for name in keep:
        run("btrfs", "subvolume", "snapshot", "-r", live, snd / name)
    run("btrfs", "subvolume", "snapshot", "-r", other, snd / f".btrdelta-send-{dead}-00000001")
    run("btrfs", "subvolume", "snapshot", live, snd / f".btrdelta-send-{dead}-00000002")
    keep += [f".btrdelta-send-{dead}-00000001", f".btrdelta-send-{dead}-00000002"]
    assert main(["send", str(live), "-f", str(tmp_path / "s"), "-q", "--record",
                 "--store", store]) == 0
    left = set(_snapshots(snd))
    assert leftover not in left
    assert left == {"live", "other", *keep}
    run("btrfs", "receive", "-f", tmp_path / "s", rcv)
    assert tree_sum(rcv / "live") == tree_sum(live)


def test_full_stream_creates_and_writes_each_file_at_once(two_fs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """A full record-mode send (replication's) puts each file's data and metadata right after
    its creation (the receiver writes it through the descriptor it created it with) and a
    directory's metadata after everything below it; btrfs receive and btrdelta receive both
    rebuild the tree: read-only directories, hard links across directories (first name in
    the root, a further one below), symlinks, a FIFO, xattrs, a large and an empty file."""
    snd, rcv = two_fs
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    for d in ("a/b/c", "a/ro", "e"):
        (live / d).mkdir(parents=True)
    for i, p in enumerate(("a/f", "a/b/g", "a/b/c/h", "a/ro/k", "e/m", "top")):
        (live / p).write_bytes(os.urandom(100 + 900 * i))
    (live / "big").write_bytes(os.urandom(3 << 20))
    (live / "a" / "empty").write_bytes(b"")
    os.link(live / "top", live / "a" / "b" / "linked")  # first name: "top" (the root's)
    (live / "a" / "sym").symlink_to("f")
    os.mkfifo(live / "e" / "fifo")
    os.setxattr(live / "a" / "f", "user.k", b"v")
    os.chmod(live / "a" / "ro", 0o555)
    os.chmod(live / "a" / "b", 0o500)
    os.utime(live / "a" / "b", ns=(1_000_000_000, 2_000_000_000))
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "S")
    stream = tmp_path / "s"
    assert main(["send", str(snd / "S"), "-o", str(stream), "--record",
                 "--store", str(tmp_path / "store")]) == 0
    with open(stream, "rb") as f:
        recs = [ev for ev in StreamReader(f).events() if hasattr(ev, "cmd")]
    paths = [getattr(r, "path", b"") for r in recs]
    creations = (Mkfile, Mkdir, Link, Symlink, Mkfifo)
    for i, rec in enumerate(recs):
        if isinstance(rec, Mkfile):  # its records follow it, before the next creation
            j = next(j for j in range(i + 1, len(recs)) if paths[j] != rec.path)
            own = {type(r) for r in recs[i + 1:j]}
            assert {Chown, Chmod, Utimes} <= own, rec.path
            assert (Write in own) == (rec.path != b"a/empty"), rec.path
            assert isinstance(recs[j], creations) or rec.path.startswith(paths[j] + b"/") \
                or not paths[j], (rec, recs[j])
        if isinstance(rec, Mkdir):  # its metadata after every record below it
            last_below = max(j for j, p in enumerate(paths) if p.startswith(rec.path + b"/"))
            meta = [j for j, p in enumerate(paths) if p == rec.path and j != i]
            assert meta, rec.path
            assert min(meta) > last_below, rec.path
    assert any(isinstance(r, Link) and r.path == b"a/b/linked" and r.path_link == b"top"
               for r in recs)
    run("btrfs", "receive", "-f", stream, rcv)
    assert tree_sum(rcv / "S") == tree_sum(snd / "S")
    mine = tmp_path / "mine"
    mine.mkdir()
    with open(stream, "rb") as f:
        receive(StreamReader(f).events(), mine, backend="dir")
    assert tree_sum(mine / "S") == tree_sum(snd / "S")


def test_the_first_send_on_an_adopted_snapshot_repairs_the_root_mtime_the_kernel_left(
        two_fs: tuple[Path, Path], tmp_path: Path) -> None:
    """The kernel's `btrfs send -p` of a change that removes a directory (`srv/new`) moves
    it to an orphan name in the root, removes it there and sends no UTIMES of the root: the
    kernel's receive, and `btrdelta receive` as it must, leave the root's mtime at the time
    of the receive. A record adopted from the sender's snapshot holds the source's root
    mtime, so later btrdelta streams sent nothing for the root and never repaired it
    (session 32's trial); the first send on an adopted record now sends the root's times."""
    snd, rcv = two_fs
    store = str(tmp_path / "store")
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    (live / "srv" / "new" / "x").mkdir(parents=True)
    (live / "srv" / "new" / "x" / "f").write_bytes(b"gone soon")
    (live / "srv" / "keep").write_bytes(b"kept")
    os.utime(live, (1_500_000_000, 1_500_000_000))
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "A")
    subprocess.run(["rm", "-r", str(live / "srv" / "new")], check=True)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "B")
    ours = rcv / "ours"
    ours.mkdir()
    for name, parent in (("A", []), ("B", ["-p", str(snd / "A")])):
        stream = tmp_path / f"{name}.kernel"
        run("btrfs", "send", "-q", *parent, "-f", stream, snd / name)
        run("btrfs", "receive", "-q", "-f", stream, rcv)
        assert main(["receive", "-q", "-f", str(stream), str(ours)]) == 0
    # the kernel's behaviour, copied by our receive: the root's mtime is the receive's
    assert os.stat(live).st_mtime_ns == 1_500_000_000 * 10**9
    for got in (rcv / "B", ours / "B"):
        assert os.stat(got).st_mtime_ns != os.stat(live).st_mtime_ns
        assert tree_sum(got, ignore_root_mtime=True) == tree_sum(snd / "B",
                                                                 ignore_root_mtime=True)
    # the sender's snapshot adopted, a file changed, a btrdelta stream to both receivers
    assert main(["sendshot", "--store", store, "create", "-q", str(snd / "B"),
                 "--source", str(live)]) == 0
    (live / "srv" / "keep").write_bytes(b"changed")
    os.utime(live / "srv", (1_500_000_000, 1_500_000_000))  # (the root itself unchanged)
    os.utime(live, (1_500_000_000, 1_500_000_000))
    assert main(["send", "-q", str(live), "-o", str(tmp_path / "c"), "--from-sendshot",
                 "latest", "--record", "--store", store, "--name", "C"]) == 0
    run("btrfs", "receive", "-q", "-f", tmp_path / "c", rcv)
    assert main(["receive", "-q", "-f", str(tmp_path / "c"), str(ours)]) == 0
    assert tree_sum(rcv / "C") == tree_sum(live)
    assert tree_sum(ours / "C") == tree_sum(live)
    # once: the next send on the record it made sends nothing of the unchanged root
    assert main(["send", "-q", str(live), "-o", str(tmp_path / "d"), "--from-sendshot",
                 "latest", "--store", store, "--name", "D"]) == 0
    with open(tmp_path / "d", "rb") as f:
        assert not [ev for ev in StreamReader(f).events() if isinstance(ev, Utimes)]
