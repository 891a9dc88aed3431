"""Damaged real files through the CLI, as an attacker or a bad disk would hand them over.

The inputs are files nobody wrote by hand: streams the kernel's ``btrfs send`` made
(committed under tests/data/streams) and a full stream, an incremental stream, a delta
stream, an image archive, a sendshot record, a replication sender's side of a
conversation (to a receiver) and a receiver's side (to a sender), a versions
repository's signed timestamp, index, version records and delta (read from its directory
and over HTTP), a release's solid full, full index and pack (a first install), a sendshot
store's cursors, head cache and seed and a replication receiver's state files, a backup
location's index and backups, and a casync index and chunk file, made here by our own
commands (and ``casync make``). Each is mutated at many offsets (truncated, one
bit flipped, four bytes overwritten by a huge or zero length, garbage; a send stream's
records, a sendshot record's (compressed again, under its new digest) and the replication
messages also changed *with their CRC32C fixed*, so the damage reaches the decoders and the
applier; a JSON file's fields also replaced by values of other types) and given to
every command that reads it.

Every run must end with an exit code of the table, never an internal error or a
traceback, and print at most one error line (exactly one on failure). Where the damage is
certain to be detectable it must fail: a flipped bit after a stream's header (every byte is
under a record's CRC32C), a truncated stream (no END), a damaged delta stream. A receive
writes nothing outside DEST; one that fails leaves nothing under a final name, and a delta
that fails leaves the old version as it was. An image clone that exits 0 wrote the image.
A send from a damaged sendshot record fails unless the record's content is as its name
says, and one that exits 0 wrote a well-formed stream. A replication receiver shows no name
the protocol did not commit, and what it committed is the sender's tree; a sender given a
damaged receiver's side returns or fails with one error, its source as it was. An update from a
damaged repository gives the version exactly or fails and leaves DEST's versions as they
were; a first install from a damaged solid full installs the release exactly from the
packs.

``BTRDELTA_MUTATIONS=N`` runs N mutations per input and command (default 24: a few
seconds); e.g. ``BTRDELTA_MUTATIONS=2000 .venv/bin/python -m pytest tests/cli/test_mutations.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.errors import exit_codes
from btrdelta.stream import btrfs_crc32c
from tests.conftest import DATA

N = int(os.environ.get("BTRDELTA_MUTATIONS", "24"))
CODES = {code for code, _ in exit_codes()}
HEADER = 17  # "btrfs-stream\0" and the version
KERNEL = ["odd-names-W8.A.v1.stream", "xattrs.A.v2.stream", "special-files.A.v2.stream"]


def mutations(data: bytes, n: int, seed: str, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` damaged copies of ``data`` (offsets from ``start`` on), named by what was done."""
    rng = random.Random(seed)
    for i in range(n):
        off = rng.randrange(start, len(data))
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            yield f"truncated at {off}", bytes(b[:off])
        elif kind == 1:
            bit = rng.randrange(8)
            b[off] ^= 1 << bit
            yield f"bit {bit} of byte {off} flipped", bytes(b)
        elif kind == 2:
            value = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\x00\x00\x00\x00"])
            b[off:off + 4] = value
            yield f"{value.hex()} at {off}", bytes(b)
        else:
            size = rng.randrange(1, 64)
            b[off:off + size] = rng.randbytes(size)
            yield f"{size} random bytes at {off}", bytes(b)


def record_mutations(data: bytes, n: int, seed: str,
                     first: int = HEADER) -> Iterator[tuple[str, bytes]]:
    """Damage inside a record's payload (a length, a path byte, a value) with the record's
    CRC32C recomputed: the framing accepts it and the decoders and the applier see it.
    ``first``: where the first record is (after the send stream's header)."""
    records = []
    off = first
    while off + 10 <= len(data):
        length = struct.unpack_from("<I", data, off)[0]
        if length:
            records.append((off, length))
        off += 10 + length
    rng = random.Random(seed)
    for i in range(n):
        start, length = rng.choice(records)
        b = bytearray(data)
        at = start + 10 + rng.randrange(length)
        if i % 3 == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif i % 3 == 1:
            b[at] = rng.choice(b"./\0\xff\n")
        else:
            at = min(at, start + 10 + length - 2)
            b[at:at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x00\x10"])
        struct.pack_into("<I", b, start + 6, 0)
        crc = btrfs_crc32c([bytes(b[start:start + 10 + length])])
        struct.pack_into("<I", b, start + 6, crc)
        yield f"record at {start}, byte {at} changed, CRC fixed", bytes(b)


def run(capfd: pytest.CaptureFixture[str], argv: list[str], what: str) -> int:
    """Run the CLI in this process; check the exit code and the error line."""
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    assert code in CODES, f"{what}: {argv}: exit {code}: {err}"
    for leak in ("Traceback", "internal error"):
        assert leak not in err, f"{what}: {argv}: {err}"
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == (1 if code else 0), f"{what}: {argv}: exit {code}: {err}"
    return code


def copy(src: Path, dest: Path) -> None:
    """``cp -a`` (a FIFO too)."""
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)


def visible(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry below ``root`` and the content of its files (symlinks not followed)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() and not
                                             p.is_symlink() else None)
    return out


