"""Ordering the namespace changes of an incremental (or full) send.

The receiver is path based and starts from the old tree, so creates, renames, links,
unlinks and rmdirs must come in an order where every single step is valid: a name must be
free before something is renamed onto it, a directory must exist before entries go into it,
must be empty before it is removed, and must never be moved below itself.

Strategy (one pass top-down over the new tree, then one clean-up pass), with a simulation of
the receiver's namespace so every path we emit is the path *at that moment*:

* Visit the new tree's entries top-down. An entry that is already in place is left alone.
  Otherwise, if its name is occupied by something else, that occupant is moved out of the
  way: unlinked if it is a doomed non-directory, else renamed to an orphan name
  ``o<ino>-<gen>-<idx>`` in the subvolume root (exactly like the kernel; ``idx`` is bumped
  while the name exists in either tree's root). Then the inode is created there, renamed
  there from a name it no longer keeps, or hard-linked there from a name it keeps.
* Because every ancestor of a visited entry is already at its final place, a moved
  directory can never land below itself: cycles and swaps resolve through orphans.
* Finally every name that is not part of the new tree is unlinked, and unmatched
  directories are removed deepest first.

Records are produced with the old inodes' paths as they are at that step; the emitter adds
data and metadata afterwards (all names are then final).
"""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Iterator

from .. import TYPE_CHECKING
from .._optional import need
from .._value import Value, field
from ..stream.records import (
    Link,
    Mkdir,
    Mkfifo,
    Mkfile,
    Mknod,
    Mksock,
    Record,
    RemoveXattr,
    Rename,
    Rmdir,
    SetXattr,
    Symlink,
    Unlink,
)
from .diff import Match
from .scan import ROOT, Node, Tree

if TYPE_CHECKING:
    from .walk import ScanStream

__all__ = ["FullInos", "Namespace", "full_order", "inherited_acls", "order_namespace"]

Dentry = tuple[int, bytes]
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
#: the property btrfs copies from a directory to each file and directory made in it
COMPRESSION = b"btrfs.compression"
#: ACL entry tags a mode expresses (owner, owning group, other): an ACL of only these is a mode
_MODE_TAGS = (1, 4, 0x20)


def inherited_acls(node: Node, default: bytes | None) -> dict[bytes, bytes]:
    """The ACL xattrs an inode like ``node`` has once created in a directory whose default
    ACL is ``default`` (acl(5)): a directory that default ACL, every inode but a symbolic
    link an access ACL unless the default ACL holds only what a mode can say. The access
    ACL's value (the default ACL masked by the mode created with) is given as ``b""``, which
    no ACL value equals."""
    if default is None:
        return {}
    out = {ACL_DEFAULT: default} if node.is_dir else {}
    if node.fmt != stat.S_IFLNK and any(
        int.from_bytes(default[i : i + 2], "little") not in _MODE_TAGS
        for i in range(4, len(default) - 7, 8)
    ):
        out[ACL_ACCESS] = b""
    return out


