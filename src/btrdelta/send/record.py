"""Between sendshot records and the sender's tree model.

* :func:`tree_from_record`: the old side of an incremental send when the old tree is gone
  (and the new one is scanned whole): a :class:`~.scan.Tree` whose nodes (:func:`node_of`)
  carry the record's metadata, digests and block digests and no files (``Tree.root`` is
  empty: nothing may read it).
* :func:`record_inodes` (:func:`record_inode`): the inodes of a scanned and hashed tree, as
  a record stores them.
* :func:`stamp_generations`: every inode's btrfs generation and transid, for the record (the
  next send visits only what changed since: :mod:`~.rescan`).
* :func:`block_diff`: which blocks of a file changed against its old version's digests, and
  which of those are found elsewhere in old files (``CLONE`` instead of ``WRITE``).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator

from ..errors import StreamFormatError
from ..fs.btrfs import changed_inodes
from ..tree.sendshot import RecordInode, SendshotHead
from .extents import bounded, first_blocks, from_sweep
from .scan import BLOCK, ROOT, Node, Tree

__all__ = ["INDEX_MAX", "BlockIndex", "Diff", "block_diff", "node_of", "record_inode",
           "record_inodes", "stamp_generations", "tree_from_record"]

_D = 16  # bytes per block digest

#: :func:`block_diff`'s result: ranges to write, ranges to clone from old files, holes
Diff = tuple[list[tuple[int, int]], list[tuple[int, int, Node, int]], list[tuple[int, int]]]


def node_of(rec: RecordInode, nid: int) -> Node:
    """Node ``nid`` of a tree for the record's inode ``rec`` (no names yet)."""
    return Node(nid, 256 if nid == ROOT else 257 + nid - 1, rec.mode, rec.uid, rec.gid,
                rec.size, rec.atime_ns, rec.mtime_ns, rec.ctime_ns, b"", rec.rdev,
                rec.target, rec.xattrs or {}, [], rec.flags, rec.digest, rec.ino,
                rec.generation, rec.transid, rec.segments, rec.blocks, rec.bdigest,
                rec.extents, sequence=rec.sequence)


def tree_from_record(inodes: Iterable[RecordInode], head: SendshotHead,
                     source: str | None = None) -> Tree:
    """The tree a record describes (node ids in record order, the root first).

    Raises:
        StreamFormatError: the record's names do not form a tree (an unknown parent, a
            parent that is not a directory, a name used twice).
    """
    nodes: dict[int, Node] = {}
    by_ino: dict[int, int] = {}
    names: list[list[tuple[int, bytes]]] = []
    for rec in inodes:
        nid = len(nodes)
        if rec.ino in by_ino:
            raise StreamFormatError(f"inode {rec.ino} appears twice", source=source)
        by_ino[rec.ino] = nid
        nodes[nid] = node_of(rec, nid)
        names.append(rec.dentries)
    if not nodes or names[0] or not nodes[ROOT].is_dir:
        raise StreamFormatError("the first inode must be the root directory", source=source)
    children: dict[int, dict[bytes, int]] = {n.id: {} for n in nodes.values() if n.is_dir}
    tree = Tree(b"", nodes, children)
    # names last: a hard link's other names may be in directories recorded after it
    for nid in range(1, len(nodes)):
        node = nodes[nid]
        if not names[nid]:
            raise StreamFormatError(f"inode {node.st_ino} has no name", source=source)
        for parent_ino, name in names[nid]:
            pid = by_ino.get(parent_ino)
            if pid is None or pid not in children or not name or b"/" in name \
                    or name in (b".", b"..") or name in children[pid]:
                raise StreamFormatError(f"inode {node.st_ino}: bad name {name!r} in "
                                        f"{parent_ino}", source=source)
            children[pid][name] = nid
            node.dentries.append((pid, name))
        if node.is_reg:
            tree.files += 1
            tree.data_bytes += node.size
    _set_paths(tree)
    tree.hashed = True
    tree._identity = head.tree_digest or None
    return tree


def _set_paths(tree: Tree) -> None:
    """Each node's path: its first name, under its parent's path (parents first)."""
    done = {ROOT}
    nodes = tree.nodes
    for nid in range(1, len(nodes)):
        chain = []
        cur = nid
        while cur not in done:
            chain.append(cur)
            cur = nodes[cur].dentries[0][0]
            if len(chain) > len(nodes):
                raise StreamFormatError("the record's directories form a cycle")
        for c in reversed(chain):
            parent, name = nodes[c].dentries[0]
            nodes[c].path = tree.path_of(parent, name)
            done.add(c)