def make_tree(root: Path, version: int) -> Path:
    """A small tree with what streams carry: data, holes, links, a symlink, a FIFO, xattrs."""
    root.mkdir()
    rng = random.Random(version)
    (root / "d" / "e").mkdir(parents=True)
    for i in range(6):
        (root / "d" / f"f{i}").write_bytes(rng.randbytes(3000 + 1000 * i) * (1 + version))
    (root / "d" / "e" / "text").write_text("hello\n" * (200 + version))
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 20)
        f.seek(300000)
        f.write(b"data" * 1000 * version)
    os.link(root / "d" / "f1", root / "hard")
    os.symlink("d/e/text", root / "link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "d" / "f0", b"user.v", str(version).encode())
    if version > 1:
        (root / "d" / "f2").unlink()
        (root / "d" / "e").rename(root / "moved")
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files made by our own commands: streams, a delta stream, an archive."""
    base = tmp_path_factory.mktemp("made")
    v1, v2 = make_tree(base / "v1", 1), make_tree(base / "v2", 2)
    out = {"v1": v1, "v2": v2}
    for name, argv in {
        "full": ["send", "-q", str(v1), "-o", str(base / "full.stream")],
        "inc": ["send", "-q", "--compress", "zstd", "-p", str(v1), str(v2),
                "-o", str(base / "inc.stream")],
        "delta": ["delta", "make", "-q", "-f", str(base / "inc.stream"), "--old", str(v1),
                  "-o", str(base / "inc.delta")],
        "received": ["receive", "-q", "-f", str(base / "full.stream"),
                     str(base / "received")],
    }.items():
        if name == "received":
            (base / "received").mkdir()
        assert main(argv) == 0, name
    out.update(full=base / "full.stream", inc=base / "inc.stream", delta=base / "inc.delta",
               received=base / "received")
    image = base / "image"
    image.write_bytes(random.Random(3).randbytes(200_000) + bytes(100_000)
                      + (v1 / "d" / "f5").read_bytes())
    assert main(["image", "compress", "-q", "-i", str(image), "-o", str(base / "img.bdar"),
                 "--avg-chunk", "16K"]) == 0
    out.update(image=image, archive=base / "img.bdar")
    return out


def _stream_inputs() -> list[str]:
    return [*KERNEL, "full", "inc"]


@pytest.mark.parametrize("name", _stream_inputs())
def test_damaged_streams(name: str, made: dict[str, Path], tmp_path: Path,
                         capfd: pytest.CaptureFixture[str]) -> None:
    src = DATA / "streams" / name if name.endswith(".stream") else made[name]
    data = src.read_bytes()
    work = tmp_path / "w"
    work.mkdir()
    f = work / "in.stream"
    cases = [*mutations(data, N, name), *record_mutations(data, N, name)]
    for what, damaged in cases:
        f.write_bytes(damaged)
        # every byte after the header is under a CRC32C, and a stream ends with END
        detectable = what.startswith("truncated") or (
            "flipped" in what and int(what.split()[4]) >= HEADER)
        for argv in (["dump"], ["dump", "--json"], ["stat"], ["verify"]):
            code = run(capfd, [*argv, str(f)], what)
            if argv == ["verify"] and detectable:
                assert code, f"{what}: verify exit 0"
        if name == "inc":  # incremental: onto a copy of the received parent
            dest = work / "dest"
            copy(made["received"], dest)
        else:
            dest = work / "dest"
            dest.mkdir()
        before = visible(dest)
        code = run(capfd, ["receive", "-q", "-f", str(f), str(dest)], what)
        if code:  # nothing under a final name
            assert visible(dest) == before, f"{what}: {visible(dest)}"
        assert sorted(os.listdir(work)) == ["dest", "in.stream"], what
        assert sorted(os.listdir(tmp_path)) == ["w"], what
        shutil.rmtree(dest)


def test_damaged_delta_stream(made: dict[str, Path], tmp_path: Path,
                              capfd: pytest.CaptureFixture[str]) -> None:
    data = made["delta"].read_bytes()
    work = tmp_path / "w"
    work.mkdir()
    f = work / "in.delta"
    old = snapshot(made["received"])
    for what, damaged in mutations(data, 2 * N, "delta"):
        f.write_bytes(damaged)
        for argv in (["delta", "stat"], ["verify"], ["stat"]):
            code = run(capfd, [*argv, str(f)], what)
            if argv == ["verify"]:
                assert code, f"{what}: verify exit 0"
        out = work / "out.stream"
        code = run(capfd, ["delta", "expand", "-q", "-f", str(f), "--old", str(made["v1"]),
                           "-o", str(out)], what)
        assert code, f"{what}: delta expand exit 0"
        assert not out.exists(), what
        dest = work / "dest"
        copy(made["received"], dest)
        code = run(capfd, ["receive", "-q", "-f", str(f), str(dest)], what)
        assert code, f"{what}: receive exit 0"
        assert snapshot(dest) == old, f"{what}: the old version changed"
        assert sorted(os.listdir(work)) == ["dest", "in.delta"], what
        shutil.rmtree(dest)


def test_damaged_image_archive(made: dict[str, Path], tmp_path: Path,
                               capfd: pytest.CaptureFixture[str]) -> None:
    data = made["archive"].read_bytes()
    image = made["image"].read_bytes()
    work = tmp_path / "w"
    work.mkdir()
    f = work / "in.bdar"
    # the header and the index (at the end) are where lengths and offsets are
    cases = [*mutations(data, N, "archive"),
             *mutations(data, N, "archive-index", start=len(data) - 2048),
             *mutations(data[:512], N // 2, "archive-header")]
    for what, damaged in cases:
        if len(damaged) < 512 and not what.startswith("truncated"):
            damaged += data[512:]  # a damaged header, the rest as it was
        f.write_bytes(damaged)
        run(capfd, ["image", "info", str(f)], what)
        out = work / "out.img"
        code = run(capfd, ["image", "clone", "-q", str(f), "--output", str(out)], what)
        if code == 0:
            assert out.read_bytes() == image, f"{what}: exit 0 with another image"
        else:
            assert not out.exists(), what
        out.unlink(missing_ok=True)
        store = work / "store"
        code = run(capfd, ["image", "clone", "-q", str(f), f"{store}/img"], what)
        if code:
            assert not (store / "img").exists(), what
        shutil.rmtree(store, ignore_errors=True)
        assert sorted(os.listdir(work)) == ["in.bdar"], what


def _sendshot_body(record: bytes) -> bytes | None:
    """The uncompressed BODY of a sendshot record (None: its zstd frames do not decode)."""
    import zstandard

    try:
        return zstandard.ZstdDecompressor().stream_reader(
            record[SENDSHOT_HEADER:], read_across_frames=True).read()
    except zstandard.ZstdError:
        return None


SENDSHOT_HEADER = 22  # "btrdelta-sendshot\0" and the version


def test_damaged_sendshot_records(made: dict[str, Path], tmp_path: Path,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A damaged record in a store, read by `sendshot list`, `sendshot show` and `send
    --from-sendshot`: under its own name (the digest in the name catches any change of its
    content: the send must fail) and, damaged inside a record with its CRC32C fixed and
    compressed again, under its new digest (the decoders and the sender see the damage)."""
    import blake3
    import zstandard

    store = tmp_path / "store"
    records = store / "records"
    assert main(["send", "-q", str(made["v1"]), "-o", str(tmp_path / "base.stream"),
                 "--record", "--store", str(store)]) == 0
    (name,) = os.listdir(records)
    data = (records / name).read_bytes()
    body = _sendshot_body(data)
    assert body is not None
    renamed = [(what, data[:SENDSHOT_HEADER] + zstandard.ZstdCompressor().compress(b))
               for what, b in record_mutations(body, N, "sendshot-records", first=0)]
    cases = [*((what, b, False) for what, b in mutations(data, N, "sendshot")),
             *((what, b, True) for what, b in renamed)]
    out = tmp_path / "out.stream"
    for what, damaged, fixed in cases:
        shutil.rmtree(records)
        records.mkdir()
        got = _sendshot_body(damaged)
        ident = (blake3.blake3(damaged[:SENDSHOT_HEADER] + got).hexdigest()
                 if fixed and got is not None else name.split(".")[0])
        (records / f"{ident}.sendshot").write_bytes(damaged)
        run(capfd, ["sendshot", "--store", str(store), "--json", "list"], what)
        run(capfd, ["sendshot", "--store", str(store), "show", ident], what)
        code = run(capfd, ["send", "-q", str(made["v2"]), "-o", str(out), "--store",
                           str(store), "--from-sendshot", ident], what)
        if code:
            assert not out.exists(), what
            continue
        if not fixed:  # only what leaves the header and the BODY as they were
            assert damaged[:SENDSHOT_HEADER] == data[:SENDSHOT_HEADER], what
            assert got == body, what
        assert run(capfd, ["verify", str(out)], what) == 0, f"{what}: a damaged stream"
        out.unlink()
        assert sorted(os.listdir(tmp_path)) == ["base.stream", "store"], what


class _Recorded:
    """A channel to a local `replicate --serve` that keeps what the sender wrote."""

    def __init__(self, dest: Path) -> None:
        from btrdelta.update.channels import spawn_local

        self.ch, self.sent = spawn_local(str(dest)), bytearray()

    def read(self, n: int) -> bytes:
        return self.ch.read(n)

    def write(self, data: bytes) -> None:
        self.sent += data
        self.ch.write(data)

    def close(self) -> None:
        self.ch.close()


REPL_MAGIC = 18  # "btrdelta-repl\0" and the framing version


def _messages(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset, message number) of each message of one side of a conversation."""
    off = REPL_MAGIC
    while off + 10 <= len(data):
        length, number = struct.unpack_from("<IH", data, off)
        yield off, number
        off += 10 + length


class _Sender(threading.Thread):
    """Plays a recorded sender to a receiver through two pipes: ``before`` at once, ``after``
    (the COMMIT, which a sender sends only once the last segment is acknowledged) when
    ``acks`` ACKs came back, or when the receiver has read everything and said nothing for
    ``patience`` seconds (it waits for bytes the damage announced); then the end."""

    def __init__(self, before: bytes, after: bytes, acks: int, patience: float) -> None:
        super().__init__(daemon=True)
        self.before, self.after, self.acks, self.patience = before, after, acks, patience
        self.stdin, self.feed = os.pipe()  # the receiver's standard input
        self.said, self.stdout = os.pipe()  # its standard output
        self.unread = os.dup(self.stdin)  # (kept: how much it has not read yet)
        self.done = threading.Event()
        os.set_blocking(self.feed, False)

    def run(self) -> None:
        import fcntl
        import select
        import termios

        out, after, replies = memoryview(self.before), self.after, bytearray()
        quiet = time.monotonic()
        while not self.done.is_set() and (out or after is not None):
            r, w, _ = select.select([self.said], [self.feed] if out else [], [], 0.02)
            if r:
                got = os.read(self.said, 1 << 16)
                if not got:
                    break  # it closed its standard output: it is done
                replies += got
                quiet = time.monotonic()
            if w:
                try:
                    out = out[os.write(self.feed, out[:1 << 16]):]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    break
                quiet = time.monotonic()
            if not out and after is not None:
                acks = sum(n == 8 for _, n in _messages(bytes(replies)))
                left = struct.unpack("i", fcntl.ioctl(self.unread, termios.FIONREAD,
                                                      b"\0" * 4))[0]
                if acks >= self.acks or (not left
                                         and time.monotonic() - quiet > self.patience):
                    out, after = memoryview(after), None
        os.close(self.feed)  # the end of its input

    def serve(self, capfd: pytest.CaptureFixture[str], dest: Path, what: str) -> int:
        """`btrdelta replicate --serve DEST` in this process on the two pipes (it closes its
        standard input and output: they are put back after)."""
        saved = os.dup(0), os.dup(1)
        os.dup2(self.stdin, 0)
        os.dup2(self.stdout, 1)
        os.close(self.stdin)
        os.close(self.stdout)
        self.start()
        try:
            return run(capfd, ["replicate", "-q", "--serve", str(dest)], what)
        finally:
            self.done.set()
            self.join()
            for fd, was in zip((0, 1), saved, strict=True):
                os.dup2(was, fd)
                os.close(was)
            os.close(self.said)
            os.close(self.unread)


def _replay(capfd: pytest.CaptureFixture[str], said: bytes, sent: bytes, dest: Path,
            what: str, patience: float = 0.3) -> int:
    """``sent`` (a sender's side, perhaps damaged) to `replicate --serve DEST`, paced by
    ``said`` (the undamaged side: where its COMMIT starts, how many CHECKPOINTs)."""
    commit = next(off for off, n in _messages(said) if n == 9)
    acks = sum(n == 7 for _, n in _messages(said))
    return _Sender(sent[:commit], sent[commit:], acks, patience).serve(capfd, dest, what)


@pytest.fixture(scope="module")
def conversation(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[bytes, str, str]:
    """What a sender says to an empty receiver to replicate ``v1`` (a full stream in
    segments of 8 KiB: DATA, two CHECKPOINTs and their ACKs), the name it commits and its
    tree-sum."""
    from btrdelta.send.store import SendshotStore
    from btrdelta.tree import tree_sum
    from btrdelta.update.replicate import replicate

    base = tmp_path_factory.mktemp("conversation")
    dest = base / "dest"
    dest.mkdir()
    ch = _Recorded(dest)
    res = replicate(made["v1"], ch, store=SendshotStore(base / "store"), segment=16 << 10)
    ch.close()
    assert res.outcome == "committed", res
    (name,) = visible(dest)
    assert sum(n == 7 for _, n in _messages(bytes(ch.sent))) >= 2
    return bytes(ch.sent), name, tree_sum(dest / name)


def test_damaged_replication_messages(conversation: tuple[bytes, str, str], tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    """A sender's side of a replication, damaged (and damaged inside a message with its
    CRC32C fixed), to `replicate --serve`: the receiver shows no name but the one the
    protocol committed, and that one is the sender's tree; nothing outside DEST. (Undamaged,
    the same bytes commit.)"""
    from btrdelta.tree import tree_sum

    data, name, expected = conversation
    work = tmp_path / "w"
    work.mkdir()
    dest = work / "dest"
    dest.mkdir()
    assert _replay(capfd, data, data, dest, "undamaged", patience=60) == 0
    assert visible(dest) == [name]
    assert tree_sum(dest / name) == expected
    shutil.rmtree(dest)
    cases = [*mutations(data, N, "replication"),
             *record_mutations(data, N, "replication-messages", first=REPL_MAGIC)]
    for what, damaged in cases:
        dest.mkdir()
        code = _replay(capfd, data, damaged, dest, what)
        shown = visible(dest)
        assert shown in ([], [name]), f"{what}: {shown}"
        if shown:
            assert code == 0, what
            assert not what.startswith("truncated"), what
            assert tree_sum(dest / name) == expected, f"{what}: committed another tree"
        assert sorted(os.listdir(work)) == ["dest"], what
        shutil.rmtree(dest)


def _slowed(fn: Callable[..., object], delay: float, told: list[str]) -> Callable[..., None]:
    """``fn`` made ``delay`` seconds slower, noting in ``told`` when each call starts and
    when it ends."""

    def slow(*args: object) -> None:
        told.append("start")
        time.sleep(delay)
        fn(*args)
        told.append("end")

    return slow


@pytest.mark.parametrize("damage", ["crc", "cut", "checkpoint"])
def test_a_damaged_commit_waits_for_the_write_out(
        damage: str, conversation: tuple[bytes, str, str], tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender's side whose COMMIT is damaged (a bit of it flipped, cut in its middle, or
    a CHECKPOINT with its CRC32C right where the COMMIT was), after the whole stream was
    acknowledged and the subvolume sealed: `replicate --serve` fails or returns only once
    DEST's write-out, a thread started at the seal, ended (made slow here). It was left
    running past the command's end, which closes the standard input and output that the
    thread's files could then take (make fuzz: an unclosed descriptor 0, then EBADF)."""
    from btrdelta.update.replica import Replica

    data, _, _ = conversation
    told: list[str] = []
    monkeypatch.setattr(Replica, "_write_out", _slowed(Replica._write_out, 0.3, told))
    at = next(off for off, n in _messages(data) if n == 9)
    b = bytearray(data)
    if damage == "crc":
        b[at + 12] ^= 1
    elif damage == "cut":
        del b[at + 14:]
    else:
        struct.pack_into("<HI", b, at + 4, 7, 0)
        length = struct.unpack_from("<I", b, at)[0]
        struct.pack_into("<I", b, at + 6, btrfs_crc32c([bytes(b[at:at + 10 + length])]))
    (tmp_path / "dest").mkdir()
    _replay(capfd, data, bytes(b), tmp_path / "dest", damage, patience=60)
    ended = told.count("end")
    assert told.count("start") == ended >= 1, told
    assert not visible(tmp_path / "dest"), damage


