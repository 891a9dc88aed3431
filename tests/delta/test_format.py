"""Delta-stream format without a kernel: synthetic streams, hostile input, the push parser."""

from __future__ import annotations

import io
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta import _native
from btrdelta.delta import MakeOptions, expand_events, expand_to, make_delta, open_delta
from btrdelta.delta.format import (
    BtrfsCommand,
    DeltaEnd,
    HashAlgo,
    Patch,
    PatchData,
    PWrite,
    StreamStart,
    ZCommands,
    is_delta_stream,
)
from btrdelta.delta.parser import EOF, NEED_DATA, DeltaParser
from btrdelta.delta.stats import collect_delta_stats
from btrdelta.delta.writer import DeltaWriter
from btrdelta.errors import (
    BtrdeltaError,
    ChecksumError,
    StreamFormatError,
    UnsafePathError,
    UnsupportedVersionError,
)
from btrdelta.stream import StreamReader, StreamWriter
from btrdelta.stream import records as R
from btrdelta.stream.codec import command_crc
from btrdelta.stream.constants import Attr, Cmd

from .conftest import delta_items


def _stream(version: int, files: dict[bytes, bytes]) -> bytes:
    out: list[bytes] = []
    w = StreamWriter(out.append, version)
    w.write(R.Snapshot(b"B", uuid.uuid4(), 9, uuid.uuid4(), 8))
    chunk = 49152 if version == 1 else 131072
    for i, (path, data) in enumerate(files.items()):
        w.write(R.Mkfile(f"o{300 + i}-1-0".encode(), 300 + i))
        w.write(R.Rename(f"o{300 + i}-1-0".encode(), path))
        for off in range(0, len(data), chunk):
            w.write(R.Write(path, off, data[off : off + chunk]))
        w.write(R.Truncate(path, len(data)))
        w.write(R.Utimes(path, 1, 2, 3))
    w.write(R.End())
    return b"".join(bytes(p) for p in out)


@pytest.fixture
def old_tree(tmp_path: Path) -> Path:
    old = tmp_path / "old"
    (old / "d").mkdir(parents=True)
    base = os.urandom(20_000) * 4
    (old / "d" / "f1").write_bytes(base)
    (old / "d" / "f2").write_bytes(base[::-1])
    return old


def _new_files(old: Path) -> dict[bytes, bytes]:
    f1 = (old / "d" / "f1").read_bytes()
    f2 = (old / "d" / "f2").read_bytes()
    return {b"d/f1": f1[:5000] + b"CHANGED" + f1[5000:], b"d/f2": f2 + b"tail",
            b"d/new": os.urandom(3000)}


def _make(stream: bytes, old: Path, **kw: object) -> bytes:
    out: list[bytes] = []
    make_delta(io.BufferedReader(io.BytesIO(stream)), old, out.append,  # type: ignore[arg-type]
               MakeOptions(**kw))  # type: ignore[arg-type]
    return b"".join(bytes(p) for p in out)


def _expand(delta: bytes, old: Path) -> bytes:
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), old, out.append)
    return b"".join(bytes(p) for p in out)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("level", [0, 3])
def test_synthetic_round_trip(old_tree: Path, version: int, level: int) -> None:
    stream = _stream(version, _new_files(old_tree))
    delta = _make(stream, old_tree, level=level, jobs=2)
    assert is_delta_stream(delta)
    assert not is_delta_stream(stream)
    assert len(delta) < 10_000 < len(stream)
    assert _expand(delta, old_tree) == stream
    # direct application yields the records the plain stream has
    events = list(expand_events(io.BytesIO(delta), old_tree))
    plain = list(StreamReader(io.BytesIO(stream)).events())
    assert [type(e) for e in events] == [type(e) for e in plain]
    assert [bytes(e.data) for e in events if isinstance(e, R.Write)] == [
        bytes(e.data) for e in plain if isinstance(e, R.Write)
    ]


def test_parser_accepts_any_split(old_tree: Path) -> None:
    delta = _make(_stream(2, _new_files(old_tree)), old_tree)
    for step in (1, 7, 4096):
        p = DeltaParser()
        items = []
        for i in range(0, len(delta) + 1, step):
            p.feed(delta[i : i + step])
            while (item := p.next_item()) not in (NEED_DATA, EOF):
                items.append(type(item))
        p.feed(b"")
        assert p.next_item() is EOF
        assert items[0] is StreamStart
        assert items[-1] is DeltaEnd