def record_inode(n: Node, dentries: list[tuple[int, bytes]], extent_max: int | None = None
                 ) -> RecordInode:
    """Node ``n`` (hashed in record mode) as a record stores it, named by ``dentries``
    (directory inode number, name); a file's extent items over ``extent_max`` bytes as cells
    (:func:`~.extents.bounded`)."""
    if n.is_reg:
        return RecordInode(n.st_ino, n.mode, n.uid, n.gid, n.size, n.atime_ns, n.mtime_ns,
                           n.ctime_ns, dentries, n.generation, n.transid, n.rdev, n.flags,
                           n.target, n.xattrs or None, n.segments, n.digest, n.bdigest,
                           n.blocks, bounded(n.extents, n.size, extent_max), n.sequence)
    return RecordInode(n.st_ino, n.mode, n.uid, n.gid, 0, n.atime_ns, n.mtime_ns,
                       n.ctime_ns, dentries, n.generation, n.transid, n.rdev, n.flags,
                       n.target, n.xattrs or None, sequence=n.sequence)


def record_inodes(tree: Tree, extent_max: int | None = None) -> Iterator[RecordInode]:
    """The inodes of ``tree`` (scanned and hashed in record mode) as a record stores them
    (``extent_max``: as :func:`record_inode`)."""
    nodes = tree.nodes
    for nid in range(len(nodes)):
        n = nodes[nid]
        yield record_inode(n, [(nodes[p].st_ino, name) for p, name in n.dentries], extent_max)


def stamp_generations(tree: Tree, snapshot_fd: int, extents: bool = False) -> None:
    """Give every inode of ``tree`` its btrfs generation, transid and sequence (a full
    sweep).
    ``extents`` (a tree hashed from the read-only snapshot, its files' flags known): also the
    extent items of its files below :data:`~.extents.SEARCH_MIN` that have none yet, from
    the same sweep (:func:`~.extents.from_sweep`)."""
    items: dict[int, list[bytes | None]] | None = {} if extents else None
    found = changed_inodes(snapshot_fd, 0, items)
    for node in tree.nodes.values():
        got = found.get(node.st_ino)
        if got is not None:
            node.generation, node.transid, node.sequence = got
        if items is not None and node.is_reg and node.extents is None and \
                node.segments is not None:
            node.extents = from_sweep(items.get(node.st_ino), node.size, node.flags)


#: the most block digests a :class:`BlockIndex` holds: 1 GiB of old files' blocks (~170
#: bytes a digest in its dict, ~45 MB)
INDEX_MAX = 1 << 18