def test_a_cut_before_the_accept_waits_for_the_new_state_file(
        conversation: tuple[bytes, str, str], tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender's side cut off after its HELLO, to a new DEST: `replicate --serve` ends
    once the thread making DEST's new state file durable (its fsyncs, made slow here)
    ended. It was waited for only before the ACCEPT: a conversation ended before it left
    the thread opening and closing files past the command's end (make fuzz: EBUSY and
    EBADF on descriptors 0 and 1 in the next run)."""
    import btrdelta.update.replica as replica

    data, _, _ = conversation
    told: list[str] = []
    monkeypatch.setattr(replica.os, "fsync", _slowed(os.fsync, 0.5, told))
    plan = next(off for off, n in _messages(data) if n == 3)
    (tmp_path / "dest").mkdir()
    _replay(capfd, data, data[:plan], tmp_path / "dest", "cut", patience=0.05)
    ended = told.count("end")
    assert told.count("start") == ended >= 2, told


@pytest.fixture(scope="module")
def repository(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    """A signed versions repository of ``v1`` and ``v2`` (a delta 1 -> 2), its root public
    key and a DEST that holds version 1 (`update` from the repository)."""
    from btrdelta import trust

    base = tmp_path_factory.mktemp("repository")
    repo, key, pub = base / "repo", base / "root.pem", base / "root.pub"
    trust.save_key_pair(trust.generate_key(), str(key), str(pub))
    assert main(["repo", "init", str(repo), "--avg-chunk", "4K"]) == 0
    for version in ("1", "2"):
        assert main(["repo", "add", str(repo), version, str(made[f"v{version}"])]) == 0
    assert main(["repo", "sign", str(repo), "--key", str(key)]) == 0
    assert main(["update", "-q", str(repo), str(base / "dest"), "--to", "1",
                 "--key", str(pub)]) == 0
    return {"repo": repo, "pub": pub, "dest": base / "dest"}


@pytest.mark.parametrize("via", ["dir", "http"])
def test_damaged_repository(repository: dict[str, Path], made: dict[str, Path], via: str,
                            tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A repository's signed timestamp and index, a bin (version records) and the delta
    1 -> 2, damaged, through `repo ls` and `update --to 2` of a DEST holding version 1: one
    line, or version 2 exactly; an update that fails leaves DEST as it was (its download
    cache DEST/.btrdelta aside). Read from the directory, and over HTTP as a client of a
    mirror reads it (the built-in static server: ranges, the client's own caching)."""
    with served(repository["repo"], via) as where:
        _damaged_repository(repository, where, tmp_path, capfd)


