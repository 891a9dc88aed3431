"""Finding what a new file of a send can be cloned from (:class:`~.emit.Sender`'s part).

A new file whose whole content is found elsewhere becomes one ``CLONE``: a file of the
parent (by content digest: BLAKE3 for a record, else confirmed byte by byte), of a clone
source (``send -c``), or a file sent earlier in the same stream. A new file that is not
a copy may still share pieces with an old file of the same name (a file that moved and
changed, or a copy that grew): :meth:`CloneFinder._similar_old_file` picks it.
"""

from __future__ import annotations

import stat

from .. import TYPE_CHECKING
from ..stream.records import Clone
from .scan import Node, Tree

if TYPE_CHECKING:
    from uuid import UUID

    from .changes import Changes, SourceIndex

__all__ = ["CLONE_MAX", "CloneFinder"]

#: the longest ``CLONE`` a stream of ours holds (4 GiB less a block; :mod:`.clonecut`)
CLONE_MAX = (1 << 32) - (1 << 12)


class CloneFinder:
    """The clone search of a :class:`~.emit.Sender` (which sets these attributes)."""

    new: Tree
    old: Tree | None
    changes: Changes | None
    sources: list[SourceIndex]
    virtual: bool
    clone_min: int
    shift_min: int
    _old_digests: dict[bytes, int]
    _old_by_name: dict[bytes, list[Node]] | None

    if TYPE_CHECKING:
        def new_ids(self) -> tuple[UUID, int]: ...

        def parent_ids(self) -> tuple[UUID, int]: ...

    def _find_clone(self, node: Node, new_by_digest: dict[bytes, int]) -> Clone | None:
        """A ``CLONE`` of all of ``node`` from a file with its content: of the parent, of a
        clone source, or one sent already (``new_by_digest``)."""
        if node.size < self.clone_min:
            return None
        from .compare import files_equal  # (a record's round compares digests: not at import)

        new_abs = self.new.abspath(node.path)
        onode = self._old_file(node.digest)
        if onode is not None and self._same_as_old(onode, node):
            clone_uuid, clone_ctransid = self.parent_ids()
            return _whole_clone(node, clone_uuid, clone_ctransid, onode.path)
        for src in self.sources:
            if src.uuid == self.new_ids()[0]:
                # a copy of the new tree (the UUID is the content's): the receiver takes a
                # clone from that UUID for one from the subvolume it is receiving
                continue
            found = src.by_digest.get(node.digest)
            if found is not None and found[1] == node.size and files_equal(
                src.abspath(found[0]), new_abs, node.size
            ):
                return _whole_clone(node, src.uuid, src.ctransid, found[0])
        nid = new_by_digest.get(node.digest)
        if nid is not None and files_equal(
            self.new.abspath(self.new.nodes[nid].path), new_abs, node.size
        ):
            uuid, ctransid = self.new_ids()
            return _whole_clone(node, uuid, ctransid, self.new.nodes[nid].path)
        return None

    def _old_file(self, digest: bytes) -> Node | None:
        """The first old file of at least ``clone_min`` bytes with this content digest."""
        if self.changes is not None:
            got = self.changes.by_digest.get(digest)
            if got is None or got[1] < self.clone_min:
                return None
            kept = self.old.nodes.get(got[2]) if self.old is not None else None
            return kept if kept is not None else _stub(got)  # kept: read while walking
        oid = self._old_digests.get(digest)
        return None if oid is None or self.old is None else self.old.nodes[oid]

    def _same_as_old(self, onode: Node, node: Node) -> bool:
        """Whether new file ``node`` has the content of old file ``onode`` (BLAKE3 digests
        for a record, else byte by byte)."""
        if self.virtual:
            return bool(onode.bdigest) and onode.bdigest == node.bdigest \
                and onode.size == node.size
        assert self.old is not None
        if onode.bdigest and node.bdigest:  # both read while walking (.changes)
            return onode.bdigest == node.bdigest and onode.size == node.size
        from .compare import files_equal

        return files_equal(self.old.abspath(onode.path), self.new.abspath(node.path),
                           node.size)

    def _shifted_clones(self, old_path: bytes, new_path: bytes, old_size: int, new_size: int,
                        writes: list[tuple[int, int]]
                        ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """:func:`.compare.shifted_clones` of at least ``shift_min`` bytes (imported for a
        file with an old version on disk: a record's round compares digests)."""
        from .compare import shifted_clones

        return shifted_clones(old_path, new_path, old_size, new_size, writes,
                              min_len=self.shift_min)

    def _similar_old_file(self, node: Node) -> Node | None:
        """An old file to look for pieces of a new file in: one with the same name (a file
        that moved and changed, or a copy that grew), the closest in size."""
        if self.old is None or not self.shift_min or node.size < self.shift_min:
            return None
        if self.changes is not None:
            found = [f for _p, name in node.dentries
                     for f in self.changes.by_name.get(name, ()) if f[1] >= self.shift_min]
            if not found:
                return None
            return _stub(min(found, key=lambda f: (abs(f[1] - node.size), f[2])))
        if self._old_by_name is None:
            self._old_by_name = {}
            for o in self.old.nodes.values():
                if o.is_reg and o.size >= self.shift_min:
                    for _p, name in o.dentries:
                        self._old_by_name.setdefault(name, []).append(o)
        cands = {o.id: o for _p, name in node.dentries for o in self._old_by_name.get(name, ())}
        if not cands:
            return None
        return min(cands.values(), key=lambda o: (abs(o.size - node.size), o.id))


def _whole_clone(node: Node, uuid: UUID, ctransid: int, path: bytes) -> Clone:
    """The ``CLONE`` of all of ``node``'s content from the file at ``path`` of ``uuid``."""
    return Clone(offset=0, length=node.size, path=node.path, clone_uuid=uuid,
                 clone_ctransid=ctransid, clone_path=path, clone_offset=0)


def _stub(found: tuple[bytes, int, int]) -> Node:
    """A parent file left out of a reduced tree (:class:`~.changes.Changes`): its path,
    size and node id, as a node to clone from."""
    path, size, nid = found
    return Node(nid, 256 + nid, stat.S_IFREG | 0o644, 0, 0, size, 0, 0, 0, path)