@pytest.fixture(scope="module")
def hyp_old(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An old tree shared by every example (hypothesis refuses function-scoped fixtures)."""
    old = tmp_path_factory.mktemp("hyp-old")
    (old / "d").mkdir()
    (old / "d" / "f1").write_bytes(b"0123456789abcdef" * 3000)
    (old / "d" / "f2").write_bytes(b"fedcba9876543210" * 3000)
    return old


@given(cut=st.integers(min_value=0, max_value=10**9), flip=st.integers(0, 255))
def test_truncated_or_flipped_delta_raises_only_our_errors(
    hyp_old: Path, cut: int, flip: int
) -> None:
    old = hyp_old
    delta = _make(_stream(2, _new_files(old)), old, level=3)
    cut %= len(delta)
    for bad in (delta[:cut], delta[:cut] + bytes([delta[cut] ^ (flip or 1)]) + delta[cut + 1 :]):
        with pytest.raises(BtrdeltaError):
            _expand(bad, old)


def _hostile(base_path: bytes) -> bytes:
    out: list[bytes] = []
    w = DeltaWriter(out.append, level=0)
    w.item(StreamStart(1))
    sw: list[bytes] = []
    StreamWriter(sw.append, 1).write(R.Snapshot(b"B", uuid.uuid4(), 1, uuid.uuid4(), 1))
    w.command(b"".join(bytes(p) for p in sw)[17:])
    w.item(Patch(b"x", base_path, 3, HashAlgo.BLAKE3, 10, bytes(32), 100, bytes(32), 20))
    w.item(PatchData(memoryview(bytes(20))))
    w.item(PWrite(0, 100, 100))
    w.item(DeltaEnd(0, 0, HashAlgo.BLAKE3, bytes(32)))
    return b"".join(bytes(p) for p in out)


@pytest.mark.parametrize("path", [b"../../etc/passwd", b"/etc/passwd", b"a/../../b", b"a//b",
                                  b"a\x00b", b""])
def test_hostile_old_paths_are_refused(tmp_path: Path, path: bytes) -> None:
    with pytest.raises(UnsafePathError):
        _expand(_hostile(path), tmp_path)


def test_symlinks_in_the_old_tree_are_not_followed(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"s" * 10)
    old = tmp_path / "old"
    old.mkdir()
    (old / "link").symlink_to(tmp_path)
    (old / "flink").symlink_to(tmp_path / "secret")
    for path in (b"link/secret", b"flink"):
        with pytest.raises(BtrdeltaError, match="missing"):
            _expand(_hostile(path), old)


def test_plain_stream_is_not_a_delta(old_tree: Path) -> None:
    with pytest.raises(StreamFormatError, match="magic"):
        _expand(_stream(1, {}), old_tree)


def test_format2_same_files_paths_and_renamed_dirs(tmp_path: Path) -> None:
    """Unchanged rebuilt files become 'same' patches; a file in a renamed versioned
    directory is patched against its namesake; both expand exactly."""
    old = tmp_path / "old"
    (old / "pkg-1.0.dist-info").mkdir(parents=True)
    record = b"".join(b"pkg/m%04d.py,sha256=%064x,%d\n" % (i, i * 7919, i) for i in range(3000))
    (old / "pkg-1.0.dist-info" / "RECORD").write_bytes(record)
    same = os.urandom(50_000)
    (old / "same.bin").write_bytes(same)
    files = {b"same.bin": same,
             b"pkg-1.1.dist-info/RECORD": record.replace(b"m0007.py", b"m0007.pyx")}
    stream = _stream(2, files)
    delta = _make(stream, old, level=19)
    assert _expand(delta, old) == stream
    st = collect_delta_stats(open_delta(io.BytesIO(delta)))
    assert st.patched_files["same"] == 1
    assert sum(st.patched_files.values()) == 2  # RECORD found in the renamed directory
    assert len(delta) < 2_000 < len(stream) // 50
    # the version field says 10; the development formats 1-3 (never released) are refused
    assert delta[17:21] == (10).to_bytes(4, "little")
    for version in (3, 1, 2):
        with pytest.raises(UnsupportedVersionError, match=f"version {version} .*again"):
            _expand(delta[:17] + version.to_bytes(4, "little") + delta[21:], old)


def test_format2_carrier_content_is_checked(old_tree: Path) -> None:
    """A carrier whose inflated content does not match its CRC is refused before use."""
    delta = _make(_stream(2, _new_files(old_tree)), old_tree, level=3)
    items = delta_items(delta)
    z = next(i for i in items if isinstance(i, ZCommands))
    assert z.crc is not None
    out: list[bytes] = []
    w = DeltaWriter(out.append, level=0)
    for item in items:
        if item is z:
            item = ZCommands(z.raw_len, z.zdata, z.crc ^ 1, z.codec, z.dict_size)
        if isinstance(item, BtrfsCommand):
            w.command(item.raw)
        else:
            w.item(item)
    with pytest.raises(ChecksumError, match="ZCMDS"):
        _expand(b"".join(bytes(x) for x in out), old_tree)


def test_hostile_penc_is_refused(tmp_path: Path) -> None:
    """A PENC announcing a huge padded size (or a bad level) fails before allocating."""
    from btrdelta.delta.format import PEncoded

    (tmp_path / "f").write_bytes(b"x" * 5000)
    for penc in (PEncoded(0, 100, 100, 100, 0, 2, None, 1 << 40, 3, 0),
                 PEncoded(0, 100, 100, 100, 0, 2, None, 4096, 99, 0),
                 PEncoded(0, 100, 100, 100, 0, 5, None, 4096, 3, 0)):
        out: list[bytes] = []
        w = DeltaWriter(out.append, level=0)
        w.item(StreamStart(2))
        sw: list[bytes] = []
        StreamWriter(sw.append, 2).write(R.Snapshot(b"B", uuid.uuid4(), 1, uuid.uuid4(), 1))
        w.command(b"".join(bytes(p) for p in sw)[17:])
        w.item(Patch(b"f", b"f", 0, HashAlgo.BLAKE3_128, 5000,
                     _b3_128(b"x" * 5000), 5000, b"", 0))
        w.item(penc)
        w.item(DeltaEnd(0, 0, HashAlgo.BLAKE3, bytes(32)))
        with pytest.raises(StreamFormatError, match=r"PENC disk length|level|compression"):
            _expand(b"".join(bytes(x) for x in out), tmp_path)


def _b3_128(data: bytes) -> bytes:
    from btrdelta.delta.oldfiles import digest

    return digest(HashAlgo.BLAKE3_128, data)


_TIMES = st.integers(0, (1 << 63) * 1_000_000_000 - 1)  # the encoder: signed seconds


@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1 << 40), _TIMES, _TIMES, _TIMES),
                min_size=1, max_size=12))
def test_format3_carrier_folding_is_exact(ops: list[tuple[int, int, int, int, int]]) -> None:
    """Folded commands (orphan names, previous paths, time differences; format 4: UNLINK
    names as references to the old directory listing, RENAME targets as references to
    unlinked names, directories moved, made and removed) unfold to the exact bytes; folded
    forms are never larger; the C path gives the same bytes and the same state, its
    directory-origin model (the path map) included."""
    from btrdelta.delta.carrier import CarrierState, unfold

    raws, carrier, ws = _folded_carrier(ops)
    rs = CarrierState(lister=_lister)
    pos = 0
    for raw in raws:
        cmd = raw[4] | raw[5] << 8
        end = pos + 10 + int.from_bytes(carrier[pos : pos + 4], "little")
        assert end - pos <= len(raw)  # folded forms are never larger
        back = unfold(cmd, memoryview(carrier), pos, end, rs, 1 << 16)
        expect = raw[:6] + bytes(4) + raw[10:]
        assert (carrier[pos:end] if back is None else bytes(back)) == expect
        pos = end
    assert ws == rs
    # the C path (as the expansion drives it: C while it can, Python for one command,
    # the group handed on whenever full) gives the original commands, CRCs included, and
    # the same state
    unfold_c = _native.live("unfold")
    if unfold_c is not None:
        cs = CarrierState(lister=_lister)
        group = bytearray()
        pos = 0
        while pos < len(carrier):
            # a fresh group each call, handed on at 64 bytes (GROUP_MAX in the expansion):
            # stopping and resuming anywhere gives the same bytes
            part = bytearray()
            pos, _n = unfold_c.run(carrier, pos, part, cs, cs.format, 1 << 16, int(max(Cmd)),
                                   64)
            group += part
            if pos < len(carrier):
                end = pos + 10 + int.from_bytes(carrier[pos : pos + 4], "little")
                cmd = carrier[pos + 4] | carrier[pos + 5] << 8
                back = unfold(cmd, memoryview(carrier), pos, end, cs, 1 << 16)
                one = bytearray(carrier[pos:end] if back is None else back)
                one[6:10] = command_crc(len(one) - 10, cmd, bytes(one[10:])).to_bytes(4, "little")
                group += one
                pos = end
        assert bytes(group) == b"".join(raws)
        assert cs == rs
        assert (cs.moves, cs.pathmap.moved()) == (rs.moves, rs.pathmap.moved())


_OLD_NAMES = sorted(f"f{i}".encode() for i in range(0, 40, 3))


def _lister(path: bytes) -> list[bytes] | None:
    return _OLD_NAMES if path == b"dir" else None


def _folded_carrier(
    ops: list[tuple[int, int, int, int, int]],
) -> tuple[list[bytes], bytearray, Any]:
    """Commands from ``ops`` (see the folding test), their carrier form (format 4) and the
    writer's final state."""
    recs: list[R.Record] = []
    last = 0
    for kind, ino, a, m, c in ops:
        if kind in (0, 6, 8) and a % 2:  # the next inode number (format 8: implied)
            ino = last + 1
        last = ino if kind in (0, 6, 8) else last
        orphan = f"o{ino}-7-0".encode()
        final = f"dir/f{ino}".encode()
        if kind == 0:
            recs += [R.Mkfile(orphan, ino), R.Rename(orphan, final)]
        elif kind == 1:
            recs.append(R.Mkdir(b"x" + orphan, ino))  # not an orphan name: kept
        elif kind == 2:
            recs.append(R.Utimes(final, a, m, c))
        elif kind == 3:
            recs.append(R.Chown(final, 0, ino & 0xFFFF))
        elif kind == 5:  # an old file (or not) unlinked from the old directory
            recs.append(R.Unlink(f"dir/f{ino % 40}".encode()))
        elif kind == 6:  # a rebuilt file put in place under an unlinked name
            recs += [R.Mkfile(orphan, ino), R.Rename(orphan, f"dir/f{a % 40}".encode())]
        elif kind == 7:  # the old directory moved, then a name unlinked from it
            moved = f"d{a % 3}".encode()
            recs += [R.Rename(b"dir", moved), R.Unlink(moved + f"/f{ino % 40}".encode())]
        elif kind == 8:  # a new directory put in place, another one removed
            recs += [R.Mkdir(orphan, ino), R.Rename(orphan, f"d{a % 3}".encode()),
                     R.Rmdir(f"d{m % 3}".encode())]
        else:
            recs.append(R.Utimes(final, a, m, c, m))
    return _fold_records(recs)


def _fold_records(recs: list[R.Record]) -> tuple[list[bytes], bytearray, Any]:
    """The commands of ``recs``, their carrier form (format 4) and the writer's state."""
    from btrdelta.delta.carrier import CarrierState, fold

    out: list[bytes] = []
    w = StreamWriter(out.append, 2)
    for rec in recs:
        w.write(rec)
    raws = []
    pos = 17
    blob = b"".join(bytes(p) for p in out)
    while pos < len(blob):
        n = int.from_bytes(blob[pos : pos + 4], "little") + 10
        raws.append(blob[pos : pos + n])
        pos += n
    ws = CarrierState(lister=_lister)
    carrier = bytearray()
    for raw in raws:
        cmd = raw[4] | raw[5] << 8
        carrier += b"".join(bytes(p) for p in fold(cmd, memoryview(raw), ws))
    return raws, carrier, ws


@pytest.mark.skipif(not _native.available("unfold"),
                    reason="the C unfold path (_unfold.c) is not built")
def test_name_commands_are_unfolded_in_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """UNLINKs named by references into the old listing, RENAMEs to unlinked names (both
    forwards and backwards), directories made, moved and removed: the C path unfolds every
    one of them (Python's unfold is not called) to what Python gives, state included."""
    from btrdelta.delta import unpack

    recs: list[R.Record] = [R.Unlink(b"dir/f9"), R.Unlink(b"dir/f3"), R.Unlink(b"dir/f0"),
                            R.Unlink(b"dir/f12"), R.Unlink(b"dir/f6")]
    for i, name in enumerate((b"f0", b"f12", b"f3", b"f9", b"f6")):
        orphan = f"o{300 + i}-7-0".encode()
        recs += [R.Mkfile(orphan, 300 + i), R.Rename(orphan, b"dir/" + name)]
    recs += [R.Mkdir(b"o400-1-0", 400), R.Rename(b"dir", b"old"), R.Rename(b"o400-1-0", b"dir"),
             R.Unlink(b"old/f15"), R.Unlink(b"old/f21"), R.Unlink(b"old/f18"),
             R.Rmdir(b"old"), R.Rename(b"dir", b"new")]
    raws, carrier, _ws = _fold_records(recs)
    # references: every UNLINK after the first of a directory (the moved one's through its
    # origin), every RENAME after the first into dir/
    assert carrier.count(b"\xfb\xff") == 6
    assert carrier.count(b"\xfc\xff") == 4
    calls: list[int] = []
    python_unfold = unpack.unfold

    def counted(*args: Any) -> Any:
        calls.append(args[0])
        return python_unfold(*args)

    monkeypatch.setattr(unpack, "unfold", counted)
    got = _split_grouped(bytes(carrier), True)
    assert calls == []
    assert got == _split_grouped(bytes(carrier), False)
    assert len(calls) == len(raws)
    assert got[0] == b"".join(raws)  # type: ignore[index]


@pytest.mark.parametrize("use_c", [True, False])
def test_groups_are_handed_on_at_256_commands(use_c: bool) -> None:
    """However long a run of commands the C path can unfold, the expansion hands on a
    group every GROUP_COMMANDS commands, the first ones sooner (16, 32, ... commands: the
    receiver starts on the first ones)."""
    from btrdelta.delta.unpack import _FIRST_GROUP, GROUP_COMMANDS, CarrierReader

    if use_c and not _native.available("unfold"):
        pytest.skip("the C unfold path (_unfold.c) is not built")
    recs: list[R.Record] = []
    for i in range(300):
        recs += [R.Unlink(f"dir/f{i}".encode()), R.Mkdir(f"o{i + 9}-1-0".encode(), i + 9),
                 R.Rename(f"o{i + 9}-1-0".encode(), f"dir/f{i}".encode())]
    raws, carrier, _ws = _fold_records(recs)
    with _native.use_backend("c" if use_c else "python", "unfold"):
        reader = CarrierReader(_lister)
    counts: list[int] = []
    out = bytearray()
    for sub in reader.split(bytearray(carrier), 1, grouped=True):
        assert sub is None
        n, group = reader.take_group()
        counts.append(n)
        out += group
    n, group = reader.take_group()
    counts.append(n)
    out += group
    assert bytes(out) == b"".join(raws)
    sizes = [16, 32, 64, 128, 256, 256]
    assert sizes[0] == _FIRST_GROUP
    assert sizes[-1] == GROUP_COMMANDS
    assert counts == [*sizes, 900 - sum(sizes)]


def _split_grouped(carrier: bytes, use_c: bool) -> object:
    """What the expansion's carrier reader makes of a carrier: the group of btrfs commands
    and the final state, or the error it raises."""
    from btrdelta.delta.unpack import CarrierReader

    with _native.use_backend("c" if use_c else "python", "unfold"):
        reader = CarrierReader(_lister)
    try:
        list(reader.split(bytearray(carrier), 1, grouped=True))
    except BtrdeltaError as exc:
        return ("error", str(exc), bytes(reader.group))
    return bytes(reader.group), reader.state, reader.state.moves, reader.state.pathmap.moved()


@pytest.mark.skipif(not _native.available("unfold"),
                    reason="the C unfold path (_unfold.c) is not built")
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1 << 40), _TIMES, _TIMES, _TIMES),
                min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                max_size=4))
