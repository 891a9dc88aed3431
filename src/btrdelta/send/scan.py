"""Scanning a directory tree into the inode/dentry model the sender works on.

:func:`~.walk.scan_tree` walks a tree (never following symlinks: ``lstat`` relative to an open
directory descriptor) and returns a :class:`Tree`: one :class:`Node` per inode (hard links
grouped by ``(st_dev, st_ino)``), each with its metadata, extended attributes
(``lgetxattr``), inode flags (directories: ``FS_IOC_GETFLAGS`` on the descriptor the scan
holds anyway) and dentries ``(parent node id, name)``. Entries on another device than the
root (mount points, nested btrfs subvolumes) are skipped, as ``btrfs send`` skips nested
subvolumes.

:func:`hash_contents` (:class:`ContentHasher`) then reads every regular file of one or more
trees exactly once, in a thread pool (``read`` releases the GIL; holes are hashed as zeros
without being read), and stores each file's content digest (XXH3-128:
as fast as the copy out of the page cache, where BLAKE3 would double the cost) and inode
flags. Same-path files with equal size and digest are "unchanged"; matches across paths
(renames, clones) are confirmed byte by byte before use (XXH3 is not collision resistant,
so content crafted to collide can at worst keep a same-path file's old content, never put
one file's bytes at another path). The digests also feed the tree *identity*
(:meth:`Tree.identity`): a BLAKE3 digest over every inode's dentries, metadata
(type, mode, owner, size, mtime, device numbers, symlink target, xattrs, flags, hard-link
group) and content digest, from which the subvolume UUID of a stream is derived — the same
tree always gets the same UUID, any change of content or metadata a different one (atime and
ctime are excluded: reading or copying a tree changes them).

:class:`TreeScan` runs the whole reading half of a send on two cores: the parent tree in a
:class:`~.walk.ForkedScan` child process, the new tree here. A full send on btrfs does not
wait for the walk: :class:`~.walk.ScanStream` walks the tree in a thread, in the order the
stream sends it, and publishes it directory by directory (the stream waits only for the
directory it is at). The walks are :mod:`.walk`'s, imported when a tree is walked (a send
from a sendshot record walks none).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import uuid
from collections.abc import Callable, Sequence

import blake3

from .. import TYPE_CHECKING
from .._optional import need
from .._value import Value, field
from ..errors import BtrdeltaError
from ..fs.content import NOT_COPIED_XATTRS
from .hashing import (
    ContentHasher,
    block_segments,
    open_file,
    open_to_read,
)
from .onepass import BLOCK

if TYPE_CHECKING:
    from .walk import ForkedScan, ScanStream

__all__ = ["BLOCK", "ROOT", "ContentHasher", "TreeScan", "Node", "Tree", "hash_contents",
           "inode_order", "kernel_rdev", "node_identity", "block_segments", "open_file",
           "open_to_read", "read_node", "uuid_of"]

#: node id of the tree's root directory
ROOT = 0

#: btrfs-style inode numbers start here (256 is a subvolume root)
_FIRST_INO = 257

_UUID_NAMESPACE = uuid.UUID("6b1d5c1e-2f3a-5b8e-9c4d-62747264656c")  # "btrdel" namespace




class Node(Value):
    """One inode of a scanned tree."""

    id: int
    #: synthetic inode number (the root is 256, others from 257 in scan order)
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    #: relative path of the first dentry (``b""`` for the root)
    path: bytes = b""
    #: device numbers in the kernel's "new" encoding (0 for non-devices)
    rdev: int = 0
    #: symlink target
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: (parent node id, name) for every hard link; the root has none
    dentries: list[tuple[int, bytes]] = field(default_factory=list)
    #: btrfs inode flags (FILEATTR encoding) mapped from ``FS_IOC_GETFLAGS``
    flags: int = 0
    #: XXH3-128 of the content (regular files, after :func:`hash_contents`)
    digest: bytes = b""
    #: the inode number on the filesystem read (identity for sendshot records)
    st_ino: int = 0
    #: btrfs: the inode's generation (creation transid) and transid (last change), when known
    generation: int = 0
    transid: int = 0
    #: record mode (see :class:`ContentHasher`): data ranges, seeded XXH3-128 of every 4 KiB
    #: block of them, BLAKE3-256 of the content
    segments: list[tuple[int, int]] | None = None
    blocks: bytes = b""
    bdigest: bytes = b""
    #: record mode on a read-only btrfs snapshot: the file extent items the content was
    #: read with (``btrdelta.fs.btrfs.EXTENT`` each; None: not known), see :mod:`.extents`
    extents: bytes | None = None
    #: a file hashed in parts (:mod:`.extents`): the ranges read, each within one data
    #: segment, in order; its other blocks are the record's at the same offsets. None:
    #: hashed whole
    read_ranges: list[tuple[int, int]] | None = None
    #: btrfs: the inode's sequence (i_version); all ones: not known (``NO_SEQUENCE``)
    sequence: int = 0xFFFF_FFFF_FFFF_FFFF

    @property
    def fmt(self) -> int:
        """``S_IFMT`` bits of the mode."""
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """True for regular files."""
        return stat.S_ISREG(self.mode)


class Tree(Value):
    """A scanned tree: nodes by id, directory entries, and the path of every dentry."""

    root: bytes
    nodes: dict[int, Node]
    #: directory node id -> {name: node id}
    children: dict[int, dict[bytes, int]]
    files: int = 0
    data_bytes: int = 0
    #: True once :func:`hash_contents` filled in the digests
    hashed: bool = False
    _identity: bytes | None = None
    #: a tree reduced to what changed (:mod:`.changes`): the whole tree's node count,
    #: ctransid, and the names in its root that look like orphan names
    whole: tuple[int, int, frozenset[bytes]] | None = None

    def path_of(self, parent: int, name: bytes) -> bytes:
        """Relative path of dentry ``name`` in directory ``parent``."""
        base = self.nodes[parent].path
        return base + b"/" + name if base else name

    def dir_path(self, nid: int) -> bytes:
        """Relative path of directory ``nid`` (``b""`` for the root)."""
        return self.nodes[nid].path

    def paths(self, nid: int) -> list[bytes]:
        """Every relative path of node ``nid``."""
        if nid == ROOT:
            return [b""]
        return [self.path_of(p, n) for p, n in self.nodes[nid].dentries]

    def abspath(self, rel: bytes) -> bytes:
        """Absolute path of relative path ``rel``."""
        return self.root + b"/" + rel if rel else self.root

    def lookup(self, rel: bytes) -> int | None:
        """Node id at relative path ``rel`` or ``None``."""
        nid = ROOT
        if not rel:
            return nid
        for part in rel.split(b"/"):
            kids = self.children.get(nid)
            if kids is None or part not in kids:
                return None
            nid = kids[part]
        return nid

    def identity(self) -> bytes:
        """32-byte digest of the tree's content and metadata (see the module docstring).

        Raises:
            BtrdeltaError: the tree's contents were not hashed yet.
        """
        if self._identity is None:
            if not self.hashed:
                raise BtrdeltaError("tree identity needs content digests (hash_contents)")
            parts = [node_identity(self.nodes[nid]) for nid in range(len(self.nodes))]
            self._identity = blake3.blake3(b"".join(parts)).digest()
        return self._identity

    def subvol_uuid(self) -> uuid.UUID:
        """Deterministic UUID of this tree (same tree, same UUID)."""
        return uuid_of(self.identity())

    def ctransid(self) -> int:
        """Deterministic ctransid: the newest mtime in the tree, in seconds (at least 1)."""
        if self.whole is not None:
            return self.whole[1]
        newest = max((n.mtime_ns for n in self.nodes.values()), default=0)
        return max(1, newest // 1_000_000_000)


_PACK_NODE = struct.Struct("<IIIQQQQII").pack  # mtime: its int64 ns, wrapped past 2262


def node_identity(node: Node) -> bytes:
    """What :meth:`Tree.identity` digests of one node (scan order, node ids as parents)."""
    parts = [struct.pack("<QI", parent, len(name)) + name for parent, name in node.dentries]
    parts.append(_PACK_NODE(node.mode, node.uid, node.gid, node.size if node.is_reg else 0,
                            node.mtime_ns & (1 << 64) - 1, node.rdev, node.flags,
                            len(node.dentries), len(node.target)))
    parts += (node.target, node.digest)
    for name in sorted(node.xattrs):
        value = node.xattrs[name]
        parts.append(struct.pack("<II", len(name), len(value)) + name + value)
    parts.append(b"\0")
    return b"".join(parts)


def uuid_of(identity: bytes) -> uuid.UUID:
    """The subvolume UUID of a tree of this :meth:`Tree.identity`."""
    return uuid.uuid5(_UUID_NAMESPACE, identity.hex())


def kernel_rdev(st_rdev: int) -> int:
    """Device number in the kernel's "new" encoding used by send streams."""
    major, minor = os.major(st_rdev), os.minor(st_rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _read_xattrs(path: bytes, names: list[str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for sname in (n for n in names if n not in NOT_COPIED_XATTRS):  # (XFS: ACLs again)
        name = sname.encode("utf-8", "surrogateescape")
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
    return out


def read_node(nid: int, st: os.stat_result, full: bytes, rel: bytes, dfd: int | None,
              name: bytes) -> Node:
    """Node ``nid`` for the entry ``name`` of directory ``dfd`` (``full``: its absolute path,
    ``rel``: its path in the tree) whose ``lstat`` is ``st``: its symlink target, device
    number and extended attributes read."""
    mode = st.st_mode
    node = Node(nid, 256 if nid == ROOT else _FIRST_INO + nid - 1, mode, st.st_uid,
                st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                rel, st_ino=st.st_ino)
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFLNK:
        node.target = os.readlink(name, dir_fd=dfd)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev = kernel_rdev(st.st_rdev)
    if fmt != stat.S_IFSOCK:
        try:
            has = os.listxattr(full, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            has = []
        if has:
            node.xattrs = _read_xattrs(full, has)
    return node


def inode_order(tree: Tree) -> list[int]:
    """The node ids of ``tree`` in the order the stream sends its inodes: top-down, each
    directory's entries by name (files, then the subdirectories, each one's subtree before
    the next one's), every inode once (at its first name), the root last."""
    order: list[int] = []
    stack = [ROOT]
    seen: set[int] = set()
    nodes, children = tree.nodes, tree.children
    while stack:
        d = stack.pop()
        subdirs = []
        for _name, cid in sorted(children[d].items()):
            if cid in seen:
                continue
            seen.add(cid)
            if nodes[cid].is_dir:
                subdirs.append(cid)
            else:
                order.append(cid)
        order.extend(subdirs)
        stack.extend(reversed(subdirs))
    order.append(ROOT)
    return order


def _whole_blocks(root: bytes) -> bool:
    """Whether the filesystem of ``root`` has holes of whole 4 KiB blocks only (its block
    size a multiple of 4 KiB: btrfs's sector, ext4's and XFS's usual block)."""
    try:
        size = os.statvfs(root).f_frsize
    except OSError:
        return False
    return size > 0 and size % BLOCK == 0


class TreeScan:
    """The reading half of a send: scan both trees and hash their contents, on two cores.

    The parent tree (if any) goes to a :class:`~.walk.ForkedScan` child process (when there is more
    than one CPU, ``workers`` is not 1 and no other thread runs: forking a threaded process
    is unsafe); this process scans the new tree and queues its files on a
    :class:`ContentHasher`. The constructor returns once the new tree is scanned, so the
    caller can do other work (such as importing the stream encoder) while both trees are
    still being hashed; :meth:`old_tree` and :attr:`hasher` finish the job.

    Args:
        new_dir: the tree to send.
        parent_dir: the tree the receiver has (``None``: full send).
        workers: hashing threads (see :class:`ContentHasher`); 1 also disables the child.
        on_entry: progress of the new tree's scan (see :func:`~.walk.scan_tree`).
        seed: record mode (see :class:`ContentHasher`; and ``content3``, its digests).
        prepare: called with the new tree once scanned, before its files are queued (fills
            in what a record already knows, so those files are not read).
        new_tree: the new tree, already scanned (:mod:`~.rescan`): ``new_dir`` is not walked;
            only its files without ``segments`` are read.
        later: record mode, called with the new tree once scanned: the node ids of files
            not to hash here (the send reads them whole and hashes them: :class:`BlockHasher`).
        extents: record mode, ``new_dir`` is a read-only btrfs snapshot: record the extent
            items of its files (see :class:`ContentHasher`).
        order: called with the new tree once scanned: its node ids in the order a full send
            emits them (kept as :attr:`order`); its files are then hashed in that order and
            the send waits for each one (:meth:`ContentHasher.ready`), not for all.
        stream: a full send streamed while the tree is scanned: the new tree is a
            :class:`~.walk.ScanStream`'s (this one, or, with True, one started here; kept as
            :attr:`stream`), its files queued for hashing as the walk finds them, in the
            order sent (as with ``order``); the constructor does not wait for the walk.
        hash_as_sent: with ``stream``, called with each regular file as it is found (in
            the order sent): True for a file not to hash here (as ``later``).
        keep: as :meth:`ContentHasher.submit`'s (record mode, without ``stream``).

    Raises:
        BtrdeltaError: the new tree cannot be scanned.
    """

    def __init__(
        self,
        new_dir: str | bytes | os.PathLike[str],
        parent_dir: str | bytes | os.PathLike[str] | None = None,
        *,
        workers: int | None = None,
        on_entry: Callable[[int, int], None] | None = None,
        seed: int | None = None,
        prepare: Callable[[Tree], None] | None = None,
        new_tree: Tree | None = None,
        later: Callable[[Tree], set[int]] | None = None,
        extents: bool = False,
        order: Callable[[Tree], list[int]] | None = None,
        stream: ScanStream | bool = False,
        hash_as_sent: Callable[[Node], bool] | None = None,
        keep: bool | Callable[[Node], bool] = True, content3: bool = True,
    ) -> None:
        need("xxhash", "make")  # before any thread starts: a missing extra is one line
        self.parent_dir = os.fsencode(parent_dir) if parent_dir is not None else None
        self._forked: ForkedScan | None = None
        if (
            self.parent_dir is not None
            and (workers or os.cpu_count() or 1) > 1
            and threading.active_count() == 1
        ):
            from .walk import ForkedScan

            self._forked = ForkedScan(self.parent_dir)
        self.hasher = ContentHasher(workers, seed, extents, content3)
        self._old: Tree | None = None
        #: the new tree's node ids in the order they are emitted (``order``), else None
        self.order: list[int] | None = None
        #: the walk of the new tree, while a full send streams (``stream``), else None
        self.stream: ScanStream | None = None
        if stream is not False:
            from .walk import ScanStream

            try:
                self.stream = stream if isinstance(stream, ScanStream) else ScanStream(new_dir)
            except BaseException:
                self.close()
                raise
            self.new = self.stream.tree
            self.hasher.whole_blocks = _whole_blocks(self.new.root)
            self.hasher.stream(self.new)
            hasher, skip = self.hasher, hash_as_sent
            self.stream.attach(hasher.add if skip is None else
                               lambda files: hasher.add([n for n in files if not skip(n)]))
            return
        try:
            if not new_tree:  # (a send from a record gives the tree: it walks none)
                from .walk import scan_tree

                new_tree = scan_tree(new_dir, on_entry=on_entry)
            self.new = new_tree
            if prepare is not None:
                prepare(self.new)
            self.hasher.whole_blocks = _whole_blocks(self.new.root)
            self.order = order(self.new) if order is not None else None
            self.hasher.submit(self.new, later(self.new) if later is not None else set(),
                               keep=keep, order=self.order)
        except BaseException:
            self.close()
            raise

    def old_tree(self, on_entry: Callable[[int, int], None] | None = None) -> Tree | None:
        """The parent tree (waits for the child, or scans it here); ``None`` for a full send.

        Raises:
            BtrdeltaError: the parent tree cannot be scanned.
        """
        if self._old is None and self.parent_dir is not None:
            try:
                old = self._forked.result() if self._forked is not None else None
                self._forked = None
                if old is not None:
                    self._old = old
                    if on_entry is not None:
                        on_entry(old.files, old.data_bytes)
                else:  # no child, or it died (a signal): scan the parent here
                    from .walk import scan_tree

                    self._old = scan_tree(self.parent_dir, on_entry=on_entry)
                    self.hasher.submit(self._old)
            except BaseException:
                self.close()
                raise
        return self._old

    def close(self) -> None:
        """Stop the walk, the child and the hashing threads (after an error)."""
        if self.stream is not None:
            self.stream.close()
        self.hasher.close()
        if self._forked is not None:
            self._forked.close()
            self._forked = None


def hash_contents(
    trees: Sequence[Tree],
    *,
    workers: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Read every regular file of ``trees`` once and fill in ``digest`` and ``flags``.

    Args:
        trees: trees from :func:`~.walk.scan_tree` (already hashed ones are skipped).
        workers: thread count (see :class:`ContentHasher`).
        on_bytes: called in the calling thread with the total bytes hashed so far.

    Returns:
        The number of bytes read.

    Raises:
        BtrdeltaError: a file cannot be read or changed size since the scan.
    """
    hasher = ContentHasher(workers)
    for tree in trees:
        hasher.submit(tree)
    return hasher.wait(on_bytes)


