"""Matching the inodes of an old and a new tree, and comparing file contents.

Strategy: the receiver starts from the old tree, so every new inode that can be *the same*
inode as an old one saves a create (and usually its data). :func:`match_trees` pairs them:

1. regular files at the same path whose content is equal (equal size and XXH3-128 digest
   from :func:`~btrdelta.send.scan.hash_contents`, or with ``quick=True`` trusted when size
   and mtime agree, as rsync does) -> unchanged;
2. the remaining files whose content equals an unmatched old file (same digest, confirmed
   byte by byte) -> moved/renamed, unless the old file's path still holds a regular file
   (then that one is changed in place and the copy becomes a clone from the parent);
3. the remaining files with an unmatched old regular file at one of their paths -> changed in
   place (the emitter then sends only the blocks that differ);
4. symlinks with the same path and target, then the same target elsewhere; device nodes,
   FIFOs and sockets with the same path, type and device number;
5. directories bottom-up by votes: each matched child votes for the old directory its old
   counterpart lived in (a same-named entry votes twice); without votes, the same path.

Whatever stays unmatched is created (new side) or deleted (old side). The contents of a
file and its old version are compared in :mod:`.compare`.
"""

from __future__ import annotations

import stat
from collections import defaultdict

from .._optional import need
from .._value import Value, field
from .scan import ROOT, Node, Tree

__all__ = ["Match", "match_trees"]


class Match(Value):
    """Pairs of old and new node ids that are the same inode."""

    n2o: dict[int, int] = field(default_factory=dict)
    o2n: dict[int, int] = field(default_factory=dict)
    #: new ids of regular files whose content equals their old counterpart
    unchanged: set[int] = field(default_factory=set)

    def pair(self, new_id: int, old_id: int) -> None:
        """Record that ``new_id`` is ``old_id``."""
        self.n2o[new_id] = old_id
        self.o2n[old_id] = new_id



def _is_reg_at(tree: Tree, path: bytes) -> bool:
    nid = tree.lookup(path)
    return nid is not None and tree.nodes[nid].is_reg


def _match_identities(old: Tree, new: Tree, m: Match) -> None:
    """Pair inodes with the same inode number (and btrfs generation, where known) and type:
    the same inode, renamed or not (``old`` is a record of an earlier state of ``new``).
    A symlink's target and a device's number never change: where they differ the number
    was reused (a directory elsewhere than btrfs has no generation for a symlink), and the
    inode is another one."""
    by_ino = {o.st_ino: o for o in old.nodes.values() if o.id != ROOT}
    for node in new.nodes.values():
        o = by_ino.get(node.st_ino)
        if o is None or node.id == ROOT or o.fmt != node.fmt or o.id in m.o2n or (
            o.generation and node.generation and o.generation != node.generation
        ) or o.target != node.target or o.rdev != node.rdev:
            continue
        m.pair(node.id, o.id)
        if node.is_reg and o.size == node.size and o.bdigest and o.bdigest == node.bdigest:
            m.unchanged.add(node.id)


