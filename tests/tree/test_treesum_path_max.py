"""tree-sum of a tree whose paths are longer than PATH_MAX (4096 bytes): 36 levels of
246-byte names, made relative to one another. It failed "File name too long" at the
first entry past the limit. Oracles: ``os.fwalk`` (directory descriptors, no limit) and
BLAKE3 of each file's content for the manifest's lines; a second tree made the same way
(cp 9.1 and tar 1.34 cannot copy one) whose sum must be equal, and then differ after a
change at the bottom."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3

from btrdelta.tree import tree_sum

_LEVELS = 36  # (9 KB: two descriptors on the way)


def _name(i: int) -> str:
    return "d" * 244 + f"{i:02d}"


def _bottom(root: Path) -> int:
    """A descriptor of the deepest directory (the caller closes it)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(_LEVELS):
        nfd = os.open(_name(i), os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _deep(root: Path, data: bytes) -> str:
    """The tree: at its bottom a file of ``data`` with an xattr, hard-linked from the top,
    a symlink, a directory with a file; every mtime the same. Returns the bottom's path."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(_LEVELS):
            os.mkdir(_name(i), dir_fd=fd)
            nfd = os.open(_name(i), os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("data", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd), "wb") as f:
            f.write(data)
            os.setxattr(f.fileno(), "user.deep", b"value")
        os.symlink("data", "link", dir_fd=fd)
        os.mkdir("sub", dir_fd=fd)
        with open(os.open("sub/f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
            f.write(b"x\n")
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link("data", "top-link", src_dir_fd=fd, dst_dir_fd=top)
        finally:
            os.close(top)
    finally:
        os.close(fd)
    for _dirpath, dirnames, filenames, dfd in os.fwalk(root):
        for name in dirnames + filenames:
            os.utime(name, ns=(1, 1_700_000_000_000_000_007), dir_fd=dfd,
                     follow_symlinks=False)
    os.utime(root, ns=(1, 1_700_000_000_000_000_007))
    bottom = "/".join(_name(i) for i in range(_LEVELS))
    assert len(f"{root}/{bottom}/sub/f") > 2 * 4096
    return bottom


def _treesum(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "btrdelta", "tree-sum", *map(str, args)],
                          capture_output=True, text=True, check=False)


def test_tree_sum_of_paths_past_path_max(tmp_path: Path) -> None:
    a, data = tmp_path / "a", os.urandom(300_000)
    bottom = _deep(a, data)
    proc = _treesum("--manifest", a)
    assert proc.returncode == 0, proc.stderr[:300]
    assert proc.stderr == ""
    lines = {line.split(" ", 1)[0]: line for line in proc.stdout.splitlines()}
    walked = {"."}
    for dirpath, dirnames, filenames, dfd in os.fwalk(a):
        rel = os.path.relpath(dirpath, a)
        for name in dirnames + filenames:
            walked.add(name if rel == "." else f"{rel}/{name}")
            st = os.lstat(name, dir_fd=dfd)
            if name == "data" or name == "f":
                with open(os.open(name, os.O_RDONLY, dir_fd=dfd), "rb") as f:
                    digest = blake3.blake3(f.read()).hexdigest()
                line = lines[name if rel == "." else f"{rel}/{name}"]
                assert f" size={st.st_size} data={digest} " in line, line[-300:]
                assert f" mode={st.st_mode:o} " in line, line[-300:]
    assert set(lines) == walked
    assert lines[f"{bottom}/link"].split(" ", 1)[1].startswith("l "), lines[f"{bottom}/link"]
    assert " target=data " in lines[f"{bottom}/link"]
    assert "xattr:user.deep=" + b"value".hex() in lines[f"{bottom}/data"]
    assert " nlink=2" in lines[f"{bottom}/data"]

    b = tmp_path / "b"
    _deep(b, data)
    assert tree_sum(b) == tree_sum(a)
    assert _treesum(a, "--compare", b).returncode == 0
    fd = _bottom(b)
    try:
        os.setxattr(f"/proc/self/fd/{fd}/data", "user.deep", b"other")
    finally:
        os.close(fd)
    differs = _treesum(a, "--compare", b)
    assert differs.returncode == 1, differs.stderr[:300]
    assert f"differs: {bottom}/data: " in differs.stdout, differs.stdout[-300:]
    assert tree_sum(b) != tree_sum(a)