class Namespace(Value):
    """The receiver's namespace during the send: keys are old node ids for old inodes and
    ``-1 - new_id`` for inodes the stream creates."""

    children: dict[int, dict[bytes, int]]
    dentries: dict[int, list[Dentry]]
    #: keys whose directory entries changed (their mtime must be re-sent)
    touched: set[int] = field(default_factory=set)
    #: new ids of the inodes the stream created
    created: set[int] = field(default_factory=set)
    #: new ids of created inodes -> the default ACL of the directory they were created in,
    #: which the receiver gave them ACLs from (:func:`inherited_acls`)
    inherited: dict[int, bytes] = field(default_factory=dict)
    #: old directories whose ``btrfs.compression`` the stream changed before its names ->
    #: the value it set (None: removed), :func:`order_namespace`
    early: dict[int, bytes | None] = field(default_factory=dict)

    def xattrs_before(self, node: Node, onode: Node | None) -> dict[bytes, bytes]:
        """The xattrs ``node`` has on the receiver once the names are made: an old inode's
        (with its early ``btrfs.compression``), a created one's ACLs it got from its
        directory (:func:`inherited_acls`)."""
        if onode is None:
            return inherited_acls(node, self.inherited.get(node.id))
        if onode.id not in self.early:
            return onode.xattrs
        value = self.early[onode.id]
        xattrs = {k: v for k, v in onode.xattrs.items() if k != COMPRESSION}
        return xattrs if value is None else {**xattrs, COMPRESSION: value}

    def dir_path(self, key: int) -> bytes:
        """Current path of directory ``key``."""
        parts: list[bytes] = []
        while key != ROOT:
            parent, name = self.dentries[key][0]
            parts.append(name)
            key = parent
        return b"/".join(reversed(parts))

    def path(self, parent: int, name: bytes) -> bytes:
        """Current path of entry ``name`` in directory ``parent``."""
        base = self.dir_path(parent)
        return base + b"/" + name if base else name

    def add(self, key: int, parent: int, name: bytes) -> None:
        """Record a new entry."""
        self.children[parent][name] = key
        self.dentries.setdefault(key, []).append((parent, name))
        self.touched.add(parent)

    def remove(self, key: int, parent: int, name: bytes, at: int | None = None) -> None:
        """Record a removed entry (``at``: where it is in ``dentries[key]``, when known)."""
        del self.children[parent][name]
        if at is None:
            self.dentries[key].remove((parent, name))
        else:
            del self.dentries[key][at]
        self.touched.add(parent)


#: how many inode numbers a full send draws from: 257 .. 2**63 - 1 (256 is the subvolume's
#: root; below 2**63 for readers that take a u64 as signed)
INO_SPACE = (1 << 63) - 257


class FullInos:
    """The inode numbers of a full send, stable across releases of a rebuilt tree.

    The kernel's full of a snapshot names each inode by its number on disk, which a later
    snapshot of the same subvolume keeps; a tree read from a directory (a release rebuilt,
    unpacked, copied) has no such number, and numbering in walk order shifts every number
    after a file added early: every later create record, so every content-defined chunk
    after it, changed. Here an inode's number is derived from its first path (XXH3-64 of
    it, into 257 .. 2**63 - 1): the same path has the same number in every release.

    Numbers are unique within a stream: a number taken already is passed over for the next
    one (deterministic: of two paths with the same hash the first sent keeps it). Taken
    numbers are kept as their low 32 bits in an open-addressing table at most half full (8
    to 16 bytes an inode: a full send's only per-inode memory); a clash of those bits counts
    as taken, which keeps the numbers unique. Receivers do not depend on the numbers
    (btrfs-progs reads ``INO`` and drops it; so does :mod:`btrdelta.receive`).

    Args:
        space: how many numbers there are from 257 on (a small space makes clashes, for
            tests).
    """

    def __init__(self, space: int = INO_SPACE) -> None:
        self._hash = need("xxhash", "make").xxh3_64_intdigest
        self._space = space
        self._slots = array("I", bytes(4 * 1024))
        self._used = 0

    def number(self, path: bytes) -> int:
        """The number of the inode whose first path is ``path`` (each path asked once)."""
        ino: int = 257 + self._hash(path) % self._space
        while not self._take(ino):
            ino = 257 + (ino - 256) % self._space
        return ino

    def _take(self, ino: int) -> bool:
        """Mark ``ino`` taken; False if it (or a number with its low 32 bits) was."""
        key = ino & 0xFFFFFFFF or 1
        slots = self._slots
        mask = len(slots) - 1
        i = key & mask
        while slots[i]:
            if slots[i] == key:
                return False
            i = (i + 1) & mask
        slots[i] = key
        self._used += 1
        if 2 * self._used > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        self._slots = slots = array("I", bytes(8 * len(old)))
        mask = len(slots) - 1
        for key in old:
            if key:
                i = key & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = key