def test_unfold_in_c_matches_python_on_damaged_carriers(
    ops: list[tuple[int, int, int, int, int]], damage: list[tuple[int, int]]
) -> None:
    """Untrusted carriers: with bytes changed anywhere, the C path stops where Python would
    fail (the same error) and otherwise gives the same commands and state."""
    _raws, carrier, _ws = _folded_carrier(ops)
    for at, value in damage:
        carrier[at % len(carrier)] = value
    assert _split_grouped(carrier, True) == _split_grouped(carrier, False)


def test_format3_hostile_markers_are_refused() -> None:
    """Orphan-name and times markers where they cannot be are clear format errors."""
    from btrdelta.delta.carrier import CarrierState, unfold

    def cmd(num: int, payload: bytes) -> memoryview:
        return memoryview(len(payload).to_bytes(4, "little") + num.to_bytes(2, "little")
                          + bytes(4) + payload)

    bad = [
        cmd(19, b"\xfe\xff\x03\x007-0" + b"\x06\x00\x08\x00" + bytes(8)),  # CHOWN, no INO
        cmd(3, b"\xfe\xff\x40\x007-0"),  # orphan marker overruns
        cmd(20, b"\xff\xff\x00\x00"),  # previous path: there is none yet
        cmd(20, b"\x0f\x00\x01\x00a" + b"\xfd\xff\x03\x00" + b"\x0b\x00\x00"),  # width 0
        cmd(20, b"\x0f\x00\x01\x00a" + b"\xfd\xff\x04\x00" + b"\x0b\x00\x01\xff"),  # < 0
        # format 4: an UNLINK name reference before any UNLINK in its directory, a RENAME
        # name reference before any RENAME / unlinked name, an overlong varint
        cmd(Cmd.UNLINK, b"\xfb\xff\x01\x00\x00"),
        cmd(Cmd.RENAME, b"\x0f\x00\x01\x00a" + b"\xfc\xff\x01\x00\x00"),
        cmd(Cmd.RENAME, b"\x0f\x00\x01\x00a" + b"\xfc\xff\x0b\x00" + b"\xff" * 11),
        # format 8: an implied inode number on a command that has none, overrunning
        cmd(Cmd.CHOWN, b"\xfa\xff\x03\x007-0" + b"\x06\x00\x08\x00" + bytes(8)),
        cmd(Cmd.MKFILE, b"\xfa\xff\x40\x007-0"),
    ]
    for mv in bad:
        with pytest.raises(StreamFormatError):
            unfold(mv[4] | mv[5] << 8, mv, 0, len(mv), CarrierState(), 1 << 16)
    # a RENAME name reference whose path would not fit a TLV (was struct.error)
    long = CarrierState()
    long.rename_dir, long.names, long.name_pos = b"d" * 65535 + b"/", [b"x"], -1
    ren = cmd(Cmd.RENAME, b"\x0f\x00\x01\x00a" + b"\xfc\xff\x01\x00\x00")
    with pytest.raises(StreamFormatError, match="65535"):
        unfold(Cmd.RENAME, ren, 0, len(ren), long, 1 << 20)
    # an implied inode number: in format 7, or after the largest one
    mkfile = cmd(Cmd.MKFILE, b"\xfa\xff\x03\x007-0")
    with pytest.raises(StreamFormatError, match="format-7 delta"):
        unfold(Cmd.MKFILE, mkfile, 0, len(mkfile), CarrierState(format=7), 1 << 16)
    with pytest.raises(StreamFormatError, match="has none"):
        unfold(Cmd.MKFILE, mkfile, 0, len(mkfile), CarrierState(last_ino=(1 << 64) - 1),
               1 << 16)
    state = CarrierState(last_ino=41)
    back = unfold(Cmd.MKFILE, mkfile, 0, len(mkfile), state, 1 << 16)
    assert back is not None
    assert bytes(back[10:]) == (
        b"\x0f\x00\x07\x00o42-7-0" + b"\x03\x00\x08\x00" + (42).to_bytes(8, "little"))
    assert state.last_ino == 42


