"""``btrdelta receive`` of a delta of a kernel ``--compressed-data`` stream on btrfs: the
extents of unchanged files are left to their CLONEs from the parent (never recompressed),
the changed files' extents are written compressed as the kernel writes them; the tree is
``btrfs receive``'s."""

from __future__ import annotations

import fcntl
import io
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from btrdelta import receive_any
from btrdelta.delta import expand_events, expand_to, open_delta, patching
from btrdelta.delta.encoding import encode_item
from btrdelta.delta.format import DeltaEnd
from btrdelta.delta.recompress import compress_extent
from btrdelta.errors import ChecksumError
from btrdelta.stream import records as R
from btrdelta.stream.reader import iter_records
from btrdelta.testing.scenarios import kernel_receive as btrfs_receive
from btrdelta.testing.scenarios import send
from btrdelta.tree.treesum import tree_sum

from .conftest import Pair, delta_items
from .test_delta_kernel import make

pytestmark = pytest.mark.btrfs

_FIEMAP = 0xC020660B  # FS_IOC_FIEMAP
_HEAD = struct.Struct("=QQIIII")
_EXT = struct.Struct("=QQQQQIIII")
_ENCODED = 0x8  # FIEMAP_EXTENT_ENCODED: the extent is compressed


def _encoded_layout(path: Path) -> list[tuple[int, int]]:
    """(logical offset, length) of ``path``'s compressed extents (FIEMAP)."""
    count = 512
    buf = bytearray(_HEAD.pack(0, 1 << 62, 1, 0, count, 0) + bytes(_EXT.size * count))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), _FIEMAP, buf)
    out = []
    for i in range(_HEAD.unpack_from(buf)[3]):
        logical, _phys, length, _r1, _r2, flags, *_ = _EXT.unpack_from(
            buf, _HEAD.size + i * _EXT.size)
        if flags & _ENCODED:
            out.append((logical, length))
    return out


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the extents recompressed from now on (appended by worker threads)."""
    calls: list[int] = []

    def counted(raw: Any, compression: int, level: int) -> bytes:
        calls.append(len(raw))
        return compress_extent(raw, compression, level)

    monkeypatch.setattr(patching, "compress_extent", counted)
    return calls


def _dests(pair: Pair, tmp_path: Path, *names: str) -> list[Path]:
    """Fresh directories on the pair's btrfs holding the parent A (received by the kernel)."""
    full_a = send(pair.a, tmp_path / "A.full")
    dests = []
    for name in names:
        d = pair.mnt / f"ev-{tmp_path.name}-{name}"
        d.mkdir()
        btrfs_receive(full_a, d)
        dests.append(d)
    return dests


def test_receive_leaves_unchanged_extents_to_clones(
    delta_pairs: dict[str, Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release rebuilt with most files unchanged (new inodes), sent by the kernel with
    ``--compressed-data`` from a compress=zstd file system: ``receive`` recompresses only
    the extents of the files whose content changed (as many as the kernel sent for them),
    writes those compressed where the kernel's receive has them compressed, and gives
    ``btrfs receive``'s tree; ``delta expand`` still regenerates every extent, bit for bit."""
    pair = delta_pairs["rebuilt-same"]
    stream = pair.streams["v2"]
    delta = make(stream, pair.a)[0]
    kernel_dest, ours_dest = _dests(pair, tmp_path, "k", "o")
    btrfs_receive(stream, kernel_dest)
    kernel, ours = kernel_dest / pair.b.name, ours_dest / pair.b.name

    with open(stream, "rb") as f:
        sent = [r for r in iter_records(f) if type(r) is R.EncodedWrite]
    def same(path: bytes) -> bool:
        old, new = pair.a / path.decode(), pair.b / path.decode()
        return old.is_file() and old.read_bytes() == new.read_bytes()

    changed = {r.path for r in sent if not same(r.path)}
    expected = sum(r.path in changed for r in sent)
    assert 0 < expected < len(sent) // 4, (expected, len(sent))  # mostly unchanged files

    calls = _counting(monkeypatch)
    receive_any(io.BytesIO(delta), ours_dest)
    assert len(calls) == expected
    assert tree_sum(ours, ignore_root_mtime=True, holes=True) == tree_sum(
        kernel, ignore_root_mtime=True, holes=True)
    for path in sorted(changed):
        assert _encoded_layout(ours / path.decode()) == _encoded_layout(kernel / path.decode())
        assert _encoded_layout(kernel / path.decode())  # the kernel's are compressed

    calls.clear()
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), pair.a, out.append)
    assert b"".join(bytes(p) for p in out) == stream.read_bytes()
    assert len(calls) == len(sent)


def _with_end(delta: bytes, **change: Any) -> bytes:
    """``delta`` with its DEND record's fields changed."""
    end = delta_items(delta)[-1]
    assert type(end) is DeltaEnd
    old = b"".join(bytes(p) for p in encode_item(end))
    assert delta.endswith(old)
    fields = {"count": end.count, "size": end.size, "hash_algo": end.hash_algo,
              "digest": bytes(end.digest), **change}
    return delta[: -len(old)] + b"".join(bytes(p) for p in encode_item(DeltaEnd(**fields)))


def test_receive_with_clones_checks_count_and_size(
    delta_pairs: dict[str, Pair], tmp_path: Path
) -> None:
    """With extents left to their clones the DEND digest cannot be computed; the command
    count and byte size still are (a wrong one leaves no subvolume, exit code of a checksum
    error), and the full check (``expand_events``' default, what a signed receive uses)
    still refuses a wrong digest."""
    pair = delta_pairs["rebuilt-same"]
    delta = make(pair.streams["v2"], pair.a)[0]
    end = delta_items(delta)[-1]
    assert type(end) is DeltaEnd
    for n, change in enumerate(({"count": end.count + 1}, {"size": end.size - 1})):
        (dest,) = _dests(pair, tmp_path, f"bad{n}")
        bad = tmp_path / f"bad{n}.delta"
        bad.write_bytes(_with_end(delta, **change))
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-f", str(bad),
                               str(dest)], capture_output=True, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == ChecksumError.exit_code, err
        assert "DEND says" in err, err
        assert "Traceback" not in err, err
        assert not (dest / pair.b.name).exists()
    wrong = _with_end(delta, digest=bytes(32))
    with pytest.raises(ChecksumError, match="digest mismatch"):
        list(expand_events(io.BytesIO(wrong), lambda _s: pair.a))
