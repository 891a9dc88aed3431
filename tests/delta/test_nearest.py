"""New files patched against the nearest old file: found by name (a hash suffix renamed)
or by content (an unrelated name), and the delta expands to the stream."""

from __future__ import annotations

import io
import random
import uuid
from pathlib import Path

import pytest

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.delta.make import MakeStats
from btrdelta.delta.nearest import OldIndex, name_key
from btrdelta.stream import StreamWriter
from btrdelta.stream import records as R


def _new_file_stream(path: bytes, data: bytes, unlink: bytes | None = None) -> bytes:
    out: list[bytes] = []
    w = StreamWriter(out.append, 1)
    w.write(R.Snapshot(b"B", uuid.UUID(int=1), 9, uuid.UUID(int=2), 8))
    if unlink is not None:
        w.write(R.Unlink(unlink))
    w.write(R.Mkfile(b"o300-7-0", 300))
    w.write(R.Rename(b"o300-7-0", path))
    for off in range(0, len(data), 49152):
        w.write(R.Write(path, off, data[off : off + 49152]))
    w.write(R.Utimes(path, 1, 2, 3))
    w.write(R.End())
    return b"".join(bytes(p) for p in out)


def _round_trip(stream: bytes, old: Path, **kw: object) -> tuple[int, MakeStats]:
    out: list[bytes] = []
    stats = make_delta(io.BufferedReader(io.BytesIO(stream)), old,  # type: ignore[arg-type]
                       out.append, MakeOptions(jobs=2, **kw))  # type: ignore[arg-type]
    delta = b"".join(bytes(p) for p in out)
    back: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), old, back.append)
    assert b"".join(bytes(p) for p in back) == stream
    return len(delta), stats


def _edited(data: bytes, rnd: random.Random, edits: int = 5) -> bytes:
    buf = bytearray(data)
    for _ in range(edits):
        at = rnd.randrange(len(buf))
        buf[at : at + 4] = rnd.randbytes(4)
    return bytes(buf)


@pytest.mark.parametrize(
    ("a", "b"),
    [(b"libopenblasp-r0-24bff013.3.26.dev.so", b"libopenblasp-r0-01191904.3.27.so"),
     (b"libgfortran-040039e1.so.5.0.0", b"libgfortran-3f2a1b0c.so.5.1.0"),
     (b"libfoo.so.1.2.3", b"libfoo.so.1.2.4"),
     (b"mod.cpython-311.pyc", b"mod.cpython-312.pyc")],
)
def test_names_modulo_versions_and_hashes(a: bytes, b: bytes) -> None:
    assert name_key(a) == name_key(b)
    assert name_key(a) != name_key(b"libother.so.1")


def test_renamed_with_a_hash_suffix(tmp_path: Path) -> None:
    """auditwheel's ``<pkg>.libs/lib<name>-<hash>.so``: a new name each release. The new
    library (a few bytes changed) is patched against the old one: the delta is a small
    fraction of the file, not the file compressed."""
    rnd = random.Random(1)
    lib = rnd.randbytes(300_000)
    (tmp_path / "pkg.libs").mkdir()
    (tmp_path / "pkg.libs/libfoo-1a2b3c4d.so.1.0").write_bytes(lib)
    (tmp_path / "pkg.libs/libbar-5e6f7a8b.so").write_bytes(rnd.randbytes(50_000))
    stream = _new_file_stream(b"pkg.libs/libfoo-9f8e7d6c.so.1.0", _edited(lib, rnd),
                              unlink=b"pkg.libs/libfoo-1a2b3c4d.so.1.0")
    size, stats = _round_trip(stream, tmp_path)
    assert stats.found_bases == 1
    assert size < 2_000 < 300_000
    # without looking, the new library is carried whole (random bytes: ~300 KB)
    size_plain, stats = _round_trip(stream, tmp_path, nearest=False)
    assert stats.found_bases == 0
    assert size_plain > 290_000


def test_new_file_like_an_unrelated_old_file(tmp_path: Path) -> None:
    """A new file whose name and directory share nothing with the old file it resembles
    (a copied and edited data file) is found by its content."""
    rnd = random.Random(2)
    data = rnd.randbytes(200_000)
    (tmp_path / "usr/share/a").mkdir(parents=True)
    (tmp_path / "usr/share/a/data.bin").write_bytes(data)
    for i in range(20):  # other old files, similar in size, different in content
        (tmp_path / "usr/share/a" / f"other{i}.bin").write_bytes(rnd.randbytes(150_000))
    new = _edited(data[:50_000] + b"inserted" + data[50_000:150_000] + data[150_016:], rnd)
    stream = _new_file_stream(b"opt/thing/blob.dat", new)
    size, stats = _round_trip(stream, tmp_path)
    assert stats.found_bases == 1
    assert size < 2_000