class _Matcher:
    """One :func:`match_trees`: the trees, the pairs so far, old nodes by path."""

    def __init__(self, old: Tree, new: Tree, *, quick: bool, virtual: bool) -> None:
        self.old, self.new, self.quick, self.virtual = old, new, quick, virtual
        self.m = Match()
        self.m.pair(ROOT, ROOT)
        self.old_by_path = {old.path_of(p, name): o.id for o in old.nodes.values()
                            for p, name in o.dentries}
        self.old_by_path[b""] = ROOT
        self.regs = [n for n in new.nodes.values() if n.is_reg]

    def old_at(self, new_id: int) -> list[int]:
        """Unmatched old nodes at any path of new node ``new_id``."""
        node, o2n, by_path = self.new.nodes[new_id], self.m.o2n, self.old_by_path
        if len(node.dentries) == 1:
            oid = by_path.get(node.path)
            return [oid] if oid is not None and oid not in o2n else []
        found = [by_path.get(path) for path in self.new.paths(new_id)]
        return [oid for oid in found if oid is not None and oid not in o2n]

    def same_path_same_content(self) -> None:
        """Step 1."""
        m, onodes = self.m, self.old.nodes
        for node in self.regs:
            if node.id in m.n2o:
                continue
            for oid in self.old_at(node.id):
                o = onodes[oid]
                if not o.is_reg or o.size != node.size:
                    continue
                if (self.quick and o.mtime_ns == node.mtime_ns) or (
                    o.digest == node.digest and (not self.virtual or o.bdigest == node.bdigest)
                ):
                    m.pair(node.id, oid)
                    m.unchanged.add(node.id)
                    break

    def same_content_elsewhere(self) -> None:
        """Step 2 (moved / renamed). An old file that still has a regular file at one of its
        paths is left for step 3: changing it in place and cloning the copy from the parent
        beats resending that path."""
        m, old, new, onodes = self.m, self.old, self.new, self.old.nodes
        by_digest: dict[bytes, list[int]] = defaultdict(list)
        for o in onodes.values():
            if o.is_reg and o.id not in m.o2n and \
                    not any(_is_reg_at(new, p) for p in old.paths(o.id)):
                by_digest[o.digest].append(o.id)
        for node in self.regs:
            if node.id in m.n2o:
                continue
            cands = [c for c in by_digest.get(node.digest, ()) if c not in m.o2n]
            if not cands:
                continue
            names = {name for _p, name in node.dentries}
            cands.sort(key=lambda c: not any(n in names for _p, n in onodes[c].dentries))
            for c in cands:
                if self._equal(onodes[c], node):
                    m.pair(node.id, c)
                    m.unchanged.add(node.id)
                    break

    def _equal(self, o: Node, node: Node) -> bool:
        """XXH3 is not collision resistant: BLAKE3 (a record, or both files read while
        walking: :mod:`.changes`) or byte by byte."""
        if self.virtual or (o.bdigest and node.bdigest):
            return o.bdigest == node.bdigest and o.size == node.size
        from .compare import files_equal

        return files_equal(self.old.abspath(o.path), self.new.abspath(node.path), node.size)

    def same_path_changed(self) -> None:
        """Step 3."""
        m, onodes = self.m, self.old.nodes
        for node in self.regs:
            if node.id not in m.n2o:
                oid = next((o for o in self.old_at(node.id) if onodes[o].is_reg), None)
                if oid is not None:
                    m.pair(node.id, oid)

    def others(self) -> None:
        """Step 4: symlinks and special files."""
        m, onodes = self.m, self.old.nodes
        by_target: dict[bytes, list[int]] = defaultdict(list)
        for o in onodes.values():
            if o.fmt == stat.S_IFLNK:
                by_target[o.target].append(o.id)
        others = [n for n in self.new.nodes.values() if not n.is_reg and not n.is_dir]
        for node in others:
            if node.id in m.n2o:
                continue
            for oid in self.old_at(node.id):
                o = onodes[oid]
                if o.fmt == node.fmt and o.rdev == node.rdev and o.target == node.target:
                    m.pair(node.id, oid)
                    break
        for node in others:
            if node.id in m.n2o or node.fmt != stat.S_IFLNK:
                continue
            c = next((c for c in by_target.get(node.target, ()) if c not in m.o2n), None)
            if c is not None:
                m.pair(node.id, c)

    def directories(self, dropped: dict[int, tuple[int, int]]) -> None:
        """Step 5: directories, deepest first, by the votes of their matched children. A
        directory pair of reduced trees whose unchanged entries were left out (``dropped``:
        new directory -> (old directory at its path, how many)) is paired first: those
        entries stay in the old directory, so it must become the new one."""
        m, new, onodes = self.m, self.new, self.old.nodes
        for d, (od, _count) in dropped.items():
            if d not in m.n2o and od not in m.o2n:
                m.pair(d, od)
        order: list[int] = []
        stack = [ROOT]
        while stack:
            d = stack.pop()
            order.append(d)
            stack += [cid for cid in new.children[d].values() if new.nodes[cid].is_dir]
        for d in reversed(order):
            if d == ROOT or d in m.n2o:
                continue
            # a vote for each (name, old name) pair: 2 where the names are equal, else 1;
            # counted per matched inode, not per name (a file of N names in d: N, not N^2)
            names_of: dict[int, set[bytes]] = defaultdict(set)
            for name, cid in new.children[d].items():
                matched = m.n2o.get(cid)
                if matched is not None:
                    names_of[matched].add(name)
            votes: dict[int, int] = defaultdict(int)
            for matched, names in names_of.items():
                for op, oname in onodes[matched].dentries:
                    if op not in m.o2n:
                        votes[op] += len(names) + (oname in names)
            same_path = self.old_at(d)
            same = same_path[0] if same_path and onodes[same_path[0]].is_dir else None
            if votes:
                m.pair(d, max(votes, key=lambda o: (votes[o], o == same, -o)))
            elif same is not None:
                m.pair(d, same)


def match_trees(old: Tree, new: Tree, *, quick: bool = False, virtual: bool = False,
                identities: bool = False,
                dropped: dict[int, tuple[int, int]] | None = None) -> Match:
    """Pair the inodes of ``old`` and ``new`` (see the module docstring). With ``virtual``
    (``old`` is a sendshot record), content is compared by BLAKE3 digests instead of reading
    old files; with ``identities`` (the record is of an earlier state of the same
    filesystem tree) inodes are first paired by inode number and generation. ``dropped``:
    the trees are reduced (:class:`~.changes.Changes`), these entry pairs were left out."""
    if len(old.nodes) == 1 and not dropped:  # a full send: nothing but the roots to pair
        m = Match()
        m.pair(ROOT, ROOT)
        return m
    if not virtual:  # (not for a full send: importing pyfastcdc imports typing, ~3 %)
        need("pyfastcdc.cy", "make")  # for shifted_clones, later: fail before any record
    matcher = _Matcher(old, new, quick=quick, virtual=virtual)
    if identities:
        _match_identities(old, new, matcher.m)
    matcher.same_path_same_content()
    matcher.same_content_elsewhere()
    matcher.same_path_changed()
    matcher.others()
    matcher.directories(dropped or {})
    return matcher.m