@given(st.binary(max_size=64))
def test_cpatch_garbage_raises_only_our_error(data: bytes) -> None:
    """Any CPATCH payload decodes to a patch or raises StreamFormatError."""
    from btrdelta.delta.encoding import decode_item
    from btrdelta.delta.format import DCmd

    try:
        item = decode_item(DCmd.CPATCH, memoryview(data), 0, len(data))
    except StreamFormatError:
        return
    assert isinstance(item, Patch)
    assert item.patch_len == (0 if item.codec == 0 else len(item.data or b""))


def test_cpatch_round_trip() -> None:
    """A CPATCH decodes to the patch it was encoded from (previous path, implied PWRITE)."""
    from btrdelta.delta.encoding import decode_item, encode_item
    from btrdelta.delta.format import DCmd

    p = Patch(b"a/b", b"a/c", 3, HashAlgo.BLAKE3_64, 70000, bytes(range(8)), 70010,
              bytes(range(4)), 5, memoryview(b"hello"), HashAlgo.BLAKE3_32, 49152)
    raw = b"".join(bytes(x) for x in encode_item(p, inner=True, compact=True))
    assert raw[4] | raw[5] << 8 == DCmd.CPATCH
    back = decode_item(DCmd.CPATCH, memoryview(raw), 10, len(raw))
    assert isinstance(back, Patch)
    assert (back.path, back.base_path, back.codec, back.old_size, back.new_size,
            back.old_digest, back.new_digest, bytes(back.data or b""), back.auto_chunk) == (
        b"a/b", b"a/c", 3, 70000, 70010, bytes(range(8)), bytes(range(4)), b"hello", 49152)
    same = Patch(b"x", b"x", 0, HashAlgo.BLAKE3_32, 9, b"abcd", 9, b"abcd", 0)
    raw = b"".join(bytes(x) for x in encode_item(same, inner=True, compact=True,
                                                  omit_path=True, omit_base=True))
    back = decode_item(DCmd.CPATCH, memoryview(raw), 10, len(raw))
    assert isinstance(back, Patch)
    assert (back.path, back.codec, back.old_size, back.old_digest) == (None, 0, 9, b"abcd")


