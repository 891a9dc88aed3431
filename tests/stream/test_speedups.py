"""The C accelerator against the pure-Python reference: same records, same errors, same dump.

Differential tests: every input is read (and dumped) by both backends and the outcomes must
be identical, records or the exact error. Kernel-made streams are the real-data oracle; the
hypothesis tests mutate them and draw records (odd paths, huge values) to hit the corners.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import btrdelta.stream as stream
from btrdelta import _native
from btrdelta.errors import BtrdeltaError
from btrdelta.stream import StreamParser, StreamReader, StreamWriter, TextDumper, btrfs_crc32c
from btrdelta.stream.records import End, Mkfile, Snapshot, Subvol, Utimes, Write
from tests.conftest import DUMP_FORMATS, KernelStream, committed_dump, committed_streams
from tests.stream.conftest import c_available
from tests.stream.test_bad_input import _CORPUS, _OPS, mutate
from tests.stream.test_codec import records

pytestmark = pytest.mark.skipif(
    not c_available() and os.environ.get("CI") != "true", reason="C accelerator not built"
)


def _outcome(data: bytes, backend: _native.Backend, verify: bool = True, split: int = 0) -> Any:
    """Events of ``data`` (fed whole, or in two parts at ``split``) or the error raised."""
    with _native.use_backend(backend, "speedups"):
        parser = StreamParser(source="t", verify_crc=verify)
    got: list[Any] = []
    try:
        for part in (data[:split], data[split:]) if split else (data,):
            if part:
                parser.feed(part)
            got.extend(parser)
        parser.feed(b"")
        got.extend(parser)
    except BtrdeltaError as exc:
        return ("error", type(exc), str(exc), exc.offset, exc.index)
    return got


def _both(data: bytes, **kw: Any) -> tuple[Any, Any]:
    return _outcome(data, "python", **kw), _outcome(data, "c", **kw)


def _dump_both(recs: list[Any], progs: tuple[int, ...] = (6, 2)) -> tuple[Any, Any]:
    out = []
    for backend in ("python", "c"):
        with _native.use_backend(backend, "speedups"):
            dumper = TextDumper(progs)
        try:
            out.append(dumper.render(recs))
        except Exception as exc:  # the same failure, whatever it is (e.g. a time localtime
            out.append(("error", type(exc), str(exc)))  # cannot represent)
    return out[0], out[1]


def test_backend_is_c_and_env_forces_python() -> None:
    assert stream.BACKEND == "c"
    with _native.use_backend("python", "speedups"):
        assert stream.BACKEND == "python"
    assert stream.BACKEND == "c"
    code = "import btrdelta.stream as s; print(s.BACKEND)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True)
    forced = subprocess.run([sys.executable, "-c", code],
                            env={**env, "BTRDELTA_PURE_PYTHON": "1"}, capture_output=True,
                            text=True, check=True)
    assert (plain.stdout.strip(), forced.stdout.strip()) == ("c", "python")


@pytest.mark.parametrize("path", committed_streams(), ids=lambda p: p.name)
def test_backends_agree_on_committed_kernel_streams(path: Any) -> None:
    data = path.read_bytes()
    py, c = _both(data)
    assert not isinstance(py, tuple)
    assert c == py
    for progs in DUMP_FORMATS:
        text_py, text_c = _dump_both([e for e in py if not isinstance(e, stream.StreamHeader)],
                                     progs)
        assert text_c == text_py
        assert text_c.encode("latin-1") == committed_dump(path, progs)


@pytest.mark.btrfs
def test_backends_agree_on_every_kernel_stream(kernel_streams: list[KernelStream]) -> None:
    for ks in kernel_streams:
        data = ks.path.read_bytes()
        py, c = _both(data)
        assert not isinstance(py, tuple), ks.name
        assert c == py, ks.name
        recs = [e for e in py if not isinstance(e, stream.StreamHeader)]
        for progs in DUMP_FORMATS:
            text_py, text_c = _dump_both(recs, progs)
            assert text_c == text_py, ks.name


@given(st.integers(0, len(_CORPUS) - 1), _OPS, st.booleans(), st.integers(0, 4096))
def test_mutated_streams_same_records_or_same_error(
    which: int, ops: list[tuple[str, int, int, bytes]], verify: bool, split: int
) -> None:
    buf = mutate(_CORPUS[which], ops)
    data = bytes(buf)
    py, c = _both(data, verify=verify, split=split % (len(data) + 1))
    assert c == py


_PATHS = st.one_of(
    st.binary(min_size=0, max_size=40),
    st.builds(lambda a, b: a + b"/" + b, st.binary(max_size=8), st.binary(max_size=8)),
    st.sampled_from([b"a/", b"", b"x\0y", b"\\ \t\n\xff", b"dir/" * 600, b"d" * 2001]),
)


@st.composite
def dump_records(draw: st.DrawFn) -> list[Any]:
    recs = draw(st.lists(records(), max_size=12))
    out: list[Any] = []
    for rec in recs:
        # paths with the quirks the renderer cares about: trailing '/', NUL, escapes, length
        if hasattr(rec, "path") and draw(st.booleans()):
            rec.path = draw(_PATHS)
        out.append(rec)
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))),
                   Subvol(draw(_PATHS), uuid.UUID(int=3), draw(st.integers(0, 2**64 - 1))))
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), End())
    return out


@given(dump_records(), st.sampled_from(DUMP_FORMATS))
def test_dump_rendering_is_identical(recs: list[Any], progs: tuple[int, ...]) -> None:
    py, c = _dump_both(recs, progs)
    assert c == py


def test_dump_rendering_of_odd_values() -> None:
    # values a decoder never makes but a caller may: negative and huge ints, bytes-likes,
    # times beyond int64 nanoseconds, a prefix with a NUL
    recs: list[Any] = [
        Snapshot(b"s\0nap", uuid.UUID(int=1), 2, uuid.UUID(int=3), 4), Mkfile(b"f", 5),
        Subvol(b"sub/", uuid.UUID(int=1), 2),
        Write(b"f", -1, b"abc"), Write(b"f", 2**70, bytearray(b"xy")),
        Utimes(b"f", -1, 2**80, -(10**18) - 1, None), Utimes(b"f", True, 0, 0),
        Mkfile(bytearray(b"ba"), 1),
    ]
    py, c = _dump_both(recs)
    assert c == py


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 255, 768, 769, 3000, 24575, 24576, 24583,
                                  100_000, 262_154])
def test_crc32c_matches_the_library(size: int) -> None:
    import crc32c  # the oracle: the crc32c package (stream.crc may use _speedups itself)

    from btrdelta.stream import _speedups  # type: ignore[attr-defined]

    data = os.urandom(size + 3)
    for off in (0, 1, 3):  # unaligned starts
        piece = data[off : off + size]
        for seed in (0, 0xFFFFFFFF, 0x12345678):
            want = crc32c.crc32c(piece, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF  # btrfs: raw register
            assert btrfs_crc32c([piece], seed) == want
            assert _speedups.crc32c(piece, seed) == want
            assert _speedups.crc32c_table(piece, seed) == want
            assert _speedups.crc32c_std(piece, seed) == crc32c.crc32c(piece, seed)


def test_decode_batch_contract() -> None:
    from btrdelta.stream import _speedups  # type: ignore[attr-defined]

    out = io.BytesIO()
    w = StreamWriter(out.write, 2)
    w.write(Subvol(b"s", uuid.UUID(int=9), 1))
    w.write(Write(b"f", 0, b"data" * 10))
    w.write(End())
    w.write(Mkfile(b"after-end", 1))
    raw = out.getvalue()
    mv = memoryview(bytearray(raw))
    recs, pos, hit_end = _speedups.decode_batch(mv, 17, len(mv), 2, True)
    assert [type(r) for r in recs] == [Subvol, Write, End]
    assert hit_end is True
    assert recs[1].data.obj is mv.obj  # file data is a view of the buffer, not a copy
    assert raw[pos : pos + 13] == b"btrfs-stream\0"  # stopped right after END
    # a command cut short stops the batch before it
    pos2 = 17 + 10 + struct.unpack_from("<I", raw, 17)[0]  # end of SUBVOL
    assert _speedups.decode_batch(mv, 17, pos2 + 20, 2, True)[1:] == (pos2, False)
    # a bad CRC stops the batch there (the Python slow path names the error)
    bad = bytearray(raw)
    bad[pos - 10 - 1] ^= 1  # last byte of the WRITE data
    recs, pos3, _ = _speedups.decode_batch(memoryview(bad), 17, len(bad), 2, True)
    assert (len(recs), pos3) == (1, pos2)
    recs, _, _ = _speedups.decode_batch(memoryview(bad), 17, len(bad), 2, False)
    assert len(recs) == 3
    # a length beyond the version limit stops it; arguments outside the buffer are refused
    huge = struct.pack("<IHI", 0xFFFFFFF0, 15, 0)
    assert _speedups.decode_batch(huge, 0, len(huge), 2, True) == ([], 0, False)
    for args in ((mv, -1, 10), (mv, 10, 5), (mv, 0, len(mv) + 1)):
        with pytest.raises(ValueError, match="outside"):
            _speedups.decode_batch(*args, 2, True)
    with pytest.raises(ValueError, match="version"):
        _speedups.decode_batch(mv, 0, 0, 4, True)
    with pytest.raises(ValueError, match="1-D"):
        _speedups.decode_batch(memoryview(bytearray(8)).cast("I"), 0, 0, 2, True)


def test_reader_uses_the_c_batch_loop() -> None:
    # large writes: the C loop yields everything between the header and END in one batch
    out = io.BytesIO()
    w = StreamWriter(out.write, 2)
    w.write(Subvol(b"s", uuid.UUID(int=1), 1))
    for i in range(50):
        w.write(Write(b"f", i * 4096, bytes(4096)))
    w.write(End())
    reader = StreamReader(io.BytesIO(out.getvalue()))
    parser = reader.parser
    parser.feed(out.getvalue())
    assert parser.next_event() == stream.StreamHeader(2, 0)
    batch = parser.take_batch()
    assert len(batch) == 52
    assert type(batch[-1]) is End


@pytest.mark.parametrize("impl", ["sse4.2", "table"])
def test_large_data_crc_with_each_implementation(impl: str) -> None:
    # without hardware CRC, large file data is checked by the crc32c library from C
    from btrdelta.stream import _speedups  # type: ignore[attr-defined]

    out = io.BytesIO()
    w = StreamWriter(out.write, 2)
    w.write(Subvol(b"s", uuid.UUID(int=1), 1))
    for i in range(6):
        w.write(Write(b"f", i * 100_000, os.urandom(100_000 - i * 9_000)))
        w.write(Mkfile(b"g%d" % i, 300 + i))
    w.write(End())
    raw = out.getvalue()
    try:
        prev = _speedups._set_crc_impl(impl)
    except ValueError:
        pytest.skip(f"no {impl} here")
    try:
        py, c = _both(raw)
        assert c == py
        assert len(c) == 15
        bad = bytearray(raw)
        bad[len(raw) // 2] ^= 0x10  # inside some WRITE's data
        py, c = _both(bytes(bad))
        assert c == py
        assert c[0] == "error"
        assert "CRC32C mismatch" in c[2]
    finally:
        _speedups._set_crc_impl(prev)


@given(st.lists(records(), min_size=1, max_size=8), st.sampled_from([1, 2, 3]))
def test_c_loop_decodes_every_kernel_order_command_itself(recs: list[Any], version: int) -> None:
    # the plan handed to C covers every command: kernel-order records never fall back
    from btrdelta.stream import _speedups  # type: ignore[attr-defined]
    from btrdelta.stream.constants import COMMAND_SPECS
    from btrdelta.stream.records import EncodedWrite

    kept = []
    for rec in recs:
        if COMMAND_SPECS[rec.cmd].version > version:
            continue
        # the kernel sends OTIME and ENCRYPTION exactly from v2 on
        if isinstance(rec, Utimes) and (rec.otime is None) != (version == 1):
            continue
        if isinstance(rec, EncodedWrite) and rec.encryption is None:
            continue
        kept.append(rec)
    out = io.BytesIO()
    w = StreamWriter(out.write, version)
    for rec in kept:
        w.write(rec)
    w.write(End())
    raw = memoryview(out.getvalue())
    got, pos, hit_end = _speedups.decode_batch(raw, 17, len(raw), version, True)
    assert got == [*kept, End()]
    assert (pos, hit_end) == (len(raw), True)


def _odd_values() -> st.SearchStrategy[Any]:
    """Records whose values the C encoder must hand back to Python (or encode alike)."""
    odd = st.sampled_from([
        Mkfile(b"f", -1), Mkfile(b"f", 2**64), Mkfile(bytearray(b"f"), 1),
        Mkfile(b"x" * 70_000, 1), Write(b"f", 0, bytearray(b"abc")),
        Write(b"f", 0, memoryview(b"abcd").cast("I")), Write(b"f", 0, memoryview(b"ab")[::2]),
        Write(b"f", 0, bytes(70_000)), Utimes(b"f", 1.5, 2, 3), Utimes(b"f", 2**80, 0, -1),
        Utimes(b"f", -(10**9) - 1, -1, 0, 7), Subvol(b"s", "not a uuid", 1),
        End(),
    ])
    return odd | records()


@given(st.lists(_odd_values(), min_size=1, max_size=6), st.sampled_from([1, 2, 3]))
def test_c_encoder_gives_the_reference_bytes_or_hands_back(recs: list[Any],
                                                           version: int) -> None:
    from btrdelta.stream import _speedups
    from btrdelta.stream.codec import encode_record

    for rec in recs:
        try:
            want: Any = b"".join(bytes(p) for p in encode_record(rec, version))
        except BtrdeltaError as exc:
            want = ("error", type(exc), str(exc))
        got = _speedups.encode_head(rec, version)
        if got is None:
            continue  # the writer runs the reference
        head, data = got
        assert head + (bytes(data) if data is not None else b"") == want
        if data is not None:  # the record's own object, not a copy
            assert version >= 2
            assert data is rec.data


_NS = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, -(10**9) - 1]),
                st.integers(-(2**70), 2**70))


@given(st.sampled_from([1, 2, 3]), st.binary(max_size=300), st.integers(-2, 2**64),
       st.none() | st.binary(max_size=9000) | st.sampled_from([bytes(48 << 10)]),
       st.integers(-1, 2**64), st.integers(0, 2**32),
       st.sampled_from([0o100644, 0o40755, 0o120777, 0o104755, 0o20600, 0o10644, 0o177777]),
       _NS, _NS, _NS)
def test_c_inode_encoder_gives_the_records_bytes_or_hands_back(
        version: int, path: bytes, ino: int, content: bytes | None, uid: int, gid: int,
        mode: int, atime: int, mtime: int, ctime: int) -> None:
    """``encode_inode``: MKFILE, WRITE, CHOWN, CHMOD (not a symlink's), UTIMES as the Python
    encoder encodes them, the data as its own piece (the object given), or None for what it
    does not encode (negative or too large numbers, times beyond 64-bit nanoseconds)."""
    from btrdelta.stream import _speedups
    from btrdelta.stream.codec import encode_record
    from btrdelta.stream.records import Chmod, Chown

    recs: list[Any] = [Mkfile(path, ino)] if ino >= 0 else []
    if content:
        recs.append(Write(path, 0, memoryview(content)))
    recs.append(Chown(path, uid, gid))
    if mode & 0o170000 != 0o120000:
        recs.append(Chmod(path, mode & 0o7777))
    recs.append(Utimes(path, atime, mtime, ctime, ctime if version >= 2 else None))
    try:
        want: Any = b"".join(bytes(p) for r in recs for p in encode_record(r, version))
    except (BtrdeltaError, struct.error, OverflowError):
        want = None
    got = _speedups.encode_inode(version, path, ino, content, uid, gid, mode, atime, mtime,
                                 ctime)
    handed_back = ino < -1 or ino >= 2**63 or uid < 0 or uid >= 2**64 or abs(atime) >= 2**63 \
        or abs(mtime) >= 2**63 or abs(ctime) >= 2**63
    if got is None:
        assert want is None or handed_back
        return
    head, data, tail, count = got
    assert head + (data or b"") + tail == want
    assert count == len(recs)
    assert (data is content) if content else data is None


@pytest.mark.parametrize("version", [1, 2, 3])
def test_writers_of_both_backends_write_the_same_bytes(version: int) -> None:
    recs = [Subvol(b"s", uuid.UUID(int=5), 9), Mkfile(b"f", 257),
            Write(b"f", 0, memoryview(bytes(range(256)) * 200)), Write(b"f", 9, b"x"),
            Utimes(b"f", 1, -2, 3, None), Mkfile(b"f", -1)]
    out = []
    for backend in ("python", "c"):
        pieces: list[Any] = []
        with _native.use_backend(backend, "speedups"):
            w = StreamWriter(pieces.append, version)
        for rec in recs[:-1]:
            w.write(rec)
        with pytest.raises(BtrdeltaError, match="bad value"):
            w.write(recs[-1])
        out.append((b"".join(bytes(p) for p in pieces), w.bytes_written, w.records))
    assert out[0] == out[1]
    assert out[0][1] == len(out[0][0])


def test_a_c_module_older_than_the_code_runs_the_python_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build of _speedups without encode_head/buffer (a checkout whose C extension was
    not rebuilt) writes with the Python encoder and reads into zeroed buffers."""
    from btrdelta.protocol import Connection
    from btrdelta.stream import _speedups
    from btrdelta.update.channels import MessageIO

    monkeypatch.delattr(_speedups, "encode_head")
    monkeypatch.delattr(_speedups, "buffer")
    pieces: list[Any] = []
    w = StreamWriter(pieces.append, 2)
    w.write(Mkfile(b"f", 257))
    assert w._head is None
    assert len(pieces) == 3  # stream header, command header, attributes: not joined
    io_ = MessageIO(object(), Connection("receiver"))  # type: ignore[arg-type]
    assert io_._buffer is bytearray
