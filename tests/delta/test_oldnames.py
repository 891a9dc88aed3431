"""Format 9: carried commands name their path by its place in the old snapshot's listings.

An app release unpacked over the old one keeps most files in place with new times: the
stream then holds one UTIMES per file, and its path was most of what such a record cost
(numpy 1.26.3 -> 1.26.4: 6.9 of the delta's 36.7 KB). Oracles: the userspace send's
stream (the expansion must be it byte for byte, and the records a receiver gets must be
its records, with and without the C unfold path), zstd of the names alone (what naming
them literally costs at least), and a changed old tree (refused, nothing written).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import zstandard

from btrdelta import _native
from btrdelta.delta import MakeOptions, expand_events, expand_to, make_delta, open_delta, unpack
from btrdelta.delta.carrier import OLDNAME_TLV, CarrierState, unfold
from btrdelta.delta.stats import collect_delta_stats
from btrdelta.errors import BtrdeltaError, MissingBaseError, StreamFormatError
from btrdelta.send import send_stream
from btrdelta.stream import StreamReader
from btrdelta.stream.constants import Cmd

from .conftest import delta_items


def _name(rnd: random.Random) -> str:
    return rnd.randbytes(16).hex() + rnd.choice((".py", ".so", ".pyi", ""))


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    """An old tree of 4 directories (one nested) of files with random 32-hex-digit names,
    and the new one unpacked over it: every file with new times, two changed, one new."""
    rnd = random.Random(9)
    old = tmp_path / "old"
    paths: list[bytes] = []
    for d in ("pkg", "pkg/a", "pkg/a/c", "pkg/b"):
        (old / d).mkdir(parents=True)
        for _ in range(40):
            name = f"{d}/{_name(rnd)}"
            (old / name).write_bytes(rnd.randbytes(rnd.randrange(100, 3000)))
            paths.append(name.encode())
    new = tmp_path / "new"
    shutil.copytree(old, new)
    for p in paths:
        os.utime(new / p.decode(), ns=(1_700_000_000_123_456_789, 1_700_000_000_000_000_000))
    for p in paths[7], paths[90]:
        body = bytearray((new / p.decode()).read_bytes())
        body[50:54] = b"XYZW"
        (new / p.decode()).write_bytes(body)
    (new / "pkg/b/added.txt").write_bytes(b"new file\n")
    return old, new, paths


def _stream(new: Path, old: Path) -> bytes:
    out = io.BytesIO()
    send_stream(out.write, new, old)
    return out.getvalue()


def _make(stream: bytes, old: Path) -> bytes:
    out: list[bytes] = []
    make_delta(io.BufferedReader(io.BytesIO(stream)), old, out.append,  # type: ignore[arg-type]
               MakeOptions(jobs=1))
    return b"".join(bytes(p) for p in out)


def _expand(delta: bytes, old: Path) -> bytes:
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), old, out.append)
    return b"".join(bytes(p) for p in out)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_files_kept_in_place_are_named_from_the_old_listings(
    release: tuple[Path, Path, list[bytes]], backend: str
) -> None:
    old, new, paths = release
    if backend == "c" and not _native.available("unfold"):
        pytest.skip("the C unfold path (_unfold.c) is not built")
    stream = _stream(new, old)
    utimes = [r for r in StreamReader(io.BytesIO(stream)) if r.cmd == Cmd.UTIMES]
    assert len(utimes) >= len(paths)
    delta = _make(stream, old)
    assert delta[17:21] == (10).to_bytes(4, "little")
    calls = []
    python_unfold = unpack.unfold

    def counted(*args: object) -> object:
        calls.append(args[0])
        return python_unfold(*args)  # type: ignore[arg-type]

    with _native.use_backend(backend, "unfold"), \
            mock.patch.object(unpack, "unfold", counted):
        assert _expand(delta, old) == stream
    if backend == "c":  # the C path resolves them itself
        assert calls.count(Cmd.UTIMES) < len(utimes) // 10
    with _native.use_backend(backend, "unfold"):
        got = [(type(ev).__name__, getattr(ev, "path", None))
               for ev in expand_events(io.BytesIO(delta), old)]
    want = [(type(ev).__name__, getattr(ev, "path", None))
            for ev in StreamReader(io.BytesIO(stream)).events()]
    assert got == want
    # naming the files literally costs at least their names compressed: 16 random bytes
    # each (161 files: ~2.6 KB); the whole delta, times and patches included, is less
    names = zstandard.ZstdCompressor(level=19).compress(b"\n".join(sorted(paths)))
    assert len(delta) < len(names)


def test_stat_counts_them_without_the_old_tree(
    release: tuple[Path, Path, list[bytes]]
) -> None:
    """``stat`` reads no old tree: names from its listings are not resolved (nor the
    references after them, which count from them), but every command is counted."""
    old, new, _ = release
    stream = _stream(new, old)
    st = collect_delta_stats(open_delta(io.BytesIO(_make(stream, old))))
    assert st.expanded_commands == sum(1 for _ in StreamReader(io.BytesIO(stream)))
    assert st.carried_commands > 100


def _expand_cli(release: tuple[Path, Path, list[bytes]], old_dir: Path, tmp_path: Path
                ) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """The release's delta (made against its old tree) expanded by the CLI with ``--old
    old_dir``: the process, the delta file and the output path."""
    old, new, _ = release
    delta = tmp_path / "d.delta"
    delta.write_bytes(_make(_stream(new, old), old))
    out = tmp_path / "out.stream"
    proc = subprocess.run(
        [sys.executable, "-m", "btrdelta", "delta", "expand", "-f", str(delta), "--old",
         str(old_dir), "-o", str(out)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return proc, delta, out


def test_changed_old_tree_is_refused_by_the_cli(
    release: tuple[Path, Path, list[bytes]], tmp_path: Path
) -> None:
    """A name taken from a listing that differs (one old file more, which shifts every
    index after it) gives another stream, which the DEND digest refuses: one line, exit
    code non-zero, no output file."""
    old, _, _ = release
    other = tmp_path / "other"
    shutil.copytree(old, other)
    (other / "pkg/a/0000-first").write_bytes(b"x")
    proc, delta, out = _expand_cli(release, other, tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
    assert sum(1 for _ in delta_items(delta.read_bytes())) > 0


def _utimes(value: bytes) -> bytes:
    """A carried UTIMES whose PATH is an OLDNAME reference of ``value`` (no times)."""
    payload = struct.pack("<HH", OLDNAME_TLV, len(value)) + value
    return struct.pack("<IHI", len(payload), int(Cmd.UTIMES), 0) + payload


@pytest.mark.parametrize(("value", "message"), [
    (b"\x03\x00", "invalid old-name reference"),  # up to 3 components: at most 2
    (b"\x00", "invalid old-name reference"),  # no index
    (b"\x00\x80", "truncated"),  # an index cut short
    (b"\x02\x00", "above the top directory"),  # the previous path has one component
    (b"\x00\x06", "out of range of directory 'd'"),  # b + 1 + 3 = 4: 3 names
    (b"\x01\x00", "lists directory '', which it has not"),  # listing of the top: none given
    (b"\x00\x01" + b"\x00" * 8, "more than 8 names"),  # a/a/.../a: 9 names
])
def test_malformed_references_are_located_errors(value: bytes, message: str) -> None:
    listings = {b"d": [b"f1", b"f2", b"f3"]}
    state = CarrierState(lister=listings.get, last_path=b"d/f1")
    if value == b"\x02\x00":
        state.last_path = b"d"
    if message == "more than 8 names":  # every directory holds "a"
        state = CarrierState(lister=lambda d: [b"a"], last_path=b"a")
    raw = _utimes(value)
    with pytest.raises(BtrdeltaError, match=message) as got:
        unfold(int(Cmd.UTIMES), memoryview(raw), 0, len(raw), state, 1 << 16)
    # a listing the old tree lacks or too short: not the delta's old snapshot (exit 6)
    wrong_base = "directory '" in message
    assert isinstance(got.value, MissingBaseError if wrong_base else StreamFormatError)


def test_another_tree_as_the_old_one_is_a_missing_base(
    release: tuple[Path, Path, list[bytes]], tmp_path: Path
) -> None:
    """The new tree given as ``--old`` (a plain directory has no UUID to check): its
    listings cannot resolve the delta's references (a directory it lacks), which says the
    base is wrong: exit 6 as for a wrong parent subvolume, one line naming the record, no
    output. (It was exit 3, a malformed delta, and named a file a directory.)"""
    _, new, _ = release
    wrong = tmp_path / "wrong"
    shutil.copytree(new, wrong)
    shutil.rmtree(wrong / "pkg/a")
    proc, _, out = _expand_cli(release, wrong, tmp_path)
    assert proc.returncode == 6, proc.stderr
    assert "the old tree is not the delta's old snapshot" in proc.stderr
    assert "record " in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_reference_resolves_up_and_down() -> None:
    """``up`` takes components off the previous path; later indexes go down."""
    listings = {b"": [b"a", b"b"], b"a": [b"x", b"y"], b"b": [b"p", b"q"], b"b/q": [b"z"]}
    state = CarrierState(lister=listings.get, last_path=b"a/y")
    # D = "" (a/y up 1 = a), b(a) = 0, + 1 + 0 = b; then b's index 1 = q; q's index 0 = z
    raw = _utimes(b"\x01\x00\x01\x00")
    got = unfold(int(Cmd.UTIMES), memoryview(raw), 0, len(raw), state, 1 << 16)
    assert got is not None
    assert b"b/q/z" in bytes(got)
    assert state.last_path == b"b/q/z"
    # the writer finds the same reference
    writer = CarrierState(lister=listings.get, last_path=b"a/y")
    assert writer.old_name_ref(b"b/q/z") == raw[10:]
    assert writer.old_name_ref(b"b/q/none") is None


def _read(raw: bytes, listings: dict[bytes, list[bytes]], last: bytes, backend: str
          ) -> tuple[object, int]:
    """What a format-9 delta's reader makes of carried commands ``raw`` after the previous
    path ``last``, with the ``backend`` unfold path: (the commands unfolded and the previous
    path after them, or the error's message), and how many reached Python's unfold."""
    calls = []
    python_unfold = unpack.unfold

    def counted(*args: object) -> object:
        calls.append(args[0])
        return python_unfold(*args)  # type: ignore[arg-type]

    with _native.use_backend(backend, "unfold"), mock.patch.object(unpack, "unfold", counted):
        reader = unpack.CarrierReader(listings.get)
        reader.state.last_path = last
        reader.state.format = reader._format = 9
        try:
            for _ in reader.split(bytearray(raw), 2, grouped=True):
                pass
        except BtrdeltaError as exc:
            return str(exc), len(calls)
    return (bytes(reader.group), reader.state.last_path), len(calls)


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_c_and_python_paths_resolve_references_alike() -> None:
    """Random references, valid and hostile (indexes out of range, of 64 bits and more,
    cut short, too many names, listings missing), against listings whose names sort as
    bytes (prefixes, bytes above 0x7f): the C path gives what Python's gives, the same
    commands or the same error, and resolves itself every reference Python resolves."""
    if not _native.available("unfold"):
        pytest.skip("the C unfold path (_unfold.c) is not built")
    rnd = random.Random(22)
    alphabet = [b"f", b"f1", b"f\xff", b"F", b"f0", b"g", b"\xc3\xa9", b"a.py"]
    listings: dict[bytes, list[bytes]] = {}
    dirs = [b""]
    for d in dirs:
        names = sorted(rnd.sample(alphabet, rnd.randrange(1, len(alphabet))))
        listings[d] = names
        for name in names[:2]:
            if len(dirs) < 12:
                dirs.append(d + b"/" + name if d else name)
    del listings[dirs[-1]]  # a directory the old snapshot has no listing of
    resolved = 0
    for _ in range(400):
        d = rnd.choice(dirs)
        last = (d + b"/" if d else b"") + rnd.choice([*alphabet, b"zz", b"0"])
        value = _leb(rnd.choice([0, 0, 0, 1, 2, 3]))
        for _ in range(rnd.choice([1, 1, 1, 1, 2, 3, 9])):
            value += _leb(rnd.choice([0, 0, 1, 1, 2, 3, 5, 1 << 62, (1 << 64) - 1, 1 << 70])
                          if rnd.random() < 0.1 else rnd.randrange(3))
        if rnd.random() < 0.05:
            value += b"\x80"
        if rnd.random() < 0.05:
            value = value[:1]
        raw = _utimes(value)
        want, _ = _read(raw, listings, last, "python")
        got, calls = _read(raw, listings, last, "c")
        assert got == want, (last, value)
        if not isinstance(want, str):
            resolved += 1
            assert calls == 0, (last, value)
    assert 80 < resolved < 350, resolved
