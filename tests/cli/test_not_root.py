"""A user who is not root and is refused is told so, in the one error line: btrfs
subvolume operations, loop mounts and the default stores need root. Run as an unprivileged
user (``setpriv``), as a new user who forgot ``sudo`` would."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import nobody_python

HINT = "(not running as root: btrfs subvolumes, mounts and the default stores need root)"


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's own is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="btrdelta-notroot-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    return subprocess.run([*nobody_python(), "-m", "btrdelta", *argv],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_store_of_root_s(world: Path) -> None:
    """Before: 'btrdelta sendshot: error: STORE/records: Permission denied'."""
    store = world / "store"
    (store / "records").mkdir(parents=True)
    store.chmod(0o700)
    proc = _as_nobody("sendshot", "--store", str(store), "list")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("btrdelta sendshot list: error: ")
    assert proc.stderr.rstrip().endswith(HINT)


def test_a_device_image_mounted_by_a_user(world: Path) -> None:
    """Before: 'IMG: cannot mount: mount: /tmp/btrdelta-device-XXXX: failed to setup loop
    device for IMG.' and nothing more."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.fail("mkfs.btrfs is required (scripts/sysdeps.sh installs btrfs-progs)")
    img = world / "dev.img"
    with open(img, "wb") as f:
        f.truncate(200 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    img.chmod(0o644)
    proc = _as_nobody("device", "status", str(img))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot mount" in proc.stderr
    assert proc.stderr.rstrip().endswith(HINT)


def test_an_error_that_names_root_already_is_not_told_twice(world: Path) -> None:
    proc = _as_nobody("sendshot", "--store", str(world / "store"), "list")
    assert proc.returncode == 0, proc.stderr  # an empty store the user may make: no refusal
    assert HINT not in proc.stderr


def test_serve_of_a_directory_the_user_cannot_read(world: Path) -> None:
    """Before: 'serving DIR on http://...' and every request answered 404 until stopped."""
    private = world / "www"
    private.mkdir(mode=0o700)
    proc = _as_nobody("serve", str(private), "--port", "0")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"btrdelta serve: error: {private}: Permission denied")
    assert proc.stderr.rstrip().endswith(HINT)
