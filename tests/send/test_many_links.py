"""One inode with 65,000 names in one directory (btrfs allows 65,535 links): an incremental
send that removes half of them and adds others.

Placing each new name scanned every name of the inode (making the set of its final names
again, then looking for one to move away), and matching the directory counted a vote for
every pair of its names: time grew with the square of the names. Found on btrfs with
65,000 links (session 18): ``send -p`` was still running after 20 minutes, where the
kernel's ``btrfs send -p`` takes 2.5 s; 12,000 names took ours 40 s (load ~10), 65,000 now
8 s. The pairing and the namespace records are computed here on the trees as the scan
gives them (no filesystem): 6,000 names took 13 s before, 65,000 names would take ~25
minutes (the suite's timeout stops it), now ~2 s. Kernel-made scenarios with hundreds and
thousands of links of one inode (many-links-272, link-existing-path-extrefs-272) check the
records against ``btrfs receive`` through every engine.
"""

from __future__ import annotations

import stat

from btrdelta.send.diff import match_trees
from btrdelta.send.order import order_namespace
from btrdelta.send.scan import ROOT, Node, Tree
from btrdelta.stream.records import Rename, Unlink

NAMES = 65_000


def _tree(names: list[bytes]) -> Tree:
    """A root, a directory ``d``, one file of ``names`` in it (content by digest)."""

    def node(nid: int, mode: int, dentries: list[tuple[int, bytes]], path: bytes) -> Node:
        return Node(id=nid, ino=256 + nid, mode=mode, uid=0, gid=0, size=0, atime_ns=0,
                    mtime_ns=0, ctime_ns=0, dentries=dentries, path=path, digest=bytes(32))

    nodes = {ROOT: node(ROOT, stat.S_IFDIR | 0o755, [], b""),
             1: node(1, stat.S_IFDIR | 0o755, [(ROOT, b"d")], b"d"),
             2: node(2, stat.S_IFREG | 0o644, [(1, n) for n in names], b"d/" + names[0])}
    return Tree(root=b"/nonexistent", nodes=nodes,
                children={ROOT: {b"d": 1}, 1: dict.fromkeys(names, 2)})


def test_half_the_names_of_a_65000_name_inode_replaced() -> None:
    old_names = [b"f"] + [b"l%d" % i for i in range(1, NAMES)]
    new_names = ([b"f"] + [b"l%d" % i for i in range(2, NAMES, 2)]
                 + [b"m%d" % i for i in range(1, NAMES // 3, 2)])
    old, new = _tree(old_names), _tree(new_names)
    match = match_trees(old, new, virtual=True)
    assert match.n2o == {ROOT: ROOT, 1: 1, 2: 2}
    records, ns = order_namespace(old, new, match)
    # an old name moved to each new one (the link count never grows), the rest unlinked
    added, gone = set(new_names) - set(old_names), set(old_names) - set(new_names)
    renamed = [r for r in records if isinstance(r, Rename)]
    unlinked = [r for r in records if isinstance(r, Unlink)]
    assert len(records) == len(renamed) + len(unlinked)
    assert {r.path_to for r in renamed} == {b"d/" + n for n in added}
    assert ({r.path for r in renamed} | {r.path for r in unlinked}
            == {b"d/" + n for n in gone})
    assert set(ns.children[1]) == set(new_names)
    assert sorted(ns.dentries[2]) == sorted((1, n) for n in new_names)
