"""tree-sum: equal trees give equal sums; every covered property changes the sum."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.tree import diff_manifests, tree_manifest, tree_sum


def _make(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d/f").write_bytes(b"hello" * 1000)
    (root / "g").write_bytes(b"")
    os.chmod(root / "g", 0o644)  # (not the umask's: 0600 under 077, which _chmod sets)
    os.link(root / "d/f", root / "d/hard")
    os.symlink("d/f", root / "l")
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"x" * 4096)
    os.mkfifo(root / "p")
    os.setxattr(root / "d/f", "user.k", b"v")
    for p in (root / "d/f", root / "g", root / "d", root / "sparse", root):
        os.utime(p, ns=(1, 1_500_000_000_123_456_789))
    os.utime(root / "l", ns=(1, 7), follow_symlinks=False)
    return root


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def test_copies_are_equal_and_the_sum_is_stable(tmp_path: Path) -> None:
    a = _make(tmp_path / "a")
    b = _copy(a, tmp_path / "b")
    assert tree_sum(a) == tree_sum(b) == tree_sum(a)
    assert tree_sum(a, holes=True) == tree_sum(b, holes=True)
    assert diff_manifests(tree_manifest(a), tree_manifest(b)) == []


def _chmod(r: Path) -> None:
    os.chmod(r / "g", 0o600)


def _chown(r: Path) -> None:
    os.lchown(r / "g", 1234, 1234)


def _mtime(r: Path) -> None:
    os.utime(r / "d/f", ns=(1, 1_500_000_000_123_456_788))  # one nanosecond


def _content(r: Path) -> None:
    data = bytearray((r / "d/f").read_bytes())
    data[-1] ^= 1
    st = os.stat(r / "d/f")
    (r / "d/f").write_bytes(bytes(data))
    os.utime(r / "d/f", ns=(st.st_atime_ns, st.st_mtime_ns))


def _xattr(r: Path) -> None:
    os.setxattr(r / "d/f", "user.k", b"w")


def _symlink(r: Path) -> None:
    (r / "l").unlink()
    os.symlink("d/F", r / "l")
    os.utime(r / "l", ns=(1, 7), follow_symlinks=False)


def _hardlink_group(r: Path) -> None:
    st = os.stat(r / "d/hard")
    (r / "d/hard").unlink()
    shutil.copy2(r / "d/f", r / "d/hard")  # same content, no longer the same inode
    os.link(r / "g", r / "g2")  # keep link counts plausible elsewhere
    os.utime(r / "d/hard", ns=(st.st_atime_ns, st.st_mtime_ns))


def _fifo_to_file(r: Path) -> None:
    (r / "p").unlink()
    (r / "p").write_bytes(b"")


@pytest.mark.parametrize(
    "change", [_chmod, _chown, _mtime, _content, _xattr, _symlink, _hardlink_group, _fifo_to_file]
)
def test_every_covered_property_changes_the_sum(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    a = _make(tmp_path / "a")
    b = _copy(a, tmp_path / "b")
    root_mtime = os.stat(b).st_mtime_ns
    change(b)
    os.utime(b, ns=(1, root_mtime))
    assert tree_sum(a) != tree_sum(b)
    assert diff_manifests(tree_manifest(a), tree_manifest(b))


def test_holes_only_with_holes_option(tmp_path: Path) -> None:
    a = _make(tmp_path / "a")
    b = _copy(a, tmp_path / "b")
    # fill the hole with real zeros: same content, other layout
    data = (b / "sparse").read_bytes()
    st = os.stat(b / "sparse")
    (b / "sparse").unlink()
    (b / "sparse").write_bytes(data)
    os.utime(b / "sparse", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(b, ns=(1, os.stat(a).st_mtime_ns))
    assert tree_sum(a) == tree_sum(b)
    assert tree_sum(a, holes=True) != tree_sum(b, holes=True)


def test_root_mtime_and_excluded_xattrs(tmp_path: Path) -> None:
    a = _make(tmp_path / "a")
    b = _copy(a, tmp_path / "b")
    os.utime(b, ns=(1, 42))
    os.setxattr(b / "g", "user.extra", b"1")
    assert tree_sum(a) != tree_sum(b)
    assert tree_sum(a, ignore_root_mtime=True, exclude_xattrs=[b"user.extra"]) == tree_sum(
        b, ignore_root_mtime=True, exclude_xattrs=[b"user.extra"]
    )


def test_cli_compare_and_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _make(tmp_path / "a")
    b = _copy(a, tmp_path / "b")
    assert main(["tree-sum", "--compare", str(a), str(b)]) == 0
    _xattr(b)
    assert main(["tree-sum", "--compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "differs: d/f" in out
    assert "xattr:user.k" in out
    assert main(["tree-sum", "--manifest", str(a)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(". d ")
    assert any(x.startswith("sparse f") for x in lines)
    assert main(["tree-sum", str(a)]) == 0
    assert capsys.readouterr().out.split()[0] == tree_sum(a)


@pytest.mark.parametrize(("literal", "raw"), [
    (b"a\\nb", b"a\nb"),          # the two characters \n, and a newline
    (b"a\\x20b", b"a b"),         # the four characters \x20, and a space
    (b"a\\xffb", b"a\xffb"),      # the four characters \xff, and a byte that is not UTF-8
    (b"a\\\\b", b"a\\b"),         # two backslashes, and one
])
def test_names_that_read_alike_sum_differently(tmp_path: Path, literal: bytes, raw: bytes) -> None:
    """tree-sum-2: each name, symlink target and xattr name is one token of its own (a
    backslash is doubled before the other escapes); tree-sum-1 gave these pairs one sum."""
    sums = []
    for side, name in (("x", literal), ("y", raw)):
        root = tmp_path / side
        root.mkdir()
        path = os.path.join(bytes(root), name)
        with open(path, "wb"):
            pass
        os.symlink(name, os.path.join(bytes(root), b"link"))
        os.setxattr(path, b"user." + name, b"v")
        for p in (path, bytes(root)):
            os.utime(p, ns=(1, 1000))
        os.utime(os.path.join(bytes(root), b"link"), ns=(1, 1000), follow_symlinks=False)
        sums.append(tree_sum(root))
        assert len({e.path for e in tree_manifest(root)}) == 3
    assert sums[0] != sums[1]
    lines = [[e.line() for e in tree_manifest(tmp_path / s)] for s in "xy"]
    assert all(" " not in line.split(" ", 1)[0] for side in lines for line in side)
    assert lines[0] != lines[1]


def test_cli_compare_names_each_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _make(tmp_path / "a")
    b = _copy(a, tmp_path / "b")
    (a / "only-a").write_bytes(b"1")
    (b / "only-b").write_bytes(b"2")
    os.utime(b, ns=(1, os.stat(a).st_mtime_ns))
    assert main(["tree-sum", str(a), "--compare", str(b)]) == 1
    out = capsys.readouterr().out
    assert f"only in {a}: only-a" in out
    assert f"only in {b}: only-b" in out


def test_progress_counts_every_entry_and_file_byte(tmp_path: Path) -> None:
    """``on_progress(entries, bytes)``: rising, every 256 entries, and at the end the
    manifest's entries and the regular files' bytes (``tree-sum``'s bar on a terminal)."""
    tree = tmp_path / "t"
    for d in range(6):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (tree / f"d{d}" / f"f{f}").write_bytes(b"x" * (d * 100 + f))
    (tree / "big").write_bytes(os.urandom(3 << 20))  # hashed in a worker thread
    os.symlink("big", tree / "link")
    calls: list[tuple[int, int]] = []
    entries = tree_manifest(tree, on_progress=lambda n, b: calls.append((n, b)))
    assert calls == sorted(calls)
    assert [n for n, _ in calls[:-1]] == [256 * k for k in range(1, len(calls))]
    files = sum(e.size or 0 for e in entries if e.kind == "f")
    assert calls[-1] == (len(entries), files)
    assert tree_sum(tree, on_progress=lambda n, b: None) == tree_sum(tree)


def test_cli_shows_a_bar_on_a_terminal_and_prints_only_the_sum(tmp_path: Path) -> None:
    """On a terminal, a bar (cleared at the end) while it works; standard output holds the
    answer alone, and a file or pipe gets no progress at all (tree-sum has no -q)."""
    import sys

    from tests.conftest import read_pty

    tree = tmp_path / "t"
    tree.mkdir()
    for f in range(600):
        (tree / f"f{f}").write_bytes(b"y" * f)
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "tree-sum", str(tree)],
                              stdout=subprocess.PIPE, stderr=slave, timeout=60, check=True)
        os.set_blocking(master, False)
        term = read_pty(master).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert proc.stdout.decode() == f"{tree_sum(tree)}  {tree}\n"
    assert "tree-sum" in term
    piped = subprocess.run([sys.executable, "-m", "btrdelta", "tree-sum", str(tree)],
                           capture_output=True, timeout=60, check=True)
    assert (piped.stdout, piped.stderr) == (proc.stdout, b"")


