"""The libc calls of ``fs.libc``, both backends (the ``sweep`` accelerator's and libc's
through ctypes), checked against the file system and ``stat -f``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from btrdelta import _native
from btrdelta.fs.libc import fs_type, rename_exchange, rename_noreplace


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_rename_noreplace(tmp_path: Path, backend: str) -> None:
    """Both backends: the sweep accelerator's renameat2 and libc's through ctypes."""
    if backend == "c" and not _native.available("sweep"):
        pytest.skip("the sweep accelerator is not built")
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    fd = _open(tmp_path)
    try:
        with _native.use_backend(backend, "sweep"):  # type: ignore[arg-type]
            with pytest.raises(FileExistsError) as info:
                rename_noreplace(fd, b"a", b"b")
            assert info.value.filename == "b"
            rename_noreplace(fd, b"a", b"c")
            assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]
            assert (tmp_path / "c").read_bytes() == b"a"
            rename_exchange(fd, b"b", b"c")
            assert (tmp_path / "b").read_bytes() == b"a"
            assert (tmp_path / "c").read_bytes() == b"b"
            with pytest.raises(FileNotFoundError) as info:
                rename_exchange(fd, b"x", b"c")
            assert info.value.filename == "x"
            assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_fs_type_is_fstatfs(tmp_path: Path, backend: str) -> None:
    """``fs_type`` of both backends is ``f_type`` as ``stat -f`` reads it; a bad fd is
    EBADF."""
    if backend == "c" and not _native.available("sweep"):
        pytest.skip("the sweep accelerator is not built")
    fd = _open(tmp_path)
    try:
        with _native.use_backend(backend, "sweep"):  # type: ignore[arg-type]
            got = fs_type(fd)
            want = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            assert got == int(want, 16)
            with pytest.raises(OSError, match="Bad file descriptor") as info:
                fs_type(-1)
            assert info.value.errno == 9  # EBADF
    finally:
        os.close(fd)