def _create(node: Node, path: bytes, ino: int) -> Record:
    fmt = node.fmt
    if fmt == stat.S_IFREG:
        return Mkfile(path=path, ino=ino)
    if fmt == stat.S_IFDIR:
        return Mkdir(path=path, ino=ino)
    if fmt == stat.S_IFLNK:
        return Symlink(path=path, ino=ino, target=node.target)
    if fmt == stat.S_IFIFO:
        return Mkfifo(path=path, ino=ino, rdev=0, mode=node.mode)
    if fmt == stat.S_IFSOCK:
        return Mksock(path=path, ino=ino, rdev=0, mode=node.mode)
    return Mknod(path=path, ino=ino, rdev=node.rdev, mode=node.mode)


class _Orderer:
    """One :func:`order_namespace`: the simulated namespace and the records so far."""

    def __init__(self, old: Tree, new: Tree, match: Match) -> None:
        self.old, self.new, self.match = old, new, match
        self.ns = Namespace(
            children={d: dict(kids) for d, kids in old.children.items()},
            dentries={nid: list(node.dentries) for nid, node in old.nodes.items()},
        )
        self.out: list[Record] = []
        self.next_ino = max((n.ino for n in old.nodes.values()), default=256) + 1
        self.root_names = set(old.children[ROOT]) | set(new.children[ROOT])
        # reduced trees (.changes): the inodes and root names they left out count too
        if old.whole is not None:
            self.next_ino = max(self.next_ino, 256 + old.whole[0])
        for tree in (old, new):
            if tree.whole is not None:
                self.root_names |= tree.whole[2]
        self.orphan_seq: dict[int, int] = {}
        #: keys of created directories -> the default ACL they were given at creation
        self.defaults: dict[int, bytes] = {}
        self._finals: dict[int, set[Dentry]] = {}
        #: key -> how many of its first names are final (:meth:`first_pending`)
        self._placed: dict[int, int] = {}

    def default_acl(self, key: int) -> bytes | None:
        """The default ACL directory ``key`` has on the receiver while names change (an old
        directory's xattrs change after every name, a new one has what it inherited)."""
        if key < 0:
            return self.defaults.get(key)
        old = self.old.nodes.get(key)
        return old.xattrs.get(ACL_DEFAULT) if old is not None else None

    def key_of(self, new_id: int) -> int:
        """The namespace key of new node ``new_id``."""
        oid = self.match.n2o.get(new_id)
        return oid if oid is not None else -1 - new_id

    def final_dentries(self, key: int) -> set[Dentry]:
        """The names ``key`` has in the new tree (made once: an inode of N names is placed
        N times)."""
        finals = self._finals.get(key)
        if finals is None:
            nid = self.match.o2n.get(key) if key >= 0 else -1 - key
            dentries = self.new.nodes[nid].dentries if nid is not None else ()
            finals = self._finals[key] = {(self.key_of(p), name) for p, name in dentries}
        return finals

    def first_pending(self, key: int, current: list[Dentry]) -> int:
        """Where the first name of ``key`` that is not one of its final names is in
        ``current`` (its names now), ``len(current)`` if none. Scanned on from the last
        call's answer: the names before it are final, and only names that are not final
        are ever removed (a name moved away, evicted or unlinked) and new ones appended."""
        finals = self.final_dentries(key)
        at = self._placed.get(key, 0)
        while at < len(current) and current[at] in finals:
            at += 1
        self._placed[key] = at
        return at

    def orphan_name(self, key: int) -> bytes:
        """A free orphan name ``o<ino>-0-<idx>`` in the root for old inode ``key``."""
        ino = self.old.nodes[key].ino
        idx = self.orphan_seq.get(key, 0)
        while True:
            name = b"o%d-0-%d" % (ino, idx)
            idx += 1
            if name not in self.root_names and name not in self.ns.children[ROOT] \
                    and not self._in_new_root(name):
                self.orphan_seq[key] = idx
                return name

    def _in_new_root(self, name: bytes) -> bool:
        """Whether ``name`` is in the new tree's root on disk: a sendshot's trees list what
        changed, not a name both keep (btrfs receive: ``rename ... Not a directory``)."""
        try:
            os.lstat(os.path.join(self.new.root, name))
        except (OSError, ValueError):
            return False
        return True

    def evict(self, parent: int, name: bytes, key: int) -> None:
        """Free ``name`` in ``parent``: unlink a doomed file, else move it to an orphan."""
        ns = self.ns
        src = ns.path(parent, name)
        is_dir = key >= 0 and self.old.nodes[key].is_dir
        if not is_dir and key >= 0 and key not in self.match.o2n:
            self.out.append(Unlink(path=src))
            ns.remove(key, parent, name)
            return
        oname = self.orphan_name(key)
        self.out.append(Rename(path=src, path_to=oname))
        ns.remove(key, parent, name)
        ns.add(key, ROOT, oname)
        if is_dir:
            ns.touched.add(key)

    def place(self, pkey: int, name: bytes, cid: int) -> None:
        """Put new node ``cid`` at ``name`` in directory ``pkey``: create, rename or link."""
        ns, node = self.ns, self.new.nodes[cid]
        ckey = self.key_of(cid)
        occupant = ns.children[pkey].get(name)
        if occupant == ckey:
            return
        if occupant is not None:
            self.evict(pkey, name, occupant)
        target = ns.path(pkey, name)
        if ckey < 0 and cid not in ns.created:
            self.out.append(_create(node, target, self.next_ino))
            self.next_ino += 1
            ns.created.add(cid)
            default = self.default_acl(pkey)
            if default is not None:
                ns.inherited[cid] = default
                if node.is_dir:
                    self.defaults[ckey] = default
            ns.add(ckey, pkey, name)
            if node.is_dir:
                ns.children[ckey] = {}
            return
        current = ns.dentries.get(ckey, [])
        at = self.first_pending(ckey, current)
        if at < len(current):
            src_parent, src_name = current[at]
            self.out.append(Rename(path=ns.path(src_parent, src_name), path_to=target))
            ns.remove(ckey, src_parent, src_name, at)
            ns.add(ckey, pkey, name)
            if node.is_dir:
                ns.touched.add(ckey)
        else:
            src_parent, src_name = current[0]
            self.out.append(Link(path=target, path_link=ns.path(src_parent, src_name)))
            ns.add(ckey, pkey, name)

    def clean_up(self) -> None:
        """Unlink names that are not part of the new tree; remove doomed directories,
        deepest first."""
        ns = self.ns
        doomed_dirs: list[int] = []
        for key in list(ns.dentries):
            if key < 0:
                continue
            if self.old.nodes[key].is_dir:
                if key not in self.match.o2n and ns.dentries[key]:
                    doomed_dirs.append(key)
                continue
            finals = self.final_dentries(key)
            kept: list[Dentry] = []
            for dn in ns.dentries[key]:  # (not ns.remove: a scan of the list for each)
                if dn in finals:
                    kept.append(dn)
                    continue
                parent, name = dn
                self.out.append(Unlink(path=ns.path(parent, name)))
                del ns.children[parent][name]
                ns.touched.add(parent)
            ns.dentries[key] = kept
        depth = {k: ns.dir_path(k).count(b"/") for k in doomed_dirs}
        for key in sorted(doomed_dirs, key=lambda k: -depth[k]):
            parent, name = ns.dentries[key][0]
            self.out.append(Rmdir(path=ns.path(parent, name)))
            ns.remove(key, parent, name)