#: a POSIX ACL (user 1000 rwx besides the mode's entries), as system.posix_acl_* hold it
_ACL = bytes.fromhex("02000000" "01000700ffffffff" "02000700e8030000" "04000500ffffffff"
                     "10000500ffffffff" "20000500ffffffff")


def test_acls_on_xfs_sum_as_elsewhere(tmp_path: Path) -> None:
    # XFS lists to root its own stored form of the POSIX ACLs (trusted.SGI_ACL_FILE,
    # trusted.SGI_ACL_DEFAULT) besides system.posix_acl_*: not a property of the tree (cp -a
    # and rsync skip them, /etc/xattr.conf), so the same tree on ext4 has the same sum
    from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs

    try:
        with loop_fs("xfs", size="300M") as xfs, loop_fs("ext4", size="64M") as ext4:
            tree = xfs / "t"
            (tree / "d").mkdir(parents=True)
            (tree / "d/f").write_bytes(b"x")
            os.setxattr(tree / "d/f", "system.posix_acl_access", _ACL)
            os.setxattr(tree / "d", "system.posix_acl_default", _ACL)
            assert "trusted.SGI_ACL_FILE" in os.listxattr(tree / "d/f")  # (what XFS lists)
            copy = _copy(tree, ext4 / "t")
            ours = tree_manifest(tree)
            assert not diff_manifests(ours, tree_manifest(copy))
            assert [x for e in ours for x, _ in e.xattrs] == [
                b"system.posix_acl_default", b"system.posix_acl_access"]
    except BtrfsUnavailable as exc:  # (any loop filesystem that cannot be made)
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.mark.parametrize("holes", [False, True])
def test_a_file_of_many_names_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holes: bool
) -> None:
    """Every name of a hard-linked file gets the digest, layout and xattrs of its inode
    (BLAKE3 of the content: the oracle), read for its first name only: 60,000 names cost
    one read, not 60,000 (small files hashed at once, large ones in worker threads)."""
    import blake3

    from btrdelta.tree import treesum

    tree = tmp_path / "t"
    (tree / "a").mkdir(parents=True)
    contents = {"small": b"s" * 5000, "large": os.urandom(1 << 20)}
    for name, data in contents.items():
        (tree / name).write_bytes(data)
        os.setxattr(tree / name, "user.k", name.encode())
        for i in range(3):
            os.link(tree / name, tree / "a" / f"{name}{i}")
    read: list[bytes] = []
    real = treesum._file_digest

    def counting(path: bytes, *args: object, **kwargs: object) -> object:
        read.append(path)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(treesum, "_file_digest", counting)
    entries = {e.path: e for e in tree_manifest(tree, holes=holes)}
    assert len(read) == 2
    for name, data in contents.items():
        names = [name.encode()] + [f"a/{name}{i}".encode() for i in range(3)]
        want = blake3.blake3(data).hexdigest()
        assert {entries[n].digest for n in names} == {want}
        assert {entries[n].xattrs for n in names} == {((b"user.k", name.encode()),)}
        assert {entries[n].layout for n in names} == {((0, len(data) + 4095 & ~4095),)
                                                        if holes else None}
    monkeypatch.undo()
    assert tree_sum(tree, holes=holes) == tree_sum(_copy(tree, tmp_path / "copy"), holes=holes)