def test_index_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only files of at least MIN_SKETCH bytes are sketched, within the byte budget."""
    from btrdelta.delta import nearest

    for i in range(30):
        (tmp_path / f"f{i}").write_bytes(random.Random(i).randbytes(8192))
    (tmp_path / "small").write_bytes(b"x" * 100)
    monkeypatch.setattr(nearest, "SKETCH_BUDGET", 10 * 8192)
    index = OldIndex(tmp_path, 1 << 20)
    assert index.by_content(b"y" * 5000) == []
    sketched = {p & 0xFFFFF for p in index._pairs}
    assert len(sketched) == 10
    assert len(index.paths) == 31


def test_renamed_versioned_directory_among_many_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pkg-1.2/core.py`` -> ``pkg-1.3/core.py`` where many other old files are named
    ``core.py`` (more than are compared by name): the old file in the same place, modulo
    versions, comes first. Small (not sketched): only its name can find it."""
    from btrdelta.delta import nearest

    monkeypatch.setattr(nearest, "MAX_CANDIDATES", 1)
    rnd = random.Random(3)
    for k in range(50):
        d = tmp_path / "usr/lib/python3/dist-packages" / f"other{k}-2.0"
        d.mkdir(parents=True)
        (d / "core.py").write_bytes(rnd.randbytes(3000))
    old = rnd.randbytes(3000)
    pkg = tmp_path / "usr/lib/python3/dist-packages/zeta-1.2"
    pkg.mkdir()
    (pkg / "core.py").write_bytes(old)
    (pkg / "util.py").write_bytes(rnd.randbytes(3000))
    new_path = b"usr/lib/python3/dist-packages/zeta-1.3/core.py"
    index = OldIndex(tmp_path, 1 << 20)
    assert index.by_name(new_path, 3000) == [
        (b"usr/lib/python3/dist-packages/zeta-1.2/core.py", True)]
    assert len(index.by_name(new_path, 3000, limit=10)) >= 2
    size, stats = _round_trip(_new_file_stream(new_path, _edited(old, rnd)), tmp_path)
    assert stats.found_bases == 1
    assert size < 1_000 < 3000


def test_new_file_made_of_several_old_files(tmp_path: Path) -> None:
    """A new file made of the edited contents of three unrelated old files (a bundle, a
    merged module): against any one of them it would cost two thirds of itself; with the
    carrier (formats 6 and 7) the three, one after the other, are its one base (a PATCH
    with BASES), with either carrier, and the delta expands to the stream."""
    rnd = random.Random(5)
    parts = [rnd.randbytes(60_000) for _ in range(3)]
    (tmp_path / "usr/share/x").mkdir(parents=True)
    for i, part in enumerate(parts):
        (tmp_path / "usr/share/x" / f"piece{i}.dat").write_bytes(part)
    for i in range(20):  # others, unrelated
        (tmp_path / "usr/share/x" / f"other{i}.dat").write_bytes(rnd.randbytes(60_000))
    new = _edited(parts[1] + parts[0] + parts[2], rnd)
    stream = _new_file_stream(b"opt/bundle.bin", new)
    size, stats = _round_trip(stream, tmp_path, carrier="xz")
    assert stats.found_bases == 1
    assert size < 2_000
    # with one old file as a base at most: two thirds carried
    size_one, _ = _round_trip(stream, tmp_path, carrier="xz", max_bases=1)
    assert size_one > 110_000
    size_zstd, _ = _round_trip(stream, tmp_path, carrier="zstd")
    assert size_zstd < 2_000


def test_several_old_files_are_checked(tmp_path: Path) -> None:
    """A patch against several old files: one of them changed is a ChecksumError, one
    missing a MissingBaseError."""
    from btrdelta.errors import ChecksumError, MissingBaseError

    rnd = random.Random(6)
    parts = [rnd.randbytes(30_000) for _ in range(2)]
    (tmp_path / "a").mkdir()
    for i, part in enumerate(parts):
        (tmp_path / "a" / f"p{i}").write_bytes(part)
    stream = _new_file_stream(b"b/bundle", _edited(parts[0] + parts[1], rnd))
    out: list[bytes] = []
    make_delta(io.BufferedReader(io.BytesIO(stream)), tmp_path, out.append,  # type: ignore[arg-type]
               MakeOptions(carrier="xz", jobs=1))
    delta = b"".join(bytes(p) for p in out)
    assert len(delta) < 2_000

    def expand(d: bytes) -> None:
        expand_to(open_delta(io.BytesIO(d)), tmp_path, lambda _: None)

    (tmp_path / "a/p1").write_bytes(parts[1][:-1] + b"!")
    with pytest.raises(ChecksumError, match="old files differ"):
        expand(delta)
    (tmp_path / "a/p1").unlink()
    with pytest.raises(MissingBaseError):
        expand(delta)


@pytest.mark.parametrize("version", [5, 6])
def test_bases_only_in_format_6(version: int) -> None:
    """A carried CPATCH with BASES decodes in a format-6 carrier and is refused in a
    format-5 one (zstd carrier, whose codec both name)."""
    import zstandard

    from btrdelta.delta.encoding import encode_item
    from btrdelta.delta.format import CP_NEW_ALGO, CP_OLD_ALGO, Patch, ZCommands
    from btrdelta.delta.unpack import CarrierReader
    from btrdelta.errors import StreamFormatError
    from btrdelta.stream.crc import crc32c

    patch = Patch(b"new", b"a/p0", 2, CP_OLD_ALGO, 100, bytes(8), 50, bytes(4), 3,
                  memoryview(b"xyz"), CP_NEW_ALGO, bases=(b"a/p1", b"a/p2"))
    raw = b"".join(bytes(p) for p in encode_item(patch, inner=True, compact=True))
    z = ZCommands(len(raw), memoryview(zstandard.ZstdCompressor().compress(raw)),
                  crc32c(raw, 0), codec=1, version=version)
    carrier = CarrierReader(None)
    if version == 5:
        with pytest.raises(StreamFormatError, match="BASES in a format-5"):
            list(carrier.split(carrier.inflate(z), 1))
    else:
        (got,) = list(carrier.split(carrier.inflate(z), 1))
        assert isinstance(got, Patch)
        assert got.bases == (b"a/p1", b"a/p2")
        assert got.base_path == b"a/p0"
        assert got.old_size == 100
