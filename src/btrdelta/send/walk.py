"""Walking a directory tree into the inode/dentry model (:mod:`.scan`'s :class:`~.scan.Tree`):
:func:`scan_tree` walks it here, :class:`ScanStream` in a thread while a full send streams it,
:class:`ForkedScan` in a child process (the parent tree of a send from two trees, beside the
new one). A send from a sendshot record walks no tree (:mod:`.rescan` lists what changed):
:class:`~.scan.TreeScan` imports this module when it walks one.
"""

from __future__ import annotations

import contextlib
import faulthandler
import marshal
import os
import stat
import threading
from collections.abc import Callable

from .. import TYPE_CHECKING
from .._value import field_names
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from .hashing import lstat_root, open_dir
from .scan import ROOT, Node, Tree, hash_contents, read_node

if TYPE_CHECKING:
    from typing import Any

__all__ = ["ForkedScan", "ScanStream", "scan_tree"]


class _Scanner:
    """One :func:`scan_tree`: the nodes so far, hard links by inode, counters."""

    @classmethod
    def at(cls, path: str | bytes | os.PathLike[str],
           on_entry: Callable[[int, int], None] | None) -> _Scanner:
        """A scanner of the tree at ``path`` with its root made (nothing below it yet).

        Raises:
            BtrdeltaError: ``path`` is not a directory or cannot be read.
        """
        root = os.fsencode(path).rstrip(b"/") or b"/"
        st = lstat_root(root)
        scanner = cls(root, st.st_dev, on_entry)
        scanner.make(st, root, b"", None, root)
        scanner.children[ROOT] = {}
        return scanner

    def __init__(self, root: bytes, dev: int,
                 on_entry: Callable[[int, int], None] | None) -> None:
        self.nodes: dict[int, Node] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.by_inode: dict[int, int] = {}
        self.tree = Tree(root, self.nodes, self.children)
        self.dev = dev
        self.on_entry = on_entry
        self.files = self.data = 0

    def make(self, st: os.stat_result, full: bytes, rel: bytes, dfd: int | None,
             name: bytes) -> Node:
        """A node for ``st`` (its symlink target, device number and xattrs read)."""
        node = read_node(len(self.nodes), st, full, rel, dfd, name)
        self.nodes[node.id] = node
        return node

    def scan_dir(self, dir_id: int, absdir: bytes, reldir: bytes
                 ) -> list[tuple[int, bytes, bytes]]:
        """Read one directory's entries; returns its subdirectories to visit."""
        try:
            dfd = open_dir(absdir)
        except OSError as exc:
            raise BtrdeltaError(f"cannot read directory: {exc.strerror}", path=absdir) from exc
        try:
            self.nodes[dir_id].flags = get_fileattr(dfd)
            try:
                names = sorted(map(os.fsencode, os.listdir(dfd)))
            except OSError as exc:
                raise BtrdeltaError(
                    f"cannot read directory: {exc.strerror}", path=absdir
                ) from exc
            kids = self.children[dir_id]
            subdirs: list[tuple[int, bytes, bytes]] = []
            prefix = absdir + b"/"
            relprefix = reldir + b"/" if reldir else b""
            lstat, s_ifmt, s_ifdir = os.lstat, 0o170000, stat.S_IFDIR
            for name in names:
                est = lstat(name, dir_fd=dfd)
                if est.st_dev != self.dev:
                    continue  # mount point or nested subvolume: not part of this tree
                fmt = est.st_mode & s_ifmt
                if fmt == s_ifdir and est.st_ino == 2 and not os.listdir(prefix + name):
                    continue  # btrfs empty-subvolume stub in a snapshot
                node = self._entry(est, fmt, prefix + name, relprefix + name, dfd, name)
                node.dentries.append((dir_id, name))
                kids[name] = node.id
                if fmt == s_ifdir:
                    self.children[node.id] = {}
                    subdirs.append((node.id, prefix + name, relprefix + name))
                if self.on_entry is not None and self.files % 256 == 0:
                    self.on_entry(self.files, self.data)
        finally:
            os.close(dfd)
        return subdirs

    def _entry(self, est: os.stat_result, fmt: int, full: bytes, rel: bytes, dfd: int,
               name: bytes) -> Node:
        """The node of one directory entry (the existing one for another hard link)."""
        linked = est.st_nlink > 1 and fmt != stat.S_IFDIR
        nid = self.by_inode.get(est.st_ino) if linked else None
        if nid is not None:
            return self.nodes[nid]
        node = self.make(est, full, rel, dfd, name)
        if linked:
            self.by_inode[est.st_ino] = node.id
        self.files += 1
        if fmt == stat.S_IFREG:
            self.data += est.st_size
        return node


