"""``receive_any``: a plain stream or a delta stream, whichever the input is, gives the tree
the kernel's ``btrfs receive`` gives."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from btrdelta.delta.make import make_delta
from btrdelta.delta.options import MakeOptions
from btrdelta.errors import MissingBaseError
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.scenarios import (
    SCENARIOS,
    SnapshotPair,
    kernel_receive,
    make_snapshots,
    send,
)
from btrdelta.tree import tree_sum
from btrdelta.update.receive import receive_any
from tests.conftest import require_btrfs

pytestmark = pytest.mark.btrfs
SCENARIO = next(s for s in SCENARIOS if s.name == "compressible-data-W6")


def _delta(stream: Path, old: Path, out: Path) -> Path:
    with open(stream, "rb") as f, open(out, "wb") as o:
        make_delta(f, old, o.write, MakeOptions(jobs=1))
    return out


def _streams(mnt: Path, tmp_path: Path) -> tuple[SnapshotPair, Path, Path, Path]:
    """The scenario's snapshots on ``mnt``, the full stream of A, the incremental A -> B
    and its delta."""
    pair = make_snapshots(mnt, SCENARIO)
    full = send(pair.a, tmp_path / "A.stream")
    incr = send(pair.b, tmp_path / "B.stream", parent=pair.a)
    return pair, full, incr, _delta(incr, pair.a, tmp_path / "B.delta")


@pytest.mark.parametrize("backend", ["btrfs", "dir"])
def test_plain_then_delta_match_btrfs_receive(tmp_path: Path, backend: str) -> None:
    require_btrfs()
    with loop_fs("btrfs", size="1G") as mnt:
        pair, full, incr, delta = _streams(mnt, tmp_path)
        kernel = mnt / "kernel"
        kernel.mkdir()
        kernel_receive(full, kernel)
        kernel_receive(incr, kernel)
        ours = mnt / "ours" if backend == "btrfs" else tmp_path / "ours"
        ours.mkdir()
        # a path, then an open file: the parent of the delta's snapshot is found in DEST
        got = receive_any(full, ours, backend=backend)
        assert [s.name for s in got] == [pair.a.name]
        with open(delta, "rb") as f:
            got = receive_any(f, ours, backend=backend)
        assert [s.name for s in got] == [pair.b.name]
        for name in (pair.a.name, pair.b.name):
            assert tree_sum(ours / name, ignore_root_mtime=True) == \
                tree_sum(kernel / name, ignore_root_mtime=True)


def test_delta_without_its_parent_is_a_missing_base(tmp_path: Path) -> None:
    require_btrfs()
    with loop_fs("btrfs", size="1G") as mnt:
        pair = make_snapshots(mnt, SCENARIO)
        incr = send(pair.b, tmp_path / "B.stream", parent=pair.a)
        delta = _delta(incr, pair.a, tmp_path / "B.delta").read_bytes()
    dest = tmp_path / "empty"
    dest.mkdir()
    with pytest.raises(MissingBaseError):
        receive_any(io.BufferedReader(io.BytesIO(delta)), dest, backend="dir")  # type: ignore[arg-type]
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("backend", ["btrfs", "dir"])
def test_a_delta_looks_its_parent_up_once(tmp_path: Path, backend: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The expansion (old files to patch) and the applier (the snapshot) share the parent
    one lookup found; a parent given by the caller is not looked up at all."""
    from btrdelta.receive import subvolumes
    from btrdelta.update.streams import receive_version

    require_btrfs()
    real = subvolumes.find_subvolume
    found: list[object] = []

    def counted(*args: object, **kwargs: object) -> Path | None:
        found.append(args[1])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subvolumes, "find_subvolume", counted)
    with loop_fs("btrfs", size="1G") as mnt:
        _pair, full, _incr, delta = _streams(mnt, tmp_path)
        ours = mnt / "ours" if backend == "btrfs" else tmp_path / "ours"
        ours.mkdir()
        (base,) = receive_any(full, ours, backend=backend)
        found.clear()
        (got,) = receive_any(delta, ours, backend=backend)
        assert found == [got.parent_uuid]
        want = tree_sum(ours / got.name)
        found.clear()
        with open(delta, "rb") as f:
            again, _ = receive_version(f, ours, "again", source="B.delta", delta=True,
                                       identity=want, parent_at=(base.uuid, base.path))
        assert found == []
        assert tree_sum(again.path) == want


