"""fs.remove.remove_tree: any depth, symlinks never followed, few descriptors."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import pytest

from btrdelta.fs.remove import remove_path, remove_tree


def _deep(root: Path, depth: int) -> None:
    """A chain of ``depth`` directories below ``root`` (made with short relative paths)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_deeper_than_the_recursion_limit_with_few_descriptors(deep_tmp_path: Path) -> None:
    tmp_path = deep_tmp_path  # removed with rm -rf at teardown, even if this fails
    (tmp_path / "t").mkdir()
    _deep(tmp_path / "t", sys.getrecursionlimit() + 200)  # shutil.rmtree fails here
    (tmp_path / "t" / "f").write_bytes(b"x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # far fewer than the depth
    fd = _dir_fd(tmp_path)
    try:
        remove_tree(fd, "t")
    finally:
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file").write_bytes(b"keep")
    t = tmp_path / "t"
    (t / "a" / "b").mkdir(parents=True)
    (t / "a" / "b" / "to-dir").symlink_to(outside / "keep")
    (t / "to-file").symlink_to(outside / "keep" / "file")
    (t / "dangling").symlink_to("nowhere")
    os.mkfifo(t / "a" / "fifo")
    (t / "a" / "hard").hardlink_to(outside / "keep" / "file")
    fd = _dir_fd(tmp_path)
    try:
        remove_tree(fd, "t")
        with pytest.raises(FileNotFoundError):
            remove_tree(fd, "t")
    finally:
        os.close(fd)
    assert not t.exists()
    assert (outside / "keep" / "file").read_bytes() == b"keep"


def test_a_file_or_symlink_itself(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to(tmp_path)
    fd = _dir_fd(tmp_path)
    try:
        remove_tree(fd, "f")
        remove_tree(fd, "l")
    finally:
        os.close(fd)
    assert list(tmp_path.iterdir()) == []


def test_remove_path_deep_tree_symlink_and_missing(deep_tmp_path: Path) -> None:
    tmp_path = deep_tmp_path
    (tmp_path / "t").mkdir()
    _deep(tmp_path / "t", sys.getrecursionlimit() + 200)
    remove_path(tmp_path / "t")
    assert not (tmp_path / "t").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to("kept")
    remove_path(tmp_path / "link")  # the symlink itself, not what it points to
    assert (tmp_path / "kept" / "f").read_bytes() == b"x"
    assert not (tmp_path / "link").is_symlink()
    with pytest.raises(FileNotFoundError):
        remove_path(tmp_path / "missing")
    remove_path(tmp_path / "missing", ignore_errors=True)