def test_cpatch_with_the_new_digest_only_round_trip() -> None:
    """Format 10: a short ``edits2`` CPATCH with its new content's digest (flag 128, no old
    digest) decodes to the patch it was encoded from, as large as the short form with the
    old file's digest; flag 128 without a short patch's flag is refused."""
    from btrdelta.delta.encoding import decode_item, encode_item
    from btrdelta.delta.format import CP_NEW, NO_DIGEST, OLD_SIZE_UNKNOWN, DCmd

    patch = memoryview(b"\x05\x10abcd")  # copy 5, substitute 4 bytes: 9 bytes made
    p = Patch(b"a/b", None, 6, NO_DIGEST, OLD_SIZE_UNKNOWN, b"", 9, b"wxyz", len(patch),
              patch, HashAlgo.BLAKE3_32)
    raw = b"".join(bytes(x) for x in encode_item(p, inner=True, compact=True,
                                                  omit_base=True))
    assert raw[4] | raw[5] << 8 == DCmd.CPATCH
    assert raw[10] & CP_NEW
    back = decode_item(DCmd.CPATCH, memoryview(raw), 10, len(raw))
    assert isinstance(back, Patch)
    assert (back.path, back.codec, back.hash_algo, back.old_digest, back.new_size,
            back.new_digest, back.new_algo, bytes(back.data or b"")) == (
        b"a/b", 6, NO_DIGEST, b"", 9, b"wxyz", HashAlgo.BLAKE3_32, b"\x05\x10abcd")
    old_form = Patch(b"a/b", None, 6, HashAlgo.BLAKE3_32, OLD_SIZE_UNKNOWN, b"wxyz", 9, b"",
                     len(patch), patch, NO_DIGEST)
    assert len(raw) == len(b"".join(bytes(x) for x in encode_item(
        old_form, inner=True, compact=True, omit_base=True)))
    for flags in (CP_NEW | 1, CP_NEW | 4 | 1):  # not with a full patch, nor with 'same'
        bad = bytearray(raw[10:])
        bad[0] = flags
        with pytest.raises(StreamFormatError, match="unknown flags"):
            decode_item(DCmd.CPATCH, memoryview(bytes(bad)), 0, len(bad))