@contextlib.contextmanager
def served(root: Path, via: str) -> Iterator[str]:
    """``root`` as a command is given it: its path, or (``via`` "http") the URL of the
    built-in static server serving it, while the context lasts."""
    if via != "http":
        yield str(root)
        return
    from btrdelta.transport.server import StaticServer

    server = StaticServer(root)
    with server.running():
        yield server.url


def _damaged_repository(repository: dict[str, Path], where: str, tmp_path: Path,
                        capfd: pytest.CaptureFixture[str]) -> None:
    from btrdelta.tree import tree_sum

    def held(dest: Path) -> dict[str, bytes | None]:
        return {k: v for k, v in snapshot(dest).items() if not k.startswith(".btrdelta/")}

    repo, pub = repository["repo"], str(repository["pub"])
    via = "http" if where.startswith("http") else "dir"
    files = {"timestamp": repo / "timestamp.json", "index": repo / "index" / "1.json",
             "bin": next((repo / "bins").iterdir()),
             "delta": next((repo / "deltas").iterdir())}
    work = tmp_path / "w"
    dest = work / "dest"
    ok = tmp_path / "ok"
    copy(repository["dest"], ok)
    assert main(["update", "-q", where, str(ok), "--to", "2", "--key", pub]) == 0
    expected = tree_sum(ok / "2")
    before = held(repository["dest"])
    for part, path in files.items():
        data = path.read_bytes()
        n = N // 2 if part in ("timestamp", "index") else N // 4
        if via == "http":  # (the same decoders behind the client's reads: a quarter of them)
            n = max(2, n // 4)
        try:
            for what, damaged in mutations(data, n, f"repository-{part}"):
                what = f"{via}: {part}: {what}"
                path.write_bytes(damaged)
                work.mkdir()
                copy(repository["dest"], dest)
                run(capfd, ["repo", "ls", where, "--key", pub], what)
                code = run(capfd, ["update", "-q", where, str(dest), "--to", "2",
                                   "--key", pub], what)
                if code:
                    assert held(dest) == before, f"{what}: DEST changed"
                else:
                    assert tree_sum(dest / "2") == expected, f"{what}: another version 2"
                assert sorted(os.listdir(work)) == ["dest"], what
                shutil.rmtree(work)
        finally:
            path.write_bytes(data)


class _Lying:
    """The sender's channel to a real receiver (``Replica.serve`` in a thread, over two
    pipes) whose replies are replaced, byte for byte, by ``replies`` (a recorded receiver's
    side, perhaps damaged): the real receiver paces them. ``replies`` shorter than what the
    receiver says (truncated): the end of the connection there. The receiver silent for
    ``patience`` seconds while the sender waits (a damaged reply can leave both waiting):
    the end of the connection too (``stalled``)."""

    def __init__(self, dest: Path, replies: bytes | None, patience: float) -> None:
        from btrdelta.update.channels import PipeChannel
        from btrdelta.update.replica import Replica

        to_receiver, self.wfd = os.pipe()
        self.rfd, from_receiver = os.pipe()
        # (the receiver's PipeChannel closes them)
        self.peer = PipeChannel(open(to_receiver, "rb", buffering=0),  # noqa: SIM115
                                open(from_receiver, "wb", buffering=0),  # noqa: SIM115
                                name="receiver")
        self.replies, self.patience = replies, patience
        self.said, self.pos, self.stalled = bytearray(), 0, False
        replica = Replica(dest, backend="dir", on_warning=lambda _msg: None)

        def serve() -> None:
            try:
                replica.serve(self.peer, peer="sender")
            except Exception:  # (the honest side: the sender is under test)
                pass
            finally:
                self.peer.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def read(self, n: int) -> bytes:
        import select

        if self.replies is not None and self.pos >= len(self.replies):
            return b""
        if not select.select([self.rfd], [], [], self.patience)[0]:
            self.stalled = True
            return b""
        got = os.read(self.rfd, n)
        self.said += got
        if self.replies is None or not got:
            return got
        start, self.pos = self.pos, self.pos + len(got)
        return self.replies[start:self.pos]

    def write(self, data: bytes) -> None:
        from btrdelta.errors import TransportError

        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.wfd, view):]
        except OSError as exc:
            raise TransportError(f"receiver: write failed: {exc}") from None

    def close(self) -> None:
        import contextlib

        for fd in (self.wfd, self.rfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the receiver did not end"


def test_damaged_replication_replies(made: dict[str, Path], tmp_path: Path) -> None:
    """A hostile receiver: a receiver's side of a replication (its HELLO, holdings, ACKs,
    COMMITTED), damaged (and damaged inside a message with its CRC32C fixed), to a sender
    (`replicate`): it returns or fails with one error of the table's (a BtrdeltaError of one
    line), never another exception; it changes nothing of its source and writes nothing
    outside its sendshot store; and the receiver still shows no name but the one its side
    committed, with the sender's tree. (Undamaged, the same replies commit.)"""
    from btrdelta.errors import BtrdeltaError
    from btrdelta.send.store import SendshotStore
    from btrdelta.tree import tree_sum
    from btrdelta.update.partial import PartialTransfer
    from btrdelta.update.replicate import replicate

    source = made["v1"]
    expected = tree_sum(source)
    work = tmp_path / "w"

    def one(replies: bytes | None, what: str, patience: float = 5) -> tuple[str, _Lying]:
        work.mkdir()
        (work / "dest").mkdir()
        ch = _Lying(work / "dest", replies, patience)
        try:
            res = replicate(source, ch, store=SendshotStore(work / "store"),
                            segment=16 << 10)
            outcome, message = res.outcome, res.message
        except BtrdeltaError as exc:
            outcome, message = "error", str(exc).strip()
        finally:
            ch.close()
        assert "\n" not in message, f"{what}: {message}"
        shown = visible(work / "dest")
        assert len(shown) <= 1, f"{what}: {shown}"
        for n in shown:
            assert tree_sum(work / "dest" / n) == expected, f"{what}: another tree"
        assert sorted(os.listdir(work)) in (["dest"], ["dest", "store"]), what
        PartialTransfer(work / "dest", "dir").drop()  # (its tmpfs counter, if any)
        shutil.rmtree(work)
        return outcome, ch

    outcome, ch = one(None, "recorded", patience=60)
    assert outcome == "committed"
    said = bytes(ch.said)
    assert sum(n == 8 for _, n in _messages(said)) >= 2  # ACKs of two CHECKPOINTs
    outcome, _ = one(said, "undamaged replay", patience=60)
    assert outcome == "committed"
    cases = [*mutations(said, N, "replies"),
             *record_mutations(said, N, "reply-messages", first=REPL_MAGIC)]
    stalls = 0
    for what, damaged in cases:
        _, ch = one(damaged, what)
        stalls += ch.stalled
    assert tree_sum(source) == expected
    print(f"damaged replies: {len(cases)}, stalled: {stalls}")


def _zstd_bomb(length: int, says: int) -> bytes:
    """A zstd frame of exactly ``length`` bytes whose header says ``says`` bytes of content
    and whose blocks (RLE: 4 bytes for 128 KiB each) decompress to ~32,000 times its size."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0x80, 0x88]) + struct.pack("<I", says)
    blocks = (length - len(header) - 3) // 4
    raw = length - len(header) - 4 * blocks - 3  # a last raw block of 0..3 bytes
    rle = (128 << 10) << 3 | 1 << 1
    return (header + (struct.pack("<I", rle)[:3] + b"\0") * blocks
            + struct.pack("<I", raw << 3 | 1)[:3] + bytes(raw))


@pytest.fixture(scope="module")
def solid_repository(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                     ) -> dict[str, Path]:
    """A signed repository of ``v1`` whose solid full (``repo add``'s, made again as frames
    of ~8 KiB of stream cut at its chunk boundaries) is what a first install downloads."""
    import blake3
    import zstandard

    from btrdelta import trust
    from btrdelta.repo.fullindex import decode_full_index
    from btrdelta.repo.solid import Frame, Solid, cut_frames
    from btrdelta.update.publish import Repo

    base = tmp_path_factory.mktemp("solid")
    root, key, pub = base / "repo", base / "root.pem", base / "root.pub"
    trust.save_key_pair(trust.generate_key(), str(key), str(pub))
    assert main(["repo", "init", str(root), "--avg-chunk", "4K"]) == 0
    assert main(["repo", "add", "-q", str(root), "1", str(made["v1"])]) == 0
    repo = Repo(root)
    cat = repo.load()
    v = cat.versions[0]
    assert v.solid is not None
    old = root / v.solid.path
    stream = b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(
        old.read_bytes()[f.offset:f.offset + f.length]) for f in v.solid.frames)
    idx = decode_full_index((root / f"fulls/{v.full_id}.fidx").read_bytes(), source="x").index
    sizes = [idx.raw_sizes[e] for e in idx.order]
    frames, blobs, offset, pos = [], [], 0, 0
    for first, count in cut_frames(sizes, 8 << 10):
        n = sum(sizes[first:first + count])
        blobs.append(zstandard.ZstdCompressor(level=19).compress(stream[pos:pos + n]))
        frames.append(Frame(offset, len(blobs[-1]), first, count))
        offset, pos = offset + len(blobs[-1]), pos + n
    assert len(frames) >= 4
    blob = b"".join(blobs)
    solid = Solid.make(blake3.blake3(blob).hexdigest(), frames)
    old.unlink()
    (root / solid.path).write_bytes(blob)
    v.solid = solid
    repo.save(cat)
    assert main(["repo", "sign", "-q", str(root), "--key", str(key)]) == 0
    return {"repo": root, "pub": pub, "solid": root / solid.path}


def _solid_cases(root: Path, data: bytes, n: int) -> Iterator[tuple[str, bytes]]:
    """The solid file damaged: at random, and as a hostile mirror would (frames swapped, a
    frame that decompresses to far more than its header and its chunks say, a frame of
    another stream's bytes, another file of the repository served under its name);
    ``data``: the file as published."""
    import zstandard

    from btrdelta.update.publish import Repo

    v = Repo(root).load().versions[0]
    assert v.solid is not None
    yield from mutations(data, n, "solid")
    a, b = v.solid.frames[:2]
    first = data[a.offset:a.offset + a.length]
    yield "frames 0 and 1 swapped", data[b.offset:b.offset + b.length] + first + data[
        b.offset + b.length:]
    for k, f in enumerate(v.solid.frames[:2]):
        says = zstandard.frame_content_size(data[f.offset:f.offset + f.length])
        yield (f"frame {k} a zstd bomb saying {says} bytes",
               data[:f.offset] + _zstd_bomb(f.length, says) + data[f.offset + f.length:])
    other = zstandard.ZstdCompressor(level=1).compress(
        random.Random(5).randbytes(zstandard.frame_content_size(first)))
    yield "frame 0 another stream's bytes", other + data[len(other):]
    yield "the full index as the solid file", (root / f"fulls/{v.full_id}.fidx").read_bytes()
    yield "an empty file", b""


def _lying_mirror(solid: str, lie: str) -> type:
    """A static server's handler that answers a request of the file ``solid`` (a path of
    the repository) falsely: ``short`` a 206 whose body stops halfway (the connection then
    closed), ``shifted`` a 206 of the range one byte on (its Content-Range says so),
    ``whole`` a 200 of another file of the repository."""
    from btrdelta.transport.server import StaticRequestHandler

    class Lying(StaticRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/" + solid:
                super().do_GET()
                return
            if lie == "whole":
                self.path = "/timestamp.json"
                super().do_GET()
                return
            data = Path(self.server.root, solid).read_bytes()
            rng = self.headers.get("Range", f"bytes=0-{len(data) - 1}")
            start, end = (int(x) for x in rng.removeprefix("bytes=").split(",")[0].split("-"))
            if lie == "shifted":
                start, end = start + 1, min(end + 1, len(data) - 1)
            body = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if lie == "short" else body)
            self.close_connection = lie == "short"
            self._done(206, len(body))

    return Lying


def _max_rss_of_update(argv: list[str]) -> int:
    """The peak RSS (KiB) of `btrdelta update ARGV` run alone (its exit status checked)."""
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "update", "-q", *argv],
                            stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, argv
    return usage.ru_maxrss


@pytest.mark.parametrize("via", ["dir", "http", "lying mirror"])
def test_damaged_solid_full(solid_repository: dict[str, Path], made: dict[str, Path],
                            via: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
                            ) -> None:
    """A first install (`update` into an empty DEST) whose release's solid full, named in
    the signed bin record, is damaged on the mirror (or served falsely over HTTP: a short
    206, a shifted range, another file): the packs are intact, so every run installs the
    release exactly (tree-sum), the frames that fail costing their chunks, and writes
    nothing outside DEST. A frame that is a zstd bomb (its header saying its chunks' size,
    its blocks ~32,000 times its length) costs no more memory than a good one (the peak RSS
    of the run against an undamaged one)."""

    from btrdelta.transport.server import StaticServer
    from btrdelta.tree import tree_sum

    root, pub = solid_repository["repo"], str(solid_repository["pub"])
    path = solid_repository["solid"]
    solid = str(path.relative_to(root))
    expected = tree_sum(made["v1"])
    data = path.read_bytes()
    work = tmp_path / "w"

    def install(where: str, what: str) -> None:
        work.mkdir()
        dest = work / "dest"
        code = run(capfd, ["update", "-q", where, str(dest), "--key", pub, "--retries", "0"],
                   what)
        assert code == 0, f"{what}: exit {code}"
        assert tree_sum(dest / "1") == expected, f"{what}: another tree"
        assert sorted(os.listdir(work)) == ["dest"], what
        shutil.rmtree(work)

    try:
        if via == "lying mirror":
            for lie in ("short", "shifted", "whole"):
                server = StaticServer(root, handler=_lying_mirror(solid, lie))
                with server.running():
                    install(server.url, f"a mirror answering {lie}")
            return
        with served(root, via) as where:
            if via == "dir":  # (undamaged: the release comes as its solid frames alone)
                from btrdelta.update.publish import Repo

                v = Repo(root).load().versions[0]
                capfd.readouterr()
                assert main(["update", where, str(work / "dest"), "--key", pub,
                             "--json"]) == 0
                report = json.loads(capfd.readouterr().out)
                assert v.solid is not None
                assert report["plan"]["bytes"] == v.full_length + v.solid.length, report
                shutil.rmtree(work)
            n = N // 2 if via == "dir" else max(4, N // 6)
            for what, damaged in _solid_cases(root, data, n):
                path.write_bytes(damaged)
                install(where, f"{via}: {what}")
            if via == "dir":
                rss = []
                for _what, damaged in (("undamaged", data), *(
                        c for c in _solid_cases(root, data, 0) if "bomb saying" in c[0])):
                    path.write_bytes(damaged)
                    rss.append(_max_rss_of_update([where, str(work / "dest"), "--key", pub]))
                    shutil.rmtree(work)
                assert max(rss[1:]) < rss[0] + (16 << 10), f"peak RSS (KiB): {rss}"
    finally:
        path.write_bytes(data)


#: what a damaged JSON file's values become (``json_mutations``)
HOSTILE_VALUES: list[object] = [None, 0, -1, 2**70, 1.5, True, "", "x", "../../etc/passwd",
                                [], [1], {}, {"a": 1}]


def json_mutations(doc: object, n: int, seed: str) -> Iterator[tuple[str, bytes]]:
    """``n`` copies of the JSON document ``doc`` with one value (or the whole) replaced by
    one of :data:`HOSTILE_VALUES` or removed: damage that leaves it JSON, so that its
    readers' checks of each field are reached."""
    import copy
    import json

    def where(d: object, at: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
        yield at
        items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
        for k, v in items:
            yield from where(v, (*at, k))

    rng = random.Random(seed)
    paths = list(where(doc))
    for _ in range(n):
        at = rng.choice(paths)
        value = rng.choice([*HOSTILE_VALUES, *([KeyError] if at else [])])
        if not at:
            out = value
        else:
            out = copy.deepcopy(doc)
            parent = out
            for k in at[:-1]:
                parent = parent[k]  # type: ignore[index]
            if value is KeyError:
                del parent[at[-1]]  # type: ignore[attr-defined]
            else:
                parent[at[-1]] = value  # type: ignore[index]
        said = "removed" if value is KeyError else f"= {value!r}"
        yield f"{'/'.join(map(str, at)) or 'the document'} {said}", json.dumps(out).encode()


@pytest.fixture(scope="module")
def replicated(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    """A sendshot store and a DEST (a directory) after two `replicate`s of a copy of
    ``v1`` (the second after a change): two records, the head cache, the seed, a cursor
    with its ``sources``, and in it a transfer in flight as the format describes one (a
    sender killed after naming its session: the base and the record it recorded, no
    snapshot left); the receiver's state and subvolume registry."""
    import json

    base = tmp_path_factory.mktemp("replicated")
    src, store, dest = base / "src", base / "store", base / "dest"
    copy(made["v1"], src)
    dest.mkdir()
    for change in ("one", "two"):
        (src / "changed").write_text(change)
        assert main(["replicate", "-q", str(src), str(dest), "--store", str(store),
                     "--no-prune", "--backend", "dir"]) == 0
    cursors = json.loads((store / "cursors.json").read_bytes())
    (cursor,) = cursors["receivers"].values()
    first, second = sorted(p.name.split(".")[0] for p in (store / "records").iterdir())
    cursor["inflight"] = {"session": "0" * 32, "snapshot": None, "base": first,
                          "name": "src.20261207T000000", "segment": 4 << 20,
                          "sendshot": second}
    (store / "cursors.json").write_text(json.dumps(cursors))
    return {"src": src, "store": store, "dest": dest}


@pytest.mark.parametrize("part", ["cursors", "heads", "seed", "replica", "subvols"])
def test_damaged_replication_state(part: str, replicated: dict[str, Path], tmp_path: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    """The sender's store files (its receivers' cursors, the head cache, the seed) and the
    receiver's (its state, its subvolume registry), damaged at random and, for the JSON
    ones, with a field of another type or value, through `sendshot list`, `show`, `prune`,
    `forget` and a `replicate` of the source: one line or success; a replicate that exits
    0 made the source's tree the newest one in DEST; nothing outside the store and DEST
    changes (a damaged cursor naming a path is not followed); a damaged head cache is only
    a cache: the listing is the same."""
    import json

    from btrdelta.tree import tree_sum

    file = {"cursors": ("store", "cursors.json"), "heads": ("store", "heads"),
            "seed": ("store", "seed"), "replica": ("dest", ".btrdelta-replica.json"),
            "subvols": ("dest", ".btrdelta-subvols.json")}[part]
    data = (replicated[file[0]] / file[1]).read_bytes()
    cases = list(mutations(data, max(2, N // 6), part))
    if file[1].endswith(".json"):
        cases += json_mutations(json.loads(data), N // 3, part)
    expected = tree_sum(replicated["src"])
    (rid,) = json.loads((replicated["store"] / "cursors.json").read_bytes())["receivers"]
    work = tmp_path / "w"
    work.mkdir()
    (work / "outside").write_text("kept")
    st, dest = work / "store", work / "dest"

    def listing() -> str:
        capfd.readouterr()
        assert main(["sendshot", "--store", str(st), "--json", "list"]) == 0
        return capfd.readouterr().out

    copy(replicated["store"], st)
    listed = listing()
    shutil.rmtree(st)
    for what, damaged in cases:
        for name in ("store", "dest"):
            copy(replicated[name], work / name)
        (work / file[0] / file[1]).write_bytes(damaged)
        sendshot = ["sendshot", "--store", str(st)]
        for argv in (["list"], ["--json", "list"], ["show", "latest"],
                     ["prune", "--keep", "1", "-n"]):
            run(capfd, [*sendshot, *argv], what)
        if part == "heads":
            assert listing() == listed, f"{what}: another listing"
        code = run(capfd, ["replicate", "-q", str(replicated["src"]), str(dest), "--store",
                           str(st), "--backend", "dir"], what)
        if code == 0:
            newest = max((p for p in dest.iterdir() if not p.name.startswith(".")),
                         key=lambda p: p.name)
            assert tree_sum(newest) == expected, f"{what}: another tree"
        run(capfd, [*sendshot, "prune", "--keep", "1"], what)
        run(capfd, [*sendshot, "forget", rid, "--force"], what)
        assert sorted(os.listdir(work)) == ["dest", "outside", "store"], what
        assert (work / "outside").read_text() == "kept", what
        shutil.rmtree(st)
        shutil.rmtree(dest)


@pytest.mark.btrfs
def test_a_damaged_cursor_naming_a_subvolume_does_not_delete_it(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A cursor file whose transfer in flight names, as its snapshot, a subvolume that is
    not a replication session's (a damaged or hostile store file): `replicate` refuses it
    in one line naming the file, exit 3, and the subvolume is still there with its file
    (the sender deleted a session's snapshot it abandoned by that path: any subvolume).
    Oracle: the file system (btrfs-progs' `subvolume list`)."""
    import json

    from tests.conftest import btrfs_loop

    with btrfs_loop("300M") as fs:
        for name in ("vol", "precious"):
            subprocess.run(["btrfs", "subvolume", "create", str(fs / name)], check=True,
                           capture_output=True)
            (fs / name / "f").write_text(name)
        store, dest = fs / "store", fs / "dest"
        dest.mkdir()
        argv = ["replicate", "-q", str(fs / "vol"), str(dest), "--store", str(store)]
        assert run(capfd, argv, "first") == 0
        doc = json.loads((store / "cursors.json").read_bytes())
        (cursor,) = doc["receivers"].values()
        cursor["inflight"] = {"session": "0" * 32, "snapshot": str(fs / "precious"),
                              "base": None, "name": "vol.20261207T000000"}
        (store / "cursors.json").write_text(json.dumps(doc))
        (fs / "vol" / "g").write_text("more")
        code = run(capfd, argv, "a cursor naming another subvolume")
        listed = subprocess.run(["btrfs", "subvolume", "list", str(fs)], check=True,
                                capture_output=True, text=True).stdout
        assert any(line.endswith(" path precious") for line in listed.splitlines()), listed
        assert (fs / "precious" / "f").read_text() == "precious"
        assert code == 3


def test_damaged_casync_index_and_chunks(made: dict[str, Path], tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    """A casync index (``casync make``'s ``.caibx`` of the test image, 4 KiB chunks on
    average) and a chunk file of its store (``.castr``), damaged, through `image info` and
    `image clone --output`: one line, or the image byte for byte; a clone that fails
    leaves no output and nothing else beside it."""
    from tests.chunk.test_casync import casync_make

    base = tmp_path / "made"
    base.mkdir()
    index, castr = casync_make(made["image"], base, "--chunk-size=4096")
    image = made["image"].read_bytes()
    chunk = max(castr.rglob("*.cacnk"), key=lambda p: p.stat().st_size)
    work = tmp_path / "w"
    work.mkdir()
    out = work / "out.img"
    for target, n in ((index, N), (chunk, N // 2)):
        data = target.read_bytes()
        try:
            for what, damaged in mutations(data, n, f"casync-{target.suffix}"):
                what = f"{target.name}: {what}"
                target.write_bytes(damaged)
                run(capfd, ["image", "info", str(index)], what)
                code = run(capfd, ["image", "clone", "-q", str(index), "--output", str(out),
                                   "--castr", str(castr)], what)
                if code == 0:
                    assert out.read_bytes() == image, f"{what}: exit 0 with another image"
                else:
                    assert not out.exists(), what
                out.unlink(missing_ok=True)
                assert os.listdir(work) == [], what
        finally:
            target.write_bytes(data)


def test_damaged_full_index_and_pack(solid_repository: dict[str, Path], made: dict[str, Path],
                                     tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A first install from a mirror without the solid file (its chunks then come from the
    packs), whose full index (``fulls/<blake3>.fidx``, named in the signed bin record) or
    pack is damaged: one line and no version in DEST, or the release exactly; nothing
    written outside DEST."""
    from btrdelta.tree import tree_sum

    root, pub = solid_repository["repo"], str(solid_repository["pub"])
    solid = solid_repository["solid"]
    expected = tree_sum(made["v1"])
    work = tmp_path / "w"
    hidden = tmp_path / "solid"
    solid.rename(hidden)
    try:
        for part in ("fulls", "packs"):
            (path,) = (root / part).iterdir()
            data = path.read_bytes()
            try:
                for what, damaged in mutations(data, N // 2, f"repository-{part}"):
                    what = f"{part}: {what}"
                    path.write_bytes(damaged)
                    work.mkdir()
                    dest = work / "dest"
                    code = run(capfd, ["update", "-q", str(root), str(dest), "--key", pub,
                                       "--retries", "0"], what)
                    if code == 0:
                        assert tree_sum(dest / "1") == expected, f"{what}: another tree"
                    else:
                        assert not (dest / "1").exists(), what
                    assert sorted(os.listdir(work)) in ([], ["dest"]), what
                    shutil.rmtree(work)
            finally:
                path.write_bytes(data)
    finally:
        hidden.rename(solid)


@pytest.mark.parametrize("via", ["dir", "http"])
def test_damaged_backups(made: dict[str, Path], via: str, tmp_path: Path,
                         capfd: pytest.CaptureFixture[str]) -> None:
    """A backup location (a USB stick's directory, or served over HTTP) holding backups 1
    (the full stream of ``v1``) and 2 (the incremental to ``v2``) and their index
    (``home.backups.json``, with their tree-sums), the index or backup 2 damaged (the
    index also field by field, backup 2 also inside a record with its CRC32C fixed),
    through `device restore --to-dir`: one line and no tree under a final name, or a tree
    whose tree-sum is one of the two versions'; nothing outside the output directory."""
    import json

    from btrdelta.tree import tree_sum

    src = tmp_path / "backups"
    src.mkdir()
    copy(made["full"], src / "home.1.stream")
    copy(made["inc"], src / "home.2.stream")
    sums = [tree_sum(made["v1"]), tree_sum(made["v2"])]
    index = {"format": "btrdelta-backups", "version": 1, "name": "home", "backups": [
        {"n": 1, "file": "home.1.stream", "parent": None, "uuid": "u1", "tree_sum": sums[0],
         "bytes": (src / "home.1.stream").stat().st_size, "time": 1.0},
        {"n": 2, "file": "home.2.stream", "parent": 1, "uuid": "u2", "tree_sum": sums[1],
         "bytes": (src / "home.2.stream").stat().st_size, "time": 2.0}]}
    (src / "home.backups.json").write_text(json.dumps(index))
    n = N if via == "dir" else max(4, N // 4)
    stream = (src / "home.2.stream").read_bytes()
    raw = (src / "home.backups.json").read_bytes()
    cases = [*(("home.backups.json", w, d) for w, d in json_mutations(index, n // 2, via)),
             *(("home.backups.json", w, d) for w, d in mutations(raw, n // 4, via)),
             *(("home.2.stream", w, d) for w, d in mutations(stream, n // 4, via)),
             *(("home.2.stream", w, d) for w, d in record_mutations(stream, n // 4, via))]
    work = tmp_path / "w"
    out = work / "out"
    with served(src, via) as where:
        work.mkdir()
        out.mkdir()
        assert run(capfd, ["device", "restore", str(out), "home", where, "--to-dir"],
                   "undamaged") == 0
        assert [tree_sum(out / v) for v in visible(out)] == [sums[1]]
        shutil.rmtree(work)
        for name, what, damaged in cases:
            what = f"{via}: {name}: {what}"
            (src / name).write_bytes(damaged)
            work.mkdir()
            out.mkdir()
            code = run(capfd, ["device", "restore", str(out), "home", where, "--to-dir"],
                       what)
            got = [tree_sum(out / v) for v in visible(out)]
            if code:
                assert got == [], f"{what}: {visible(out)}"
            else:
                assert len(got) == 1, f"{what}: {visible(out)}"
                assert got[0] in sums, f"{what}: another tree"
            assert os.listdir(work) == ["out"], what
            shutil.rmtree(work)
            (src / name).write_bytes(stream if name == "home.2.stream" else raw)