class BlockIndex:
    """Where each block digest of some old files is: ``digest -> (old node, offset)``; of
    at most ``most`` digests (:data:`INDEX_MAX`), a file's all or none: a changed VM image
    of 4 GiB (1 M blocks, ~170 MB in the dict) is left out; its blocks found nowhere else
    are sent as data, as the kernel's ``send -p`` sends what was written."""

    # The dict is built only when lookups pay for it: until then a lookup searches the
    # added files' digests (bytes.find, a C scan of 16 bytes a block), so a round that
    # changed a few blocks of a 640 MiB file looks them up in ~0.5 ms each instead of
    # indexing its 160,000 old blocks (~40-200 ms). The answer is the same either way: the
    # first file added that holds the digest, at its first whole block holding it.

    def __init__(self, most: int | None = None) -> None:
        self._where: dict[bytes, tuple[Node, int]] = {}
        self._done: set[int] = set()
        self._pending: list[Node] = []  # added, not yet in the dict (in the order added)
        self._pending_cost = 0  # of a lookup's scan: the pending digests' bytes and files
        self._scan_left = 0  # what lookups may still scan before the dict is built
        #: digests that may still be added
        self.room = INDEX_MAX if most is None else most

    def add_all(self, nodes: Iterable[Node]) -> None:
        """:meth:`add` each of ``nodes``, the smallest first (the most files in the room)."""
        for node in sorted(nodes, key=lambda n: n.size):
            self.add(node)

    def add(self, node: Node) -> None:
        """Index the blocks of old file ``node`` (once), if they fit in the room left."""
        if node.id in self._done or not _has_blocks(node):
            return
        self._done.add(node.id)
        count = len(node.blocks) // _D
        if count > self.room:
            return
        self.room -= count
        self._pending.append(node)
        self._pending_cost += len(node.blocks) + _FILE_COST
        self._scan_left += _SCANS * len(node.blocks)

    def get(self, digest: bytes) -> tuple[Node, int] | None:
        """The old file and offset of a block with ``digest``."""
        if self._pending:
            if self._scan_left < self._pending_cost:
                self._build()
            else:
                self._scan_left -= self._pending_cost
                return self._where.get(digest) or self._scan(digest)
        return self._where.get(digest)

    def _scan(self, digest: bytes) -> tuple[Node, int] | None:
        # the first whole block holding digest in the files not yet in the dict
        for node in self._pending:
            blocks, i = node.blocks, node.blocks.find(digest)
            while i >= 0:
                if i % _D == 0:
                    pos = _block_offset(node, i // _D)
                    if pos + BLOCK <= node.size:
                        return node, pos
                i = blocks.find(digest, i + 1)
        return None

    def _build(self) -> None:
        where = self._where
        for node in self._pending:
            i = 0
            blocks = node.blocks
            for off, length in node.segments or ():
                for pos in range(off, off + length, BLOCK):
                    if pos + BLOCK <= node.size:  # only whole blocks can be cloned anywhere
                        where.setdefault(blocks[i:i + _D], (node, pos))
                    i += _D
        self._pending.clear()
        self._pending_cost = 0


#: lookups scan at most this many times the pending digests before the dict is built (a
#: scan costs ~2 ns a digest, a dict entry ~1 us: the dict pays off after ~500), a file
#: counted as this many bytes more (the loop's step for it, ~150 ns)
_SCANS = 32
_FILE_COST = 1024


def _block_offset(node: Node, k: int) -> int:
    # the file offset of node's k-th block digest
    starts, _ends, first = first_blocks(node.segments or [])
    s = bisect_right(first, k) - 1
    return starts[s] + (k - first[s]) * BLOCK


def _has_blocks(node: Node) -> bool:
    """Whether ``node`` has the digest of every block of its data (a record holds none for
    files smaller than a block: their content digests say it all)."""
    return node.segments is not None and \
        len(node.blocks) == _D * sum(-(-n // BLOCK) for _o, n in node.segments)


def block_diff(
    node: Node, onode: Node | None, index: BlockIndex | None, *, min_len: int = BLOCK,
) -> Diff:
    """How to turn ``onode`` (old version, from a record, or None for a new file) into
    ``node`` (hashed in record mode) without the old data.

    Only the blocks a file hashed in parts read (``node.read_ranges``, :mod:`.extents`) are
    compared: its other blocks carry ``onode``'s digests at the same offsets.

    Returns:
        ``(writes, clones, holes)``: ranges of ``node`` to send as data; ranges
        ``(offset, length, old node, old offset)`` found in old files (block aligned, at least
        ``min_len``) to clone from the parent; ranges that are holes in ``node`` but data in
        ``onode`` (to punch). Blocks equal to ``onode``'s at the same offset are in none.
    """
    known = _has_blocks(node)  # else every block is sent
    old_known = onode is not None and _has_blocks(onode)
    segments = node.segments or []
    ranges = node.read_ranges if node.read_ranges is not None and known and old_known \
        else segments
    ostarts, oends, ofirst = first_blocks(onode.segments or []) \
        if onode is not None and old_known else ([], [], [])
    oblocks, osize = (onode.blocks, onode.size) if onode is not None else (b"", 0)
    nstarts, _nends, nfirst = first_blocks(segments)
    blocks, size = node.blocks, node.size
    writes: list[tuple[int, int]] = []
    clones: list[tuple[int, int, Node, int]] = []
    j = 0  # the old segment at or after the block (blocks come in order)
    for a, length in ranges:
        k = bisect_right(nstarts, a) - 1
        i = _D * (nfirst[k] + (a - nstarts[k]) // BLOCK) if k >= 0 else 0
        for pos in range(a, a + length, BLOCK):
            d = blocks[i:i + _D] if known else b""
            i += _D
            n = min(BLOCK, size - pos)
            while j < len(oends) and oends[j] <= pos:
                j += 1
            if j < len(ostarts) and ostarts[j] <= pos and pos + n <= osize:
                o = _D * (ofirst[j] + (pos - ostarts[j]) // BLOCK)
                if oblocks[o:o + _D] == d:
                    continue
            src = index.get(d) if index is not None and n == BLOCK and known else None
            if src is not None:
                src_node, src_off = src
                if clones and clones[-1][0] + clones[-1][1] == pos and clones[-1][2] is \
                        src_node and clones[-1][3] + clones[-1][1] == src_off:
                    c = clones[-1]
                    clones[-1] = (c[0], c[1] + n, c[2], c[3])
                else:
                    clones.append((pos, n, src_node, src_off))
                continue
            if writes and writes[-1][0] + writes[-1][1] == pos:
                writes[-1] = (writes[-1][0], writes[-1][1] + n)
            else:
                writes.append((pos, n))
    # clones shorter than min_len are sent as data
    if min_len > BLOCK:
        keep = []
        for c in clones:
            if c[1] >= min_len:
                keep.append(c)
            else:
                writes.append((c[0], c[1]))
        clones = keep
        writes = _merge(sorted(writes))
    return writes, clones, _holes(node, onode) if onode is not None else []


def _holes(node: Node, onode: Node) -> list[tuple[int, int]]:
    """Ranges that are holes in ``node`` but data in ``onode`` (below both sizes)."""
    holes: list[tuple[int, int]] = []
    limit = min(onode.size, node.size)
    new_data = node.segments or []
    for off, length in onode.segments or ():
        a, b = off, min(off + length, limit)
        pos = a
        for s_off, s_len in new_data:
            if s_off + s_len <= pos:
                continue
            if s_off >= b:
                break
            if s_off > pos:
                holes.append((pos, s_off - pos))
            pos = max(pos, s_off + s_len)
        if pos < b:
            holes.append((pos, b - pos))
    return holes


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def same_lineage(head: SendshotHead, lineage: object) -> bool:
    """Whether a record was made from a snapshot of the subvolume ``lineage`` names."""
    return head.subvol_uuid is not None and head.subvol_uuid == lineage


def path_of(source: bytes) -> str:
    """``source`` for messages."""
    return os.fsdecode(source)
