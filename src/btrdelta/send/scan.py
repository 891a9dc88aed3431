"""Scanning a directory tree into the inode/dentry model the sender works on.

:func:`scan_tree` walks a tree with ``os.scandir``/``lstat`` (never following symlinks) and
returns a :class:`Tree`: one :class:`Node` per inode (hard links grouped by
``(st_dev, st_ino)``), each with its metadata, extended attributes (``lgetxattr``) and
dentries ``(parent node id, name)``. Entries on another device than the root (mount points,
nested btrfs subvolumes) are skipped, as ``btrfs send`` skips nested subvolumes. File data is
not read here; :func:`data_segments` and :func:`open_file` serve the emitters later.

The module also owns the tree *identity* (:meth:`Tree.identity`): a digest of every path's
metadata (type, mode, owner, size, mtime, device numbers, symlink target, xattrs, hard-link
group), from which the subvolume UUID and ctransid of a stream are derived, so that the same
tree always gets the same UUID (atime is excluded: reading a tree changes it).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from ..errors import BtrdeltaError

__all__ = [
    "ROOT",
    "Node",
    "Tree",
    "data_segments",
    "kernel_rdev",
    "open_file",
    "scan_tree",
]

#: node id of the tree's root directory
ROOT = 0

#: btrfs-style inode numbers start here (256 is a subvolume root)
_FIRST_INO = 257

_UUID_NAMESPACE = uuid.UUID("6b1d5c1e-2f3a-5b8e-9c4d-62747264656c")  # "btrdel" namespace


@dataclass(slots=True)
class Node:
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
    #: device numbers in the kernel's "new" encoding (0 for non-devices)
    rdev: int = 0
    #: symlink target
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: (parent node id, name) for every hard link; the root has none
    dentries: list[tuple[int, bytes]] = field(default_factory=list)

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


@dataclass
class Tree:
    """A scanned tree: nodes by id, directory entries, and the path of every dentry."""

    root: bytes
    nodes: dict[int, Node]
    #: directory node id -> {name: node id}
    children: dict[int, dict[bytes, int]]
    files: int = 0
    data_bytes: int = 0
    _identity: bytes | None = None

    def path_of(self, parent: int, name: bytes) -> bytes:
        """Relative path of dentry ``name`` in directory ``parent``."""
        base = self.dir_path(parent)
        return base + b"/" + name if base else name

    def dir_path(self, nid: int) -> bytes:
        """Relative path of directory ``nid`` (``b""`` for the root)."""
        parts: list[bytes] = []
        while nid != ROOT:
            parent, name = self.nodes[nid].dentries[0]
            parts.append(name)
            nid = parent
        return b"/".join(reversed(parts))

    def paths(self, nid: int) -> list[bytes]:
        """Every relative path of node ``nid``."""
        if nid == ROOT:
            return [b""]
        return [self.path_of(p, n) for p, n in self.nodes[nid].dentries]

    def abspath(self, rel: bytes) -> bytes:
        """Absolute path of relative path ``rel``."""
        return os.path.join(self.root, rel) if rel else self.root

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
        """32-byte digest of the tree's metadata (see the module docstring)."""
        if self._identity is None:
            h = blake3.blake3()
            first_path: dict[int, bytes] = {}
            stack = [(ROOT, b"")]
            pack = struct.Struct("<IIIQqQ").pack
            while stack:
                nid, rel = stack.pop()
                node = self.nodes[nid]
                group = first_path.setdefault(nid, rel)
                h.update(rel + b"\0")
                h.update(pack(node.mode, node.uid, node.gid, node.size if node.is_reg else 0,
                              node.mtime_ns, node.rdev))
                h.update(struct.pack("<I", len(node.target)) + node.target)
                if group != rel:
                    h.update(b"L" + group + b"\0")
                for name in sorted(node.xattrs):
                    value = node.xattrs[name]
                    h.update(struct.pack("<II", len(name), len(value)) + name + value)
                kids = self.children.get(nid)
                if kids:
                    stack.extend(
                        (kids[name], rel + b"/" + name if rel else name)
                        for name in sorted(kids, reverse=True)
                    )
            self._identity = h.digest()
        return self._identity

    def subvol_uuid(self) -> uuid.UUID:
        """Deterministic UUID of this tree (same tree, same UUID)."""
        return uuid.uuid5(_UUID_NAMESPACE, self.identity().hex())

    def ctransid(self) -> int:
        """Deterministic ctransid: the newest mtime in the tree, in seconds (at least 1)."""
        newest = max((n.mtime_ns for n in self.nodes.values()), default=0)
        return max(1, newest // 1_000_000_000)


def kernel_rdev(st_rdev: int) -> int:
    """Device number in the kernel's "new" encoding used by send streams."""
    major, minor = os.major(st_rdev), os.minor(st_rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for sname in names:
        name = sname.encode("utf-8", "surrogateescape")
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
    return out


def scan_tree(
    path: str | bytes | os.PathLike[str],
    *,
    on_entry: Callable[[int, int], None] | None = None,
) -> Tree:
    """Scan the tree rooted at ``path``.

    Args:
        path: the tree's root directory.
        on_entry: called as ``on_entry(files, bytes)`` after each entry (progress).

    Raises:
        BtrdeltaError: ``path`` is not a directory.
    """
    root = os.fsencode(path)
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise BtrdeltaError(f"cannot scan: {exc.strerror}", path=root) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise BtrdeltaError("not a directory", path=root)
    dev = st.st_dev
    nodes: dict[int, Node] = {}
    children: dict[int, dict[bytes, int]] = {}
    by_inode: dict[int, int] = {}
    tree = Tree(root, nodes, children)

    def make(st: os.stat_result, full: bytes) -> Node:
        nid = len(nodes)
        node = Node(
            id=nid,
            ino=256 if nid == ROOT else _FIRST_INO + nid - 1,
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )
        fmt = stat.S_IFMT(st.st_mode)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = kernel_rdev(st.st_rdev)
        elif fmt == stat.S_IFLNK:
            node.target = os.readlink(full)
        if fmt != stat.S_IFSOCK:
            node.xattrs = _read_xattrs(full)
        nodes[nid] = node
        return node

    make(st, root)
    children[ROOT] = {}
    stack: list[tuple[int, bytes]] = [(ROOT, root)]
    while stack:
        dir_id, absdir = stack.pop()
        try:
            with os.scandir(absdir) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=absdir) from exc
        kids = children[dir_id]
        subdirs: list[tuple[int, bytes]] = []
        for name in names:
            full = os.path.join(absdir, name)
            est = os.lstat(full)
            if est.st_dev != dev:
                continue  # mount point or nested subvolume: not part of this tree
            if stat.S_ISDIR(est.st_mode) and est.st_ino == 2 and not os.listdir(full):
                continue  # btrfs empty-subvolume stub in a snapshot
            nid_opt = by_inode.get(est.st_ino) if est.st_nlink > 1 else None
            if nid_opt is not None and not stat.S_ISDIR(est.st_mode):
                node = nodes[nid_opt]
            else:
                node = make(est, full)
                if est.st_nlink > 1 and not stat.S_ISDIR(est.st_mode):
                    by_inode[est.st_ino] = node.id
                tree.files += 1
                if node.is_reg:
                    tree.data_bytes += est.st_size
            node.dentries.append((dir_id, name))
            kids[name] = node.id
            if node.is_dir:
                children[node.id] = {}
                subdirs.append((node.id, full))
            if on_entry is not None:
                on_entry(tree.files, tree.data_bytes)
        stack.extend(reversed(subdirs))
    return tree


def open_file(path: bytes) -> int:
    """Open a regular file read-only without following symlinks (and without atime update
    where allowed)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the data (non-hole) ranges of the open file, below ``size``."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                data = pos
            else:
                raise
        if data >= size:
            break
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        if out and out[-1][0] + out[-1][1] == data:
            out[-1] = (out[-1][0], hole - out[-1][0])
        else:
            out.append((data, hole - data))
        pos = hole
    return out