@pytest.mark.parametrize("encryption", [None, 0])
@pytest.mark.parametrize("level", [3, -7, 15])
def test_penc_round_trip_both_decoders(encryption: int | None, level: int) -> None:
    """A PENC decodes to the item it was encoded from, by the one-unpack path (the layouts
    ``delta make`` writes, with and without ENCRYPTION) and by the attribute loop (the
    same TLVs in another order); a damaged attribute header is refused by the loop, not
    misread."""
    import struct

    from btrdelta.delta import encoding
    from btrdelta.delta.encoding import decode_item, encode_item
    from btrdelta.delta.format import DCmd, PEncoded

    e = PEncoded(1 << 40, 4096, 131072, 131072, 0, 2, encryption, 4096, level, 0xDEADBEEF)
    raw = b"".join(bytes(x) for x in encode_item(e, inner=True))
    assert raw[4] | raw[5] << 8 == DCmd.PENC
    assert encoding._decode_penc(memoryview(raw), 10, len(raw)) == e
    assert decode_item(DCmd.PENC, memoryview(raw), 10, len(raw)) == e
    tlvs = []  # the same TLVs in reverse order: the attribute loop, same item
    pos = 10
    while pos < len(raw):
        n = struct.unpack_from("<H", raw, pos + 2)[0]
        tlvs.append(raw[pos : pos + 4 + n])
        pos += 4 + n
    other = b"".join(reversed(tlvs))
    assert encoding._decode_penc(memoryview(other), 0, len(other)) is None
    assert decode_item(DCmd.PENC, memoryview(other), 0, len(other)) == e
    bad = bytearray(raw)  # a header's length changed: not the usual layout, refused
    bad[12:14] = (7).to_bytes(2, "little")  # OFFSET's length 8 -> 7
    assert encoding._decode_penc(memoryview(bad), 10, len(bad)) is None
    with pytest.raises(StreamFormatError):
        decode_item(DCmd.PENC, memoryview(bad), 10, len(bad))