def order_namespace(old: Tree, new: Tree, match: Match) -> tuple[list[Record], Namespace]:
    """The namespace records that turn ``old`` into ``new`` given ``match``.

    Returns:
        The records (creates, renames, links, unlinks, rmdirs) and the final
        :class:`Namespace` (which inodes were created, which directories touched).
    """
    o = _Orderer(old, new, match)
    # a directory's btrfs.compression changed or removed goes first: btrfs gives what the
    # stream makes in it the value the directory has then (a value added goes last, with
    # its other xattrs, as in the source the files made before it do not have it)
    for oid, nid in match.o2n.items():
        onode = old.nodes.get(oid)
        value = onode.xattrs.get(COMPRESSION) if onode is not None and onode.is_dir else None
        if value is None or new.nodes[nid].xattrs.get(COMPRESSION) == value:
            continue
        now = o.ns.early[oid] = new.nodes[nid].xattrs.get(COMPRESSION)
        path = o.ns.dir_path(oid)
        o.out.append(RemoveXattr(path=path, name=COMPRESSION) if now is None
                     else SetXattr(path=path, name=COMPRESSION, data=now))
    stack = [ROOT]
    while stack:
        d = stack.pop()
        pkey = o.key_of(d)
        subdirs: list[int] = []
        for name, cid in sorted(new.children[d].items()):
            if new.nodes[cid].is_dir:
                subdirs.append(cid)
            o.place(pkey, name, cid)
        stack.extend(reversed(subdirs))
    o.clean_up()
    return o.out, o.ns


