"""Which path of the parent snapshot each current path of a stream stands for (sans-I/O).

While the records of an incremental stream flow, :class:`PathMap` follows their effect on
*names* (creations, renames, links, unlinks) and answers two questions about a path as it
is named *now*, at this point of the stream:

* :meth:`PathMap.origin`: the path, in the parent snapshot, of the inode that is at this
  path now, if that inode came from the parent (renamed files and directories keep their
  origin, also through orphan names ``o<ino>-<gen>-<idx>``); ``None`` for inodes the stream
  created.
* :meth:`PathMap.base`: where to look for "the old version" of what is at this path: its
  origin, or for a new inode the origin of its directory joined with its own name. A file
  rebuilt as a new inode (created as an orphan and renamed into place) thus maps to the old
  file at its final path, even inside renamed or recreated directories.

State is a tree of the names the stream touched; untouched names resolve through their
nearest touched ancestor, so memory grows with the number of records, not the tree size.
A full stream (SUBVOL) maps by name alone: every base is the same path.
"""

from __future__ import annotations

from .. import stream as _s

__all__ = ["PathMap"]


class _Node:
    __slots__ = ("children", "origin")

    def __init__(self, origin: bytes | None) -> None:
        #: path in the parent snapshot of the inode now here (None: not from the parent)
        self.origin = origin
        #: children whose names the stream touched (others resolve through ``origin``)
        self.children: dict[bytes, _Node] = {}


def _join(parent: bytes | None, name: bytes) -> bytes | None:
    if parent is None:
        return None
    return name if not parent else parent + b"/" + name


def _split(path: bytes) -> list[bytes]:
    comps = path.split(b"/")
    if b"" in comps or b"." in comps:  # rare: the common path is two scans in C
        return [c for c in comps if c and c != b"."]
    return comps


class PathMap:
    """Follows names through a stream; see the module docstring.

    Feed every record with :meth:`feed` (headers and data records are ignored).
    """

    def __init__(self) -> None:
        self._root = _Node(b"")
        self.full = False

    # -- resolution --------------------------------------------------------------------

    def origin(self, path: bytes) -> bytes | None:
        """The parent-snapshot path of the inode at ``path`` now, or ``None`` if new."""
        node = self._root
        origin: bytes | None = node.origin
        comps = _split(path)
        for i, comp in enumerate(comps):
            child = node.children.get(comp)
            if child is None:
                origin = _join(origin, comp)
                for rest in comps[i + 1 :]:
                    origin = _join(origin, rest)
                return origin
            node = child
            origin = node.origin
        return origin

    def base(self, path: bytes) -> bytes:
        """Where the old version of what is at ``path`` lives in the parent snapshot."""
        comps = _split(path)
        node: _Node | None = self._root
        base = b""
        for comp in comps:
            child = node.children.get(comp) if node is not None else None
            if child is not None and child.origin is not None:
                base = child.origin
            else:
                base = comp if not base else base + b"/" + comp
            node = child
        return base

    def moved(self) -> set[bytes]:
        """The current paths whose inode, and everything below them, may not be the one at
        the same path in the parent snapshot (``origin(p) != p`` for them and, unless they
        were named again, for every path below): the names the stream created, removed,
        renamed or linked. Any other path ``p`` has ``origin(p) == p``."""
        out: set[bytes] = set()
        stack: list[tuple[bytes, _Node]] = [(b"", self._root)]
        while stack:
            path, node = stack.pop()
            for name, child in node.children.items():
                here = path + b"/" + name if path else name
                if child.origin != here:
                    out.add(here)
                else:
                    stack.append((here, child))
        return out

    # -- updates -----------------------------------------------------------------------

    def _node(self, path: bytes) -> tuple[_Node, bytes]:
        """The parent node of ``path`` (materialized) and the last component."""
        return self._parent(_split(path))

    def _parent(self, comps: list[bytes]) -> tuple[_Node, bytes]:
        """The parent node of the path of ``comps`` (materialized) and its last one."""
        if not comps:
            raise ValueError("the subvolume root has no parent")
        node = self._root
        last = comps.pop()  # (the caller's list: split for this call)
        for comp in comps:
            child = node.children.get(comp)
            if child is None:
                child = _Node(_join(node.origin, comp))
                node.children[comp] = child
            node = child
        return node, last

    def create(self, path: bytes) -> None:
        """A new inode at ``path``."""
        parent, name = self._node(path)
        parent.children[name] = _Node(None)

    def rename(self, path: bytes, path_to: bytes) -> None:
        """``rename(path, path_to)``: the node and its subtree move."""
        comps, comps_to = _split(path), _split(path_to)
        if comps == comps_to:
            return
        parent, name = self._parent(comps)
        node = parent.children.get(name)
        if node is None:
            node = _Node(_join(parent.origin, name))
        parent.children[name] = _Node(None)  # the name is free now
        parent, name = self._parent(comps_to)
        parent.children[name] = node

    def link(self, path: bytes, target: bytes) -> None:
        """A new name ``path`` for the inode at ``target``."""
        origin = self.origin(target)
        parent, name = self._node(path)
        parent.children[name] = _Node(origin)

    def remove(self, path: bytes) -> None:
        """``unlink``/``rmdir``: the name is gone."""
        parent, name = self._node(path)
        parent.children[name] = _Node(None)

    def feed(self, rec: object) -> None:
        """Update the map with one record (anything but names is ignored)."""
        cls = type(rec)
        if cls is _s.Rename:
            self.rename(rec.path, rec.path_to)  # type: ignore[attr-defined]
        elif cls in _CREATES:
            self.create(rec.path)  # type: ignore[attr-defined]
        elif cls is _s.Link:
            self.link(rec.path, rec.path_link)  # type: ignore[attr-defined]
        elif cls is _s.Unlink or cls is _s.Rmdir:
            self.remove(rec.path)  # type: ignore[attr-defined]
        elif cls is _s.Snapshot or cls is _s.Subvol:
            self.__init__()  # type: ignore[misc]
            self.full = cls is _s.Subvol


_CREATES = frozenset(
    {_s.Mkfile, _s.Mkdir, _s.Mknod, _s.Mkfifo, _s.Mksock, _s.Symlink}
)