def test_unchanged_rebuilt_file_is_not_copied(tmp_path: Path) -> None:
    """A large file rebuilt with the same content becomes a 'same' patch without a copy of
    the old file or of the new content: Python allocations during make stay near the one
    buffered copy of its WRITE commands (format 3 held three: commands, joined content, old
    file)."""
    import tracemalloc

    old = tmp_path / "old"
    old.mkdir()
    data = os.urandom(16 << 20)
    (old / "big").write_bytes(data)
    stream = _stream(2, {b"big": data})
    del data
    tracemalloc.start()
    try:
        delta = _make(stream, old, jobs=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _expand(delta, old) == stream
    st = collect_delta_stats(open_delta(io.BytesIO(delta)))
    assert st.patched_files["same"] == 1
    assert peak < 1.5 * (16 << 20), peak


def test_old_root_may_be_a_symlink_to_the_old_tree(old_tree: Path, tmp_path: Path) -> None:
    """``--old`` names the old tree; a symlink to it is followed (only paths below it are
    walked without following symlinks), also for UNLINK references to old listings."""
    from btrdelta.cli import main

    files = _new_files(old_tree)
    out: list[bytes] = []
    w = StreamWriter(out.append, 1)
    w.write(R.Snapshot(b"B", uuid.uuid4(), 9, uuid.uuid4(), 8))
    w.write(R.Unlink(b"d/f2"))
    for off in range(0, len(files[b"d/f1"]), 49152):
        w.write(R.Write(b"d/f1", off, files[b"d/f1"][off : off + 49152]))
    w.write(R.End())
    stream = tmp_path / "s"
    stream.write_bytes(b"".join(bytes(p) for p in out))
    link = tmp_path / "old-link"
    link.symlink_to(old_tree)
    delta, back = tmp_path / "d", tmp_path / "back"
    assert main(["delta", "make", "-f", str(stream), "--old", str(link), "-o", str(delta)]) == 0
    assert main(["delta", "expand", "-f", str(delta), "--old", str(link), "-o", str(back)]) == 0
    assert back.read_bytes() == stream.read_bytes()
    assert len(delta.read_bytes()) < 2000


@pytest.mark.parametrize(("carrier", "background"),
                         [("zstd", False), ("zstd", True), ("auto", False), ("auto", True)])
def test_writer_keeps_no_view_of_what_it_carries(carrier: str, background: bool) -> None:
    """The carrier copies each command it is given: the caller's buffer may be reused at
    once (``delta make`` lets every command go once written; views of them kept each one
    alive, ~450 bytes of objects a command, while ``auto`` held the output: 20 MiB at the
    end of the Debian upgrade pair). Same bytes as with a fresh buffer per command."""
    out: dict[bool, bytes] = {}
    for reuse in (False, True):
        pieces: list[bytes] = []
        w = DeltaWriter(pieces.append, carrier=carrier, background=background)
        buf = bytearray()
        for i in range(3000):
            path = f"d/file-{i % 97}".encode()
            payload = (
                struct.pack("<HH", Attr.PATH, len(path)) + path
                + struct.pack("<HHQ", Attr.SIZE, 8, i * 4096)
            )
            cmd = struct.pack("<IHI", len(payload), Cmd.TRUNCATE, 0) + payload
            if not reuse:
                buf = bytearray()
            buf[:] = cmd
            w.command(buf)
            if reuse:
                buf[:] = b"\xff" * len(buf)  # the writer must not see this
        w.flush()
        w.close()
        out[reuse] = b"".join(bytes(p) for p in pieces)
    assert out[True] == out[False]