def test_a_symlink_given_as_the_tree_is_followed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tree-sum LINK`` (and ``--compare``) sums the directory LINK points to, as ``du`` and
    ``find -H`` take their argument; the symlink inside the tree stays a symlink. Oracle: the
    sum of the directory itself, and ``find -H``'s count of its entries."""
    a = _make(tmp_path / "a")
    os.setxattr(a, "user.root", b"r")  # (the root's own: a symlink cannot hold user.*)
    os.utime(a, ns=(1, 1_500_000_000_123_456_789))
    link = tmp_path / "link"
    os.symlink("a", link)
    assert tree_sum(link) == tree_sum(a)
    assert main(["tree-sum", str(link)]) == 0
    assert capsys.readouterr().out == f"{tree_sum(a)}  {link}\n"
    assert main(["tree-sum", "--manifest", str(link)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(". d ")
    assert "xattr:user.root" in lines[0]
    assert any(x.startswith("l l ") for x in lines)  # the link inside: not followed
    found = subprocess.run(["find", "-H", str(link)], capture_output=True, check=True)
    assert len(lines) == len(found.stdout.splitlines())
    assert main(["tree-sum", str(link), "--compare", str(_copy(a, tmp_path / "b"))]) == 0
    assert main(["tree-sum", str(a), "--compare", str(link)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"trees are equal: {a} {link}"
    os.symlink("nowhere", tmp_path / "dangling")
    assert main(["tree-sum", str(tmp_path / "dangling")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'dangling'}: No such file or directory")