def scan_tree(
    path: str | bytes | os.PathLike[str],
    *,
    on_entry: Callable[[int, int], None] | None = None,
) -> Tree:
    """Scan the tree rooted at ``path`` (metadata only; see :func:`~.scan.hash_contents`).

    Args:
        path: the tree's root directory.
        on_entry: called as ``on_entry(files, bytes)`` every 256 entries (progress).

    Raises:
        BtrdeltaError: ``path`` is not a directory or cannot be read.
    """
    scanner = _Scanner.at(path, on_entry)
    stack: list[tuple[int, bytes, bytes]] = [(ROOT, scanner.tree.root, b"")]
    while stack:
        stack.extend(reversed(scanner.scan_dir(*stack.pop())))
    tree = scanner.tree
    tree.files, tree.data_bytes = scanner.files, scanner.data
    if on_entry is not None:
        on_entry(scanner.files, scanner.data)
    return tree


class ScanStream:
    """A full scan of a tree (:func:`scan_tree`'s walk, nodes and numbering) in a thread of
    its own, published directory by directory, so that a full send can stream while the
    tree is still being scanned, as the kernel's send does.

    The root is ``lstat``-ed here (its errors are raised by the constructor); the thread
    then walks the tree. :attr:`tree` grows as it goes: a directory's entries (their nodes,
    ``children``, names) are all there once :meth:`wait_dir` of it returned; a node's further
    hard-link names come when their directories are scanned. :meth:`attach` gives the
    regular files to a callback, in the order they were found (the order a full stream
    sends them: :func:`inode_order`), each directory's before that directory is published;
    :attr:`Tree.files` counts the inodes found so far; :meth:`join` waits for the end (then
    :attr:`Tree.data_bytes` is filled in too). An error of the walk is raised by the
    :meth:`wait_dir` or :meth:`join` that meets it; :meth:`close` stops the walk (at the
    next directory) and waits for the thread.

    Raises:
        BtrdeltaError: ``path`` is not a directory or cannot be read.
    """

    def __init__(self, path: str | bytes | os.PathLike[str]) -> None:
        self._scanner = sc = _Scanner.at(path, None)
        self.tree = sc.tree
        self._cond = threading.Condition()
        self._scanned: set[int] = set()
        self._sink: Callable[[list[Node]], None] | None = None
        self._backlog: list[Node] = []
        self._done = self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._walk, name="btrdelta-scan", daemon=True)
        self._thread.start()

    def _walk(self) -> None:
        sc = self._scanner
        nodes = sc.nodes
        stack: list[tuple[int, bytes, bytes]] = [(ROOT, sc.tree.root, b"")]
        try:
            while stack:
                if self._stop:
                    raise BtrdeltaError("scan stopped", path=sc.tree.root)
                d, absdir, rel = stack.pop()
                first = len(nodes)
                subdirs = sc.scan_dir(d, absdir, rel)
                files = [nodes[i] for i in range(first, len(nodes)) if nodes[i].is_reg]
                sc.tree.files = sc.files  # (so far: progress)
                with self._cond:
                    if self._sink is None:
                        self._backlog += files
                    elif files:
                        self._sink(files)
                    self._scanned.add(d)
                    self._cond.notify_all()
                stack.extend(reversed(subdirs))
            sc.tree.files, sc.tree.data_bytes = sc.files, sc.data
        except BaseException as exc:  # raised where the walk is waited for
            self._error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def attach(self, sink: Callable[[list[Node]], None]) -> None:
        """From now on, give ``sink`` the regular files found (those found so far at once):
        each directory's new files (not further names of a hard-linked one), in order."""
        with self._cond:
            backlog, self._backlog = self._backlog, []
            if backlog:
                sink(backlog)
            self._sink = sink

    def linked(self, node: Node) -> bool:
        """Whether ``node`` (found already) is an inode with more names than one (its other
        names may not be scanned yet)."""
        return self._scanner.by_inode.get(node.st_ino) == node.id

    def wait_dir(self, nid: int) -> None:
        """Wait until directory ``nid``'s entries are scanned.

        Raises:
            BtrdeltaError: the walk met an error first (its error; an ``OSError`` too).
        """
        if nid in self._scanned:
            return
        with self._cond:
            while nid not in self._scanned:
                if self._done:
                    self._raise()
                    raise BtrdeltaError("directory not found by the scan",
                                        path=self.tree.root)
                self._cond.wait()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def walking(self) -> bool:
        """Whether the walk has not ended yet."""
        return not self._done

    def join(self) -> Tree:
        """Wait for the walk's end; the whole tree.

        Raises:
            BtrdeltaError: the walk met an error (its error; an ``OSError`` too).
        """
        self._thread.join()
        self._raise()
        return self.tree

    def close(self) -> None:
        """Stop the walk (if it still runs) and wait for its thread."""
        self._stop = True
        self._thread.join()


