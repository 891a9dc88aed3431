"""Property: random trees with random edits -> incremental stream -> kernel receive == NEW."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btrdelta.testing.scenarios import kernel_receive
from tests.send.conftest import Workspace, make_stream
from tests.send.test_scenarios import assert_same_tree, userspace_receive

NAMES = ["a", "b", "c", "d"]
BLOBS = [b"", b"x", b"hello\n" * 1000, bytes(range(256)) * 200, b"\x01" * 70000]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
contents = st.one_of(st.sampled_from(BLOBS), st.binary(max_size=9000))

initial = st.lists(
    st.tuples(st.sampled_from(["file", "dir", "symlink", "link"]), paths, contents),
    max_size=12,
)
edits = st.lists(
    st.one_of(
        st.tuples(st.just("mv"), paths, paths),
        st.tuples(st.just("rm"), paths),
        st.tuples(st.just("write"), paths, st.integers(0, 80000), st.binary(min_size=1,
                                                                            max_size=5000)),
        st.tuples(st.just("create"), paths, contents),
        st.tuples(st.just("mkdir"), paths),
        st.tuples(st.just("link"), paths, paths),
        st.tuples(st.just("chmod"), paths, st.sampled_from([0o600, 0o755, 0o4755, 0o700])),
        st.tuples(st.just("copy"), paths, paths),
        st.tuples(st.just("xattr"), paths, st.binary(max_size=20)),
        st.tuples(st.just("truncate"), paths, st.integers(0, 100000)),
        st.tuples(st.just("swap"), paths, paths),
        st.tuples(st.just("rebuild"), paths),
        st.tuples(st.just("type"), paths),
    ),
    max_size=12,
)


def _build(root: Path, spec: list[tuple[str, str, bytes]]) -> None:
    for kind, rel, data in spec:
        p = root / rel
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                p.write_bytes(data)
            elif kind == "dir":
                p.mkdir(parents=True)
            elif kind == "symlink":
                os.symlink(data[:50].replace(b"\0", b"_") or b"t", p)
            else:
                others = [q for q in root.rglob("*") if q.is_file() and not q.is_symlink()]
                if others:
                    os.link(others[len(data) % len(others)], p)
        except OSError:
            pass


def _edit(root: Path, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    for op in ops:
        kind, rel = op[0], op[1]
        p = root / rel
        try:
            if kind == "mv":
                dst = root / op[2]
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.rename(p, dst)
            elif kind == "rm":
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            elif kind == "write":
                with open(p, "r+b") as f:
                    f.seek(op[2])
                    f.write(op[3])
            elif kind == "create":
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(op[2])
            elif kind == "mkdir":
                p.mkdir(parents=True)
            elif kind == "link":
                dst = root / op[2]
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, dst, follow_symlinks=False)
            elif kind == "chmod":
                if not p.is_symlink():
                    os.chmod(p, op[2])
            elif kind == "copy":
                shutil.copyfile(p, root / op[2], follow_symlinks=False)
            elif kind == "xattr":
                os.setxattr(p, "user.k", op[2], follow_symlinks=False)
            elif kind == "truncate":
                os.truncate(p, op[2])
            elif kind == "swap":  # exchange two names (files or directories)
                tmp = root / ".swap"
                os.rename(p, tmp)
                try:
                    os.rename(root / op[2], p)
                except OSError:
                    os.rename(tmp, p)
                else:
                    os.rename(tmp, root / op[2])
            elif kind == "rebuild":  # same content, new inode (a rebuilt release)
                shutil.copy2(p, root / ".tmp", follow_symlinks=False)
                os.rename(root / ".tmp", p)
            elif kind == "type":  # file <-> directory at one name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                    p.write_bytes(b"was a dir")
                else:
                    p.unlink()
                    (p / "child").mkdir(parents=True)
        except OSError:
            pass


@pytest.mark.btrfs
@settings(max_examples=100, deadline=None)
@given(spec=initial, ops=edits, version=st.sampled_from([1, 2]))
def test_random_edits_roundtrip(btrfs_ws: Workspace, spec, ops, version) -> None:
    base = btrfs_ws.fresh("prop")
    old = base / "old"
    old.mkdir()
    _build(old, spec)
    subprocess.run(["cp", "-a", "--reflink=auto", str(old), str(base / "new")], check=True)
    new = base / "new"
    _edit(new, ops)
    full = make_stream(base / "full.s", old, version=version)
    incr = make_stream(base / "incr.s", new, old, version=version)
    dest = base / "recv"
    dest.mkdir()
    kernel_receive(full, dest)
    kernel_receive(incr, dest)
    assert_same_tree(new, dest / "new")
    plain = base / "plain"
    plain.mkdir()
    userspace_receive(full, plain)
    userspace_receive(incr, plain)
    assert_same_tree(new, plain / "new")

