"""The safe walk: components checked, no symlink followed below the root, cached directories
that always name what the path names now; read-only lookups below a root path.

Layout per test: ``tmp/outside`` holds what a hostile path would like to reach, ``tmp/root``
is the trusted root; symlinks inside the root point outside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from btrdelta.errors import UnsafePathError
from btrdelta.fs.sandbox import (
    DirCache,
    Sandbox,
    check_name,
    file_size,
    list_dir,
    open_regular,
    split_path,
    walk,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"s3cret")
    (outside / "sub" / "secret").write_bytes(b"s3cret")
    r = tmp_path / "root"
    (r / "d" / "e").mkdir(parents=True)
    (r / "d" / "f").write_bytes(b"0123456789")
    (r / "d" / "e" / "g").write_bytes(b"g")
    (r / "top").write_bytes(b"top")
    (r / "dirlink").symlink_to(outside)
    (r / "d" / "filelink").symlink_to(outside / "secret")
    os.mkfifo(r / "fifo")
    return r


@pytest.mark.parametrize("path", [b"/etc", b"a//b", b"a/", b"./a", b"a/./b", b"a\0b", b"a/..",
                                  b"../x"])
def test_split_path_refuses(path: bytes) -> None:
    with pytest.raises(UnsafePathError):
        split_path(path)


def test_split_path_and_check_name_accept() -> None:
    assert split_path(b"") == []
    assert split_path(b"a/b c/..d/.e") == [b"a", b"b c", b"..d", b".e"]
    assert check_name(b"snap-1") == b"snap-1"
    for bad in (b"", b".", b"..", b"a/b", b"a\0"):
        with pytest.raises(UnsafePathError):
            check_name(bad)


def test_walk_never_follows_a_symlink(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sub = walk(fd, [b"d", b"e"])
        try:
            assert os.listdir(sub) == ["g"]
        finally:
            os.close(sub)
        for parts in ([b"dirlink"], [b"dirlink", b"sub"], [b"d", b"f"], [b"d", b"filelink"]):
            with pytest.raises(UnsafePathError) as info:
                walk(fd, parts, b"/".join(parts))
            assert info.value.path == b"/".join(parts)
        with pytest.raises(FileNotFoundError):
            walk(fd, [b"d", b"missing"])
    finally:
        os.close(fd)


def test_sandbox_resolves_inside_and_refuses_symlinks(root: Path) -> None:
    with Sandbox.open(root) as sb:
        dfd, name = sb.parent(b"d/e/g")
        assert name == b"g"
        assert os.listdir(dfd) == ["g"]
        fd = sb.open_file(b"d/f", os.O_RDONLY)
        try:
            assert os.read(fd, 100) == b"0123456789"
        finally:
            os.close(fd)
        for path in (b"dirlink/secret", b"d/filelink", b"fifo", b"d"):
            with pytest.raises(UnsafePathError):
                os.close(sb.open_file(path, os.O_RDONLY))
        with pytest.raises(UnsafePathError):
            sb.parent(b"")  # the root names no entry
        proc = sb.proc_path(b"d/f")  # the resolved directory's descriptor, then the name
        assert proc.startswith(b"/proc/self/fd/")
        assert proc.endswith(b"/f")
        assert os.lstat(proc).st_size == 10


def test_sandbox_cache_follows_renames(root: Path) -> None:
    """A directory renamed away and replaced by a symlink: after invalidate, the cached
    descriptor is gone and the next walk refuses the symlink."""
    with Sandbox.open(root) as sb:
        before, _ = sb.parent(b"d/e/g")
        os.rename(root / "d", root / "moved")
        (root / "d").symlink_to(root.parent / "outside")
        assert sb.dir_fd([b"d", b"e"], b"d/e/g") == before  # stale until invalidated
        sb.invalidate(b"d")
        with pytest.raises(UnsafePathError):
            sb.parent(b"d/e/g")
        after, _ = sb.parent(b"moved/e/g")
        assert os.listdir(after) == ["g"]
        sb.clear()
        sb.trim()
    assert sb.root_fd == -1


def test_read_only_lookups_below_a_root_path(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "root-link"
    link.symlink_to(root)  # the root itself is the user's path: followed
    fd = open_regular(link, b"d/f")
    assert fd is not None
    try:
        assert os.read(fd, 100) == b"0123456789"
    finally:
        os.close(fd)
    assert file_size(link, b"d/f") == 10
    # below the root nothing is followed, and nothing but a regular file is opened
    for path in (b"dirlink/secret", b"dirlink/sub/secret", b"d/filelink", b"fifo", b"d",
                 b"missing", b"d/f/x"):
        assert open_regular(root, path) is None, path
        assert file_size(root, path) is None, path
    for bad in (b"", b"../outside/secret", b"/etc/passwd", b"d//f"):
        with pytest.raises(UnsafePathError):
            open_regular(root, bad)
        assert file_size(root, bad) is None
    assert list_dir(link, b"") == [b"d", b"dirlink", b"fifo", b"top"]
    assert list_dir(root, b"d") == [b"e", b"f", b"filelink"]
    for path in (b"dirlink", b"dirlink/sub", b"d/f", b"missing", b"..", b"/d"):
        assert list_dir(root, path) is None, path
    assert list_dir(tmp_path / "no-such-root", b"") is None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dir_cache_walks_only_below_the_previous_lookup(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup opens only the components below what it shares with the previous one
    (the levels above stay open); at most 32 levels stay open however deep the path; a
    missing or symlinked component is "not there" and the cache goes on from what it
    holds; ``close`` releases every fd."""
    deep = [b"l%d" % i for i in range(40)]
    (root.joinpath(*(p.decode() for p in deep))).mkdir(parents=True)
    (root.joinpath(*(p.decode() for p in deep)) / "x").write_bytes(b"x")
    before = _open_fds()
    cache = DirCache()
    opened: list[bytes] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        opened.append(os.fsencode(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    try:
        assert cache.dir_fd(root, [b"d", b"e"]) is not None
        assert opened == [os.fsencode(root), b"d", b"e"]
        opened.clear()
        assert cache.dir_fd(root, [b"d"]) is not None  # a level held: nothing opened
        assert cache.dir_fd(root, [b"d", b"e"]) is not None
        assert opened == [b"e"]
        opened.clear()
        assert cache.dir_fd(root, [b"d", b"missing"]) is None
        assert cache.dir_fd(root, [b"dirlink"]) is None
        assert cache.dir_fd(root, [b"d", b"e"]) is not None
        assert opened == [b"missing", b"dirlink", b"d", b"e"]
        opened.clear()
        fd = open_regular(root, b"/".join([*deep, b"x"]), cache)
        assert fd is not None
        assert os.read(fd, 10) == b"x"
        os.close(fd)
        assert _open_fds() <= before + 1 + 32 + 1  # root, 32 levels, the deep walk's fd
        fd = open_regular(root, b"/".join([*deep, b"x"]), cache)
        assert fd is not None
        os.close(fd)
        assert opened.count(b"l0") == 1  # the 32 levels kept, the rest walked again
        assert opened.count(b"l39") == 2
    finally:
        cache.close()
    assert _open_fds() == before


def test_dir_cache_keeps_one_directory_open(root: Path) -> None:
    cache = DirCache()
    try:
        first = cache.dir_fd(root, [b"d"])
        assert first is not None
        assert cache.dir_fd(root, [b"d"]) == first  # the same descriptor, no new walk
        for name, data in ((b"d/f", b"0123456789"), (b"d/e/g", b"g"), (b"top", b"top")):
            fd = open_regular(root, name, cache)
            assert fd is not None
            try:
                assert os.read(fd, 100) == data
            finally:
                os.close(fd)
        assert open_regular(root, b"dirlink/secret", cache) is None
        assert cache.dir_fd(root, [b"dirlink"]) is None
    finally:
        cache.close()
    cache.close()  # twice is harmless