class ForkedScan:
    """Scans and hashes one tree in a forked child process, while the caller does the other.

    Like rsync's sender/receiver processes, this puts the two trees of an incremental send
    on two cores without the GIL in the way. The child runs :func:`scan_tree` and
    :func:`~.scan.hash_contents` (one thread), computes the identity, and sends the nodes back as
    plain tuples through a pipe; :meth:`result` rebuilds the :class:`Tree`. Create it before
    starting any thread.

    Args:
        path: the tree's root directory.
    """

    def __init__(self, path: str | bytes | os.PathLike[str]) -> None:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (coverage cannot follow os._exit)
            code = 0
            try:
                os.close(rfd)
                # a crash names where it happened on stderr (the descriptor: sys.stderr
                # may be a Python object without one, e.g. under pytest's capture)
                faulthandler.enable(file=2)
                payload: Any
                try:
                    tree = scan_tree(path)
                    hash_contents([tree], workers=1)
                    nodes = [tuple(getattr(n, f) for f in field_names(Node))
                             for n in tree.nodes.values()]
                    payload = ("ok", tree.root, tree.files, tree.data_bytes, nodes,
                               tree.children, tree.identity())
                except BtrdeltaError as exc:
                    payload = ("error", exc.message, exc.path)
                except OSError as exc:
                    payload = ("error", f"cannot scan: {exc.strerror or exc}", exc.filename)
                with os.fdopen(wfd, "wb") as f:
                    f.write(marshal.dumps(payload))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        self._pid: int | None = pid
        self._rfd = rfd
        self._path = os.fsencode(path)

    def result(self) -> Tree | None:
        """Wait for the child; the scanned and hashed tree, or ``None`` if the child died
        without a word (killed by a signal: the caller scans the tree itself).

        Raises:
            BtrdeltaError: the error the child met while scanning.
        """
        try:
            with os.fdopen(self._rfd, "rb") as f:
                data = f.read()
        finally:
            self._rfd = -1
            self._reap()
        if not data:
            return None
        payload = marshal.loads(data)  # our own child's output (marshal: fastest codec)
        if payload[0] == "error":
            raise BtrdeltaError(payload[1], path=payload[2])
        _ok, root, files, data_bytes, rows, children, identity = payload
        nodes = {row[0]: Node(*row) for row in rows}
        return Tree(root, nodes, children, files, data_bytes, hashed=True, _identity=identity)

    def _reap(self) -> int:
        if self._pid is None:
            return 0
        _pid, status = os.waitpid(self._pid, 0)
        self._pid = None
        return status

    def close(self) -> None:
        """Stop the child if it still runs (after an error elsewhere)."""
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, 9)  # SIGKILL (no `signal`: its enums)
            self._reap()
