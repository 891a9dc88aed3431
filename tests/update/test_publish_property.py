"""`repo add` of a tree with a btrfs property (``btrfs property set F compression zstd``)
into a repository on ext4: the receive cannot keep the property's ``btrfs.compression``
extended attribute, so the tree does not survive the round trip. The error (exit 5, one
line) said only the differing attribute in hex; it names the path and the property and
says how to proceed, alone (receive's "not supported here; skipped" warning came first), and
following it (a shell command, the path quoted) makes the add
pass (oracle: tree-sum of the tree is the identity the repository reports)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from btrdelta.testing.loopfs import loop_fs
from btrdelta.tree import tree_sum


@pytest.mark.btrfs
def test_a_btrfs_property_the_repository_cannot_keep_is_named_with_the_way_out() -> None:
    from tests.conftest import btrfs_loop

    with btrfs_loop("200M") as fs, loop_fs("ext4", size="64M") as ext4:
        tree = fs / "a tree"  # (a space: the way out is one shell command still)
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "f").write_bytes(b"x" * 10000)
        (tree / "g").write_bytes(b"y" * 100)
        for path, algo in ((tree / "d", "lzo"), (tree / "d" / "f", "zstd")):
            subprocess.run(["btrfs", "property", "set", str(path), "compression", algo],
                           check=True)
        repo = ext4 / "repo"
        btrdelta = [sys.executable, "-m", "btrdelta"]
        subprocess.run([*btrdelta, "repo", "init", str(repo)], check=True)
        add = [*btrdelta, "repo", "add", "--json", str(repo), "1", str(tree)]
        for first, algo, more in (("d", "lzo", " (and 1 more path(s))"), ("d/f", "zstd", "")):
            run = subprocess.run(add, capture_output=True, text=True, check=False)
            assert run.returncode == 5, run.stderr
            last, = run.stderr.splitlines()  # (not receive's warning that it skipped it)
            assert last == (
                f"btrdelta repo add: error: path '{tree}': the release tree does not survive "
                f"a send stream round trip: '{first}' has the btrfs property compression="
                f"{algo}{more}, which the repository's filesystem (not btrfs) cannot keep: "
                f"clear it (btrfs property set {shlex.quote(str(tree / first))} compression '') "
                "or keep the "
                "repository on btrfs"), run.stderr
            way_out = re.search(r"clear it \((btrfs property set .*)\) or keep", last)
            assert way_out is not None
            subprocess.run(shlex.split(way_out.group(1)), check=True)
        run = subprocess.run(add, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["identity"] == tree_sum(tree)