def test_a_verified_delta_is_not_hashed_again(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``receive_version(verified=True)`` (``update``: the delta was checked against the
    signed index's BLAKE3, the tree is checked against the release's identity) does not
    hash the expanded stream for DEND; the default does."""
    from btrdelta.delta import expand
    from btrdelta.update.streams import receive_version

    require_btrfs()
    real = expand.hasher
    hashed: list[object] = []
    monkeypatch.setattr(expand, "hasher", lambda algo: hashed.append(algo) or real(algo))
    with loop_fs("btrfs", size="1G") as mnt:
        pair, full, _incr, delta = _streams(mnt, tmp_path)
        ours = mnt / "ours"
        ours.mkdir()
        (base,) = receive_any(full, ours)
        want = tree_sum(pair.b)
        for verified in (True, False):
            hashed.clear()
            with open(delta, "rb") as f:
                got, _ = receive_version(f, ours, f"v{verified}", source="B.delta",
                                         delta=True, identity=want, verified=verified,
                                         parent_at=(base.uuid, base.path))
            assert tree_sum(got.path) == want
            assert bool(hashed) is not verified


def test_a_verified_hop_over_a_wrong_old_file_fails_its_identity_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A verified hop (``update``) hashes no old file and no patched content in the
    expansion: a parent whose patched file is not the one the delta was made against (same
    size, one byte changed) is caught by the identity check of the tree received, and
    nothing is left under the new name."""
    import random
    import subprocess

    from btrdelta.delta import oldfiles, patching
    from btrdelta.delta.format import SAME_CODEC, Patch
    from btrdelta.errors import ChecksumError
    from btrdelta.update.streams import receive_version

    require_btrfs()
    hashed: list[int] = []
    real = oldfiles.digest

    def counted(algo: int, data: bytes) -> bytes:
        hashed.append(len(data))
        return real(algo, data)

    monkeypatch.setattr(oldfiles, "digest", counted)
    monkeypatch.setattr(patching, "digest", counted)
    monkeypatch.setattr(oldfiles.OldFileChecks, "add",
                        lambda *args: pytest.fail("an old file checked in the background"))
    codecs: list[int] = []
    start = patching.Patcher.start

    def seen(self: patching.Patcher, p: Patch) -> None:
        codecs.append(p.codec)
        start(self, p)

    monkeypatch.setattr(patching.Patcher, "start", seen)
    rnd = random.Random(14)
    text = bytes(rnd.choice(b"abcdefgh \n") for _ in range(300_000))
    with loop_fs("btrfs", size="1G") as mnt:
        vol = mnt / "vol"
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(vol)], check=True)
        (vol / "lib.so").write_bytes(text)
        (vol / "other").write_bytes(text[:5000])
        a, b = mnt / "A", mnt / "B"
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(a)],
                       check=True)
        (vol / "lib.so").write_bytes(text[:1000] + b"EDITED" + text[1000:])
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(b)],
                       check=True)
        full = send(a, tmp_path / "A.stream")
        delta = _delta(send(b, tmp_path / "B.stream", parent=a), a, tmp_path / "B.delta")
        ours = mnt / "ours"
        ours.mkdir()
        (base,) = receive_any(full, ours)
        want = tree_sum(b)
        subprocess.run(["btrfs", "property", "set", "-f", str(base.path), "ro", "false"],
                       check=True, capture_output=True)
        target = base.path / "lib.so"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        subprocess.run(["btrfs", "property", "set", str(base.path), "ro", "true"],
                       check=True, capture_output=True)
        hashed.clear()
        with open(delta, "rb") as f, \
                pytest.raises(ChecksumError, match="does not have its content identity"):
            receive_version(f, ours, "B", source="B.delta", delta=True, identity=want,
                            verified=True, parent_at=(base.uuid, base.path))
        assert hashed == []
        assert any(c != SAME_CODEC for c in codecs)  # lib.so was patched
        assert not (ours / "B").exists()
        assert sorted(p.name for p in ours.iterdir()) == [base.name]
