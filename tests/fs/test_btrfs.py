"""btrfs ioctls and subvolume operations, checked against btrfs-progs and the kernel: what
``btrfs subvolume show/get-default/list``, a second mount and ``dump-tree``'s inode items
say after each operation."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from btrdelta import _native
from btrdelta.fs.btrfs import (
    EXTENT,
    EXTENT_SEARCH,
    FILEATTR_FLAGS,
    FS_FLAGS_KNOWN,
    FS_TREE,
    IOCTLS,
    create_snapshot,
    create_subvolume,
    default_subvolume,
    delete_subvolume,
    file_extents,
    fileattr_to_fsflags,
    find_subvolumes_by_uuid,
    fsflags_to_fileattr,
    get_fileattr,
    get_fsflags,
    is_btrfs,
    largest_item,
    set_default_subvolume,
    set_fsflags,
    set_readonly,
    set_received,
    subvol_info,
)
from tests.conftest import btrfs_loop

from .conftest import mount_source, progs, subvolume_show

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_BTRFS_BITS = sum(f.bit for f in FILEATTR_FLAGS)
_FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def _open(path: Path, flags: int = _DIR) -> int:
    return os.open(path, flags)


@pytest.fixture
def top(btrfs_mnt: Path) -> Iterator[int]:
    fd = _open(btrfs_mnt)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.btrfs
def test_subvolume_operations_match_progs(btrfs_mnt: Path, top: int) -> None:
    create_subvolume(top, b"a")
    (btrfs_mnt / "a" / "f").write_bytes(b"content")
    afd = _open(btrfs_mnt / "a")
    try:
        a = subvol_info(afd)
        shown = subvolume_show(btrfs_mnt / "a")
        assert shown["UUID"] == str(a.uuid)
        assert shown["Subvolume ID"] == str(a.id)
        assert shown["Parent UUID"] == "-"
        assert a.parent_uuid is None
        assert not a.readonly
        create_snapshot(top, b"b", afd)  # writable
        create_snapshot(top, b"c", afd, readonly=True)
    finally:
        os.close(afd)
    assert (btrfs_mnt / "b" / "f").read_bytes() == b"content"
    received = uuid.uuid4()
    bfd = _open(btrfs_mnt / "b")
    try:
        set_received(bfd, received, 42)
        set_readonly(bfd)
        b = subvol_info(bfd)
    finally:
        os.close(bfd)
    shown = subvolume_show(btrfs_mnt / "b")
    assert shown["Parent UUID"] == str(a.uuid) == str(b.parent_uuid)
    assert shown["Received UUID"] == str(received) == str(b.received_uuid)
    assert shown["Flags"] == "readonly"
    assert b.readonly
    assert b.stransid == 42
    assert progs("property", "get", btrfs_mnt / "c", "ro").strip() == "ro=true"
    # by received UUID first, else by UUID (as btrfs receive looks parents up)
    assert find_subvolumes_by_uuid(btrfs_mnt, received) == [btrfs_mnt / "b"]
    assert find_subvolumes_by_uuid(btrfs_mnt, a.uuid) == [btrfs_mnt / "a"]
    assert find_subvolumes_by_uuid(btrfs_mnt, uuid.uuid4()) == []
    bfd = _open(btrfs_mnt / "b")
    try:
        set_readonly(bfd, False)
    finally:
        os.close(bfd)
    assert progs("property", "get", btrfs_mnt / "b", "ro").strip() == "ro=false"
    # a read-only subvolume is deleted as well as a writable one
    delete_subvolume(top, b"c")
    delete_subvolume(top, b"b")
    listed = progs("subvolume", "list", btrfs_mnt)
    assert re.search(r" path a$", listed, re.M)
    assert not re.search(r" path [bc]$", listed, re.M)
    assert not (btrfs_mnt / "b").exists()
    assert is_btrfs(top)
    proc = _open(Path("/proc"))
    try:
        assert not is_btrfs(proc)
    finally:
        os.close(proc)


@pytest.mark.btrfs
def test_default_subvolume_is_what_progs_and_a_mount_see(
    btrfs_mnt: Path, top: int, tmp_path: Path
) -> None:
    create_subvolume(top, b"slot-b")
    (btrfs_mnt / "slot-b" / "marker").write_bytes(b"b")
    assert default_subvolume(top) == FS_TREE
    assert progs("subvolume", "get-default", btrfs_mnt).startswith("ID 5 ")
    sfd = _open(btrfs_mnt / "slot-b")
    try:
        sid = subvol_info(sfd).id
        set_default_subvolume(sfd)  # the subvolume holding the descriptor
    finally:
        os.close(sfd)
    try:
        assert progs("subvolume", "get-default", btrfs_mnt).split()[:2] == ["ID", str(sid)]
        assert default_subvolume(top) == sid
        # the kernel: a mount without subvol= shows the default subvolume
        second = tmp_path / "second"
        second.mkdir()
        subprocess.run(["mount", "-t", "btrfs", mount_source(btrfs_mnt), str(second)],
                       check=True, capture_output=True)
        try:
            assert (second / "marker").read_bytes() == b"b"
        finally:
            subprocess.run(["umount", str(second)], check=True, capture_output=True)
        # what progs writes, we read back
        progs("subvolume", "set-default", "5", btrfs_mnt)
        assert default_subvolume(top) == FS_TREE
        set_default_subvolume(top, sid)  # by id, from any descriptor on the filesystem
        assert progs("subvolume", "get-default", btrfs_mnt).split()[:2] == ["ID", str(sid)]
    finally:
        set_default_subvolume(top, FS_TREE)
    assert progs("subvolume", "get-default", btrfs_mnt).startswith("ID 5 ")


def _inode_flags(dev: str) -> dict[int, tuple[int, set[str]]]:
    """Inode number -> btrfs inode-item flags of the top-level subvolume and their names,
    from dump-tree."""
    out = progs("inspect-internal", "dump-tree", "-t", "5", dev)
    flags: dict[int, tuple[int, set[str]]] = {}
    ino = None
    for line in out.splitlines():
        m = re.search(r"key \((\d+) INODE_ITEM 0\)", line)
        if m:
            ino = int(m.group(1))
            continue
        m = re.search(r"\bflags (0x[0-9a-f]+)\(([A-Z_|a-z]*)\)", line)
        if m and ino is not None and "sequence" in line:
            flags[ino] = (int(m.group(1), 16), set(m.group(2).split("|")))
            ino = None
    return flags


@pytest.mark.btrfs
def test_fileattr_flags_both_ways_match_the_inode_items(btrfs_mnt: Path) -> None:
    """FILEATTR bits -> FS_*_FL (set) -> the kernel's inode item (dump-tree) -> FS_*_FL
    (read) -> the same FILEATTR bits."""
    base = btrfs_mnt / "attrs"
    base.mkdir()
    wanted = {
        "f1": 0x2 | 0x100,  # NODATACOW | NODUMP (NOCOW: set while empty)
        "f2": 0x800 | 0x20 | 0x200,  # COMPRESS | SYNC | NOATIME
        "f3": 0x8 | 0x80,  # NOCOMPRESS | APPEND
        "f4": 0x40,  # IMMUTABLE
        "d": 0x400,  # DIRSYNC
    }
    fds: dict[str, int] = {}
    try:
        for name, want in wanted.items():
            path = base / name
            if name == "d":
                path.mkdir()
                fds[name] = _open(path)
            else:
                path.touch()
                fds[name] = _open(path, os.O_RDONLY)
            set_fsflags(fds[name], fileattr_to_fsflags(want))
        os.sync()
        on_disk = _inode_flags(mount_source(btrfs_mnt))
        by_bit = {f.bit: f.name for f in FILEATTR_FLAGS}
        for name, want in wanted.items():
            value, names = on_disk[os.fstat(fds[name]).st_ino]
            assert value & _BTRFS_BITS == want, name
            assert {by_bit[b] for b in by_bit if b & want} <= names, name  # progs' names
            assert get_fileattr(fds[name]) == want, name
    finally:
        for fd in fds.values():
            set_fsflags(fd, get_fsflags(fd) & ~FS_FLAGS_KNOWN)
            os.close(fd)


def test_fileattr_map_is_one_table_both_ways() -> None:
    bits = [f.bit for f in FILEATTR_FLAGS]
    for n in range(len(bits) + 1):
        for combo in itertools.combinations(bits, n):
            fileattr = sum(combo)
            assert fsflags_to_fileattr(fileattr_to_fsflags(fileattr)) == fileattr
    assert fileattr_to_fsflags(0x1) == 0  # NODATASUM has no chattr flag
    assert fsflags_to_fileattr(0x1000) == 0  # FS_INDEX_FL has no FILEATTR bit
    assert fileattr_to_fsflags(_BTRFS_BITS) == FS_FLAGS_KNOWN
    r, w = os.pipe()
    try:
        assert get_fileattr(r) == 0  # no inode flags on a pipe: 0, not an error
    finally:
        os.close(r)
        os.close(w)


def test_numbers_match_the_kernel_headers(tmp_path: Path) -> None:
    """Every ioctl number and ``FS_*_FL`` bit, as the C compiler reads ``<linux/btrfs.h>``,
    ``<linux/fs.h>`` and ``<linux/fsverity.h>``."""
    cc = shutil.which("cc")
    if cc is None or not Path("/usr/include/linux/btrfs.h").exists():
        pytest.skip("no C compiler or kernel headers")
    names = {name: "" if name == "FICLONERANGE" else "BTRFS_IOC_FS_INFO" if name == "FS_INFO"
             else ("FS_IOC_" + name.removeprefix("FS_")) if name.startswith("FS_")
             else "BTRFS_IOC_" + name for name in IOCTLS}
    names = {k: v or k for k, v in names.items()}
    fs_names = [f.fs_name for f in FILEATTR_FLAGS]
    lines = [f'printf("%lu\\n", (unsigned long)({macro}));'
             for macro in [*names.values(), *fs_names, "BTRFS_FS_TREE_OBJECTID"]]
    src = tmp_path / "n.c"
    src.write_text("#include <stdio.h>\n#include <linux/btrfs.h>\n#include <linux/btrfs_tree.h>\n"
                   "#include <linux/fs.h>\n#include <linux/fsverity.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    subprocess.run([cc, "-o", str(tmp_path / "n"), str(src)], check=True, capture_output=True)
    got = [int(v) for v in subprocess.run([str(tmp_path / "n")], check=True,
                                          capture_output=True, text=True).stdout.split()]
    assert got == [*IOCTLS.values(), *(f.fs_bit for f in FILEATTR_FLAGS), FS_TREE]


@pytest.mark.btrfs
def test_subvolume_ioctls_let_other_threads_run(btrfs_mnt: Path, top: int) -> None:
    """Creating, snapshotting and deleting a subvolume (4 KiB arguments, which Python 3.11's
    ``fcntl.ioctl`` makes holding the GIL) let other threads run meanwhile: a replication
    deletes its snapshot in a thread while the main one moves the cursor. Each call is made
    on a frozen filesystem (``fsfreeze``: it waits in the kernel until the thaw); a thread
    thaws it 0.2 s later, which it can only do if the call released the GIL (else a
    process thaws it after 5 s, and the thread has not run when the call returns: the
    switch interval is one minute meanwhile)."""
    assert _native.live("sweep") is not None  # (the C accelerators are built for the tests)
    create_subvolume(top, b"gil-sv")
    src = _open(btrfs_mnt / "gil-sv")
    try:
        calls = {"create": lambda: create_subvolume(top, b"gil-new"),
                 "snapshot": lambda: create_snapshot(top, b"gil-snap", src, readonly=True),
                 "delete": lambda: delete_subvolume(top, b"gil-snap")}
        ran = {what: _frozen_during(btrfs_mnt, call) for what, call in calls.items()}
    finally:
        os.close(src)
    assert ran == dict.fromkeys(calls, True)
    names = os.listdir(btrfs_mnt)
    assert "gil-new" in names
    assert "gil-snap" not in names
    for name in (b"gil-new", b"gil-sv"):
        delete_subvolume(top, name)


def _frozen_during(mnt: Path, call: Callable[[], object]) -> bool:
    """Make ``call`` on ``mnt`` frozen; whether a thread thawing it ran before it returned."""
    ran = threading.Event()
    fd = _open(mnt)

    def thaw() -> None:
        time.sleep(0.2)
        ran.set()
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, _FITHAW, 0)

    subprocess.run(["fsfreeze", "-f", mnt], check=True)
    backstop = subprocess.Popen(["sh", "-c", f"sleep 5; fsfreeze -u '{mnt}' 2>/dev/null"])
    thread = threading.Thread(target=thaw)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)  # (the GIL changes hands only when a thread blocks)
    try:
        thread.start()
        call()
        return ran.is_set()
    finally:
        sys.setswitchinterval(interval)
        thread.join()
        backstop.kill()
        backstop.wait()
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True, check=False)
        os.close(fd)


def _scattered(path: Path, n: int) -> list[int]:
    """A file of ``n`` 4 KiB blocks, each alone between holes (``n`` extent items); their
    offsets."""
    offsets = [i * 8192 for i in range(n)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in offsets:
            os.pwrite(fd, os.urandom(4096), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return offsets


def _extents_searched(path: Path, monkeypatch: pytest.MonkeyPatch,
                      into: bytearray | None = None) -> tuple[list[int], int]:
    """The offsets of ``path``'s extent items (:func:`file_extents`, searching with buffer
    ``into``) and the searches made."""
    from btrdelta.fs import btrfs

    calls = []
    real = btrfs._ioctl

    def counted(fd: int, request: int, buf: bytearray) -> None:
        calls.append(request)
        real(fd, request, buf)

    fd = os.open(path, os.O_RDONLY)
    try:
        with monkeypatch.context() as m:
            m.setattr(btrfs, "_ioctl", counted)
            got = file_extents(fd, os.fstat(fd).st_ino, into=into)
    finally:
        os.close(fd)
    assert got is not None
    return [item[0] for item in EXTENT.iter_unpack(got)], calls.count(IOCTLS["TREE_SEARCH_V2"])


@pytest.mark.btrfs
@pytest.mark.parametrize("nodesize", [16384, 65536])
def test_file_extents_ends_after_one_search_only_when_nothing_can_follow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodesize: int) -> None:
    """A search result that leaves room for the largest item the filesystem holds is every
    item (one ``TREE_SEARCH_V2``); one that leaves less is searched on, and every item is
    found: files whose items (85 bytes each in the result) fill the 64 KiB buffer to just
    under, at and just over that room, exactly (771 items: 65,535 bytes), and twice over;
    the same with one buffer for every search (what the last one left in it is not read)."""
    with btrfs_loop(size="256M", mkfs_args=("-n", str(nodesize))) as mnt:
        fd = os.open(mnt, os.O_RDONLY)
        try:
            item_max = largest_item(fd)
        finally:
            os.close(fd)
        assert item_max == nodesize - 101 - 25  # BTRFS_MAX_ITEM_SIZE
        most = ((1 << 16) - 32 - item_max) // 85  # items a result can have and be whole
        kept = bytearray(EXTENT_SEARCH)
        for n in sorted({1, 2, max(most - 1, 1), most, most + 1, 771, 772, 1600}, reverse=True):
            want = _scattered(mnt / f"f{n}", n)
            got, searches = _extents_searched(mnt / f"f{n}", monkeypatch)
            assert got == want, n
            assert searches == _searches_needed(n, most), n
            assert _extents_searched(mnt / f"f{n}", monkeypatch, kept) == (got, searches), n
        assert any(kept)  # (searched with, not replaced)


def _searches_needed(n: int, most: int) -> int:
    """Searches for ``n`` items: 771 fill a result (65,535 bytes); a result of ``most`` or
    fewer is whole; after a fuller one another search is made (empty when none is left)."""
    searches = 0
    while True:
        searches += 1
        got = min(n, (1 << 16) // 85)
        n -= got
        if got <= most:
            return searches
