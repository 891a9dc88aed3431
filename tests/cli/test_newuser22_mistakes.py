"""A new user's mistakes found in session 22's trial, each through the CLI: one line naming
what and where, the documented exit code, nothing made or left half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.cli import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def test_replicate_into_its_own_source(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``replicate SRC SRC`` (and ``replicate SRC SRC/sub``) exited 0 having made
    SRC/SRC.DATE, a copy of SRC inside itself, and the receiver's state files
    (.btrdelta-replica.json, .lock) in SRC, which the next send would carry."""
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(os.urandom(4096))
    before = _listing(src)
    store = tmp_path / "store"
    for dest, said in ((src, f"DEST {src} is SOURCE"),
                       (src / "sub", f"DEST {src / 'sub'} is inside SOURCE {src}"),
                       (src / "sub" / "new", f"DEST {src / 'sub' / 'new'} is inside")):
        rc = main(["replicate", "--store", str(store), str(src), str(dest)])
        assert rc == 2, dest
        err = _err(capsys)
        assert err.startswith(f"btrdelta replicate: error: {said}"), err
        assert _listing(src) == before
    assert not store.exists()
    # a symbolic link to SOURCE is SOURCE; a directory beside it is fine
    (tmp_path / "link").symlink_to(src)
    assert main(["replicate", "--store", str(store), str(src), str(tmp_path / "link")]) == 2
    assert "is SOURCE" in _err(capsys)
    beside = tmp_path / "data-backup"
    beside.mkdir()
    assert main(["replicate", "-q", "--store", str(store), str(src), str(beside)]) == 0
    assert _listing(src) == before
    assert [p.name.startswith("data.") for p in beside.iterdir()
            if not p.name.startswith(".")] == [True]


@pytest.mark.btrfs
def test_image_clone_that_fills_its_output_or_store_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'btrdelta image clone: error: No space left on device' and nothing more (a
    chunk's pwrite into --output, or into the store, does not say where)."""
    from btrdelta.testing.loopfs import loop_fs
    from tests.conftest import require_btrfs

    require_btrfs()  # loop devices
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(24 << 20))  # nothing compresses it: 24 MiB of chunks
    archive = tmp_path / "rootfs.bdar"
    assert main(["image", "compress", "-q", "-i", str(image), "-o", str(archive)]) == 0
    roomy = tmp_path / "store"
    roomy.mkdir()
    with loop_fs("ext4", size="16M") as small:
        for target, output, named in (
                ([], ["--output", str(small / "out.img")], small / "out.img"),
                ([str(small / "store" / "v1")], [], small / "store"),
                ([str(roomy / "v1")], ["--output", str(small / "out.img")],
                 small / "out.img")):
            capsys.readouterr()
            assert main(["image", "clone", "-q", str(archive), *target, *output]) == 1
            err = _err(capsys)
            assert err == f"btrdelta image clone: error: {named}: No space left on device\n"
            assert not (small / "out.img").exists()