def full_order(old: Tree, new: Tree, match: Match, stream: ScanStream | None = None
               ) -> tuple[Iterator[Record | int | tuple[int, int]], Namespace]:
    """A full send's namespace records with its inodes between them, as the kernel's send
    orders them: each entry of a directory (top-down, by name: the walk of
    :func:`order_namespace`) is created (``LINK`` for a further name of a hard-linked inode)
    and, a non-directory, its node id follows once its first name (``Node.path``) exists: its
    data and metadata come next, while the receiver still holds the file it created. A
    directory's id follows everything below it (a read-only directory is filled before its
    mode is set, its time is that of its last entry), the root's last. The records and file
    order (:func:`~.scan.inode_order`, the order the files are hashed in) are those of
    :func:`order_namespace` then every inode; a regular file created at its first name comes
    as ``(id, inode number)``, standing for its ``MKFILE`` and then its id (its records can
    be made at once); the inode numbers are :class:`FullInos`' (those
    of :class:`~.full.FullSend`: the same stream). The receiver creates and writes each file
    with one ``open`` (not a second one by path for its data).

    ``old`` is the tree of a full send (its root only). The namespace returned stays empty:
    a full send's inodes are all created (nothing in it is ``touched``). With ``stream``
    (``new`` is still being scanned: :class:`~.walk.ScanStream`) each directory is waited
    for before its entries are read; the walk is the scan's, so the stream does not wait
    for the scan of anything after what it sends.
    """
    wait = stream.wait_dir if stream is not None else None
    linked = stream.linked if stream is not None else None
    ns = Namespace(children={}, dentries={})

    def walk() -> Iterator[Record | int | tuple[int, int]]:
        nodes, children = new.nodes, new.children
        inos = FullInos()
        first: dict[int, bytes] = {}  # inode (more than one name) -> its first path
        waiting: dict[bytes, int] = {}  # a path yet to be made -> the inode named by it
        stack = [ROOT]  # a directory to walk, or ~its id: its metadata is next
        while stack:
            d = stack.pop()
            if d < 0:
                yield ~d
                continue
            if wait is not None:
                wait(d)
            base = nodes[d].path
            prefix = base + b"/" if base else b""
            subdirs: list[int] = []
            for name, cid in sorted(children[d].items()):
                node = nodes[cid]
                path = prefix + name
                made = first.get(cid)
                if made is not None:
                    yield Link(path=path, path_link=made)
                else:
                    ino = inos.number(path)
                    # (streamed: its further names may not be scanned yet)
                    if not node.is_dir and (len(node.dentries) > 1 or (
                            linked is not None and linked(node))):
                        first[cid] = path
                    if node.fmt == stat.S_IFREG and path == node.path:
                        yield (cid, ino)  # its MKFILE, then its records
                        continue
                    yield _create(node, path, ino)
                    if node.is_dir:
                        subdirs.append(cid)
                        continue
                    if path != node.path:  # (its records name its first path)
                        waiting[node.path] = cid
                        continue
                    yield cid
                    continue
                got = waiting.pop(path, None)
                if got is not None:
                    yield got
            stack.append(~d)
            stack.extend(reversed(subdirs))
        yield from waiting.values()  # (paths of no entry: not a tree from a scan)

    return walk(), ns
