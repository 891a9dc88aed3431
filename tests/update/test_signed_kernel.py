"""Signed kernel-made streams on btrfs: `btrfs send` output signed with `btrdelta sign` and
received with `btrdelta receive --key` gives the tree `btrfs receive` gives; a delta
signed at make is verified after expansion by the same signature; tampering leaves no
subvolume behind (checked with `btrfs subvolume list`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.scenarios import SCENARIOS, kernel_receive, make_snapshots, send
from btrdelta.tree import tree_sum
from tests.conftest import require_btrfs
from tests.update.signing import flip_in_write, refused, run

pytestmark = pytest.mark.btrfs
SCENARIO = next(s for s in SCENARIOS if s.name == "compressible-data-W6")


@dataclass
class Signed:
    mnt: Path
    a: Path  # snapshot A (read-only, on the source filesystem)
    b: Path
    full: Path  # kernel streams, signed
    incr: Path
    priv: Path
    pub: Path
    other: Path
    kernel: Path  # where `btrfs receive` put A and B


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    require_btrfs()
    tmp = tmp_path_factory.mktemp("signed")
    with loop_fs("btrfs", size="1G", options="compress=zstd") as mnt:
        pair = make_snapshots(mnt, SCENARIO)
        full = send(pair.a, tmp / "A.stream")
        incr = send(pair.b, tmp / "B.stream", parent=pair.a, proto=2, compressed=True)
        for name in ("release", "other"):
            assert run("key", "generate", "-o", tmp / name).returncode == 0
        priv = tmp / "release.key"
        for s in (full, incr):
            proc = run("sign", s, "--key", priv)
            assert proc.returncode == 0, proc.stderr
        kernel = mnt / "kernel"
        kernel.mkdir()
        kernel_receive(full, kernel)
        kernel_receive(incr, kernel)
        yield Signed(mnt, pair.a, pair.b, full, incr, priv, tmp / "release.pub",
                     tmp / "other.pub", kernel)


def _subvolumes(mnt: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(mnt)], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split(" path ", 1)[1] for line in out.splitlines())


def _same_tree(ours: Path, kernel: Path) -> None:
    assert tree_sum(ours, ignore_root_mtime=True) == tree_sum(kernel, ignore_root_mtime=True)


def test_kernel_streams_received_with_key_match_btrfs_receive(signed: Signed) -> None:
    for backend, dest in (("btrfs", signed.mnt / "ours"), ("dir", signed.mnt / "ours-dir")):
        dest.mkdir()
        for s in (signed.full, signed.incr):
            proc = run("receive", "-f", s, "--key", signed.pub, "--backend", backend, dest)
            assert proc.returncode == 0, proc.stderr
        for snap in (signed.a.name, signed.b.name):
            _same_tree(dest / snap, signed.kernel / snap)
    assert f"ours/{signed.b.name}" in _subvolumes(signed.mnt)


def test_delta_signed_at_make_verifies_after_expand_and_receives(
    signed: Signed, tmp_path: Path
) -> None:
    delta = tmp_path / "B.delta"
    proc = run("delta", "make", "-f", signed.incr, "--old", signed.a, "-o", delta, "--sign",
               signed.priv)
    assert proc.returncode == 0, proc.stderr
    sig = Path(f"{delta}.sig")
    # the delta's signature is the kernel stream's: `btrdelta sign` of B.stream said the same
    assert json.loads(sig.read_bytes()) == json.loads(Path(f"{signed.incr}.sig").read_bytes())
    expanded = tmp_path / "B.again"
    assert run("delta", "expand", "-f", delta, "--old", signed.a, "-o", expanded).returncode == 0
    proc = run("verify", "--key", signed.pub, "--signature", sig, expanded)
    assert proc.returncode == 0, proc.stderr
    dest = signed.mnt / "delta-dest"
    dest.mkdir()
    assert run("receive", "-f", signed.full, "--key", signed.pub, dest).returncode == 0
    proc = run("receive", "-f", delta, "--key", signed.pub, dest)
    assert proc.returncode == 0, proc.stderr
    _same_tree(dest / signed.b.name, signed.kernel / signed.b.name)


def test_tampering_leaves_no_subvolume_on_btrfs(signed: Signed, tmp_path: Path) -> None:
    flipped = tmp_path / "flipped.stream"
    flipped.write_bytes(flip_in_write(signed.full.read_bytes(), fix_crc=True))
    shutil.copyfile(f"{signed.full}.sig", f"{flipped}.sig")
    sig = json.loads(Path(f"{signed.full}.sig").read_bytes())
    bad_sig = tmp_path / "bad.sig"
    bad_sig.write_text(json.dumps({**sig, "size": sig["size"] - 1}))
    unsigned = tmp_path / "unsigned.stream"
    shutil.copyfile(signed.full, unsigned)
    wrong_content = tmp_path / "B.with-A-sig"  # a valid signature, of another stream
    shutil.copyfile(signed.incr, wrong_content)
    shutil.copyfile(f"{signed.full}.sig", f"{wrong_content}.sig")
    dest = signed.mnt / "tamper"
    dest.mkdir()
    assert run("receive", "-f", signed.full, "--key", signed.pub, dest).returncode == 0
    before = _subvolumes(signed.mnt)
    cases = [
        (("-f", flipped, "--key", signed.pub), "content differs"),
        (("-f", signed.full, "--key", signed.pub, "--signature", bad_sig), "does not verify"),
        (("-f", signed.full, "--key", signed.other), "not trusted"),
        (("-f", unsigned, "--key", signed.pub), "no signature file"),
        (("-f", wrong_content, "--key", signed.pub), "content differs"),
    ]
    fresh = signed.mnt / "tamper-fresh"
    fresh.mkdir()
    for args, match in cases:
        # into an empty destination (a full stream) and next to its parent (the incremental)
        target = dest if args[1] is wrong_content else fresh
        refused(run("receive", *args, target, process=args[1] is flipped), 5, match)
        assert _subvolumes(signed.mnt) == before, args
        assert sorted(p.name for p in fresh.iterdir()) == []
        assert sorted(p.name for p in dest.iterdir()) == [signed.a.name]
