"""The old file nearest to a new file, for files whose own path has no (good) old file.

Releases move files: a vendored library renamed with a hash suffix
(``<pkg>.libs/lib<name>-<hash>.so``), ``.so.N`` bumps, ``/lib/modules/<version>/``,
``pkg-1.2.dist-info``, ``__pycache__/*.cpython-311.pyc``. :class:`OldIndex` answers "which
old files are most like this one" two ways, both bounded:

* **by name** (:meth:`OldIndex.by_name`): old files in the same place (the same directory
  path and name once digits and hex hashes are taken out, :func:`name_key`: ``pkg-1.2/sub/``
  and ``pkg-1.3/sub/``, ``lib/modules/6.1.0-13-amd64/`` and ``.../6.1.0-17-amd64/``),
  first those of the same base name; then old files elsewhere with the same base name, or
  the same name key; within each, ranked by how much of the path they share (prefix +
  suffix), then by size. The place comes first because a common name (``__init__.py``,
  ``RECORD``, ``Makefile``) has thousands of old files in a large tree, of which only
  :data:`MAX_CANDIDATES` are compared;
* **by content** (:meth:`OldIndex.by_content`): a bottom-k min-hash sketch of each old
  file's content-defined chunks (FastCDC cut points of its first :data:`SKETCH_BYTES`;
  the gear hash at a cut point identifies the content before it), indexed as one sorted
  array of ``(hash, file)`` pairs; a new file's sketch finds the old files that share most
  of its chunk hashes.

The index is built on first use by one walk of the old tree (no symlink followed). Time and
memory are bounded on trees of 100k files and more (``benchmarks/bench_nearest.py``): names
are kept as one list of paths and three sorted arrays of (name hash, file) pairs (~200 bytes
a file in all), at most :data:`MAX_FILES` files are indexed, :data:`MAX_SKETCHED`
files are sketched, each from at most :data:`SKETCH_BYTES` bytes, :data:`SKETCH_BUDGET`
bytes in all, and only files of at least :data:`MIN_SKETCH` bytes (smaller ones cost
little in the carrier, which compresses them with what surrounds them). A guess only
costs time: :mod:`.diffing` keeps a patch only when it is smaller than what it replaces.
Owns the choice of candidates, not the diffing.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import threading
from array import array
from collections import Counter
from typing import Any

from .._optional import need

__all__ = ["MIN_SKETCH", "OldIndex", "name_key", "sketch"]

#: files below this size are not sketched (nor looked up by content)
MIN_SKETCH = 4096
#: bytes of a file's beginning its sketch is made of
SKETCH_BYTES = 256 << 10
#: smallest chunk hashes kept per file (the bottom-k min-hash sketch)
SKETCH_K = 16
#: at most this many old files are sketched, from at most this many bytes in all
MAX_SKETCHED = 200_000
SKETCH_BUDGET = 512 << 20
#: candidates compared per lookup by name (common names such as __init__.py have many)
MAX_CANDIDATES = 256
#: an index entry is (hash << _FILE_BITS | file): at most this many old files are indexed
_FILE_BITS = 20
MAX_FILES = 1 << _FILE_BITS
_FILE_MASK = MAX_FILES - 1

_DIGITS = re.compile(rb"[0-9a-f]{7,}|[0-9]+")


@functools.cache
def _cdc() -> Any:
    """The FastCDC cutter of sketches (``pyfastcdc`` comes with ``[make]``)."""
    return need("pyfastcdc.cy", "make").FastCDC(2048, min_size=512, max_size=16384)


def name_key(name: bytes) -> bytes:
    """A file name without its version numbers, hashes and release markers: its other
    tokens in order (``libopenblasp-r0-24bff013.3.26.dev.so`` and
    ``libopenblasp-r0-01191904.3.27.so`` both give ``libopenblasp.so``)."""
    tokens = re.split(rb"[-_.+~]+", _DIGITS.sub(b"", name.lower()))
    kept = [t for t in tokens if t and t not in (b"dev", b"rc", b"post", b"r", b"v")]
    return b".".join(kept)


def sketch(data: Any) -> list[int]:
    """The bottom-k sketch of ``data`` (its first :data:`SKETCH_BYTES`): the smallest
    gear hashes at its content-defined cut points."""
    view = memoryview(data)[:SKETCH_BYTES]
    hashes = {c.gear_hash for c in _cdc().cut_buf(view)}
    return sorted(hashes)[:SKETCH_K]


def _slot(key: object) -> int:
    """Where ``key`` (a name, a name key, a place) sorts in an index array: its hash in the
    bits above the file number (a collision only costs a wasted comparison)."""
    return (hash(key) & ((1 << (64 - _FILE_BITS)) - 1)) << _FILE_BITS


def _lookup(table: array[int], slot: int) -> list[int]:
    """The files (at most :data:`MAX_CANDIDATES`, in walk order) under ``slot``."""
    found: list[int] = []
    at = bisect.bisect_left(table, slot)
    while at < len(table) and len(found) < MAX_CANDIDATES and table[at] & ~_FILE_MASK == slot:
        found.append(table[at] & _FILE_MASK)
        at += 1
    return found


def _common(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class OldIndex:
    """Old files by name and by content; see the module docstring.

    Thread-safe: built once under a lock by the first caller, read-only after.
    """

    def __init__(self, root: str | os.PathLike[str], max_size: int) -> None:
        self.root = os.fsencode(root)
        self.max_size = max_size
        self._lock = threading.Lock()
        self._built = False
        self._sketched = False
        self.paths: list[bytes] = []
        self.sizes = array("Q")
        #: sorted (slot | file) of each file's base name, name key, place (see by_name)
        self._names = array("Q")
        self._keys = array("Q")
        self._places = array("Q")
        #: (hash << 20 | file) pairs of the sketches, sorted
        self._pairs = array("Q")

    def _walk(self) -> None:
        stack = [(b"", b"")]  # (path, its directory key)
        while stack:
            rel, dkey = stack.pop()
            try:
                it = os.scandir(self.root + b"/" + rel if rel else self.root)
            except OSError:
                continue
            with it:
                for e in it:
                    path = rel + b"/" + e.name if rel else e.name
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((path, dkey + b"/" + name_key(e.name)))
                        elif e.is_file(follow_symlinks=False):
                            size = e.stat(follow_symlinks=False).st_size
                            if 0 < size <= self.max_size:
                                self._add(path, e.name, size, dkey)
                    except OSError:
                        continue

    def _add(self, path: bytes, name: bytes, size: int, dkey: bytes) -> None:
        i = len(self.paths)
        if i >= MAX_FILES:
            return
        self.paths.append(path)
        self.sizes.append(size)
        self._names.append(_slot(name) | i)
        key = name_key(name)
        if key:
            self._keys.append(_slot(key) | i)
        self._places.append(_slot((dkey, key or name)) | i)

    def _ensure(self, content: bool) -> None:
        if self._built and (self._sketched or not content):
            return
        with self._lock:
            if not self._built:
                self._walk()
                for table in ("_names", "_keys", "_places"):
                    setattr(self, table, array("Q", sorted(getattr(self, table))))
                self._built = True
            if content and not self._sketched:
                self._sketch_all()
                self._sketched = True

    def _sketch_all(self) -> None:
        pairs: list[int] = []
        budget = SKETCH_BUDGET
        order = sorted(range(len(self.paths)), key=lambda i: -self.sizes[i])
        count = 0
        for i in order:
            size = self.sizes[i]
            if size < MIN_SKETCH or count >= MAX_SKETCHED or budget <= 0 or i >= MAX_FILES:
                continue
            try:
                fd = os.open(self.root + b"/" + self.paths[i],
                             os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                head = os.read(fd, SKETCH_BYTES)
            except OSError:
                continue
            finally:
                os.close(fd)
            budget -= len(head)
            count += 1
            pairs.extend((h & ~_FILE_MASK) | i for h in sketch(head))
        pairs.sort()
        self._pairs = array("Q", pairs)

    def by_name(self, path: bytes, size: int, exclude: bytes | None = None,
                limit: int = 1) -> list[tuple[bytes, bool]]:
        """At least the ``limit`` best old files named like ``path`` (see the module
        docstring), best first, each with whether it has the same base name (else the same
        name key). Tiers after the one that gives ``limit`` files are not looked at."""
        self._ensure(False)
        parent, _, name = path.rpartition(b"/")
        key = name_key(name)
        dkey = b"".join(b"/" + name_key(c) for c in parent.split(b"/")) if parent else b""
        place = _lookup(self._places, _slot((dkey, key or name)))
        tail = b"/" + name
        seen: set[int] = set()
        ranked: list[tuple[int, int, int, int]] = []
        for tier, found in enumerate((
            [i for i in place if (b"/" + self.paths[i]).endswith(tail)], place,
            [i for i in _lookup(self._names, _slot(name)) if (b"/" + self.paths[i]).endswith(tail)],
            _lookup(self._keys, _slot(key)) if key else [],
        )):
            if len(ranked) >= limit:
                break
            for i in found:
                if i in seen or self.paths[i] == exclude:
                    continue
                seen.add(i)
                cand = self.paths[i]
                score = _common(cand, path) + _common(cand[::-1], path[::-1])
                ranked.append((tier, -score, abs(self.sizes[i] - size), i))
        ranked.sort()
        return [(self.paths[r[-1]], r[0] in (0, 2)) for r in ranked]

    def by_content(self, data: Any, exclude: bytes | None = None,
                   limit: int = 2, share: int = 4) -> list[bytes]:
        """Old files whose sketches share most with ``data``'s (at least 1/``share`` of
        it, and two hashes), best first."""
        if len(data) < MIN_SKETCH:
            return []
        self._ensure(True)
        pairs = self._pairs
        votes: Counter[int] = Counter()
        mine = sketch(data)
        for h in mine:
            key = h & ~_FILE_MASK
            start = at = bisect.bisect_left(pairs, key)
            # a hash common to many files (zeros, a license text) says little
            while at < len(pairs) and pairs[at] & ~_FILE_MASK == key and at - start < 64:
                votes[pairs[at] & _FILE_MASK] += 1
                at += 1
        need = max(2, len(mine) // share)
        best = [i for i, n in votes.most_common(limit + 1) if n >= need
                and self.paths[i] != exclude]
        return [self.paths[i] for i in best[:limit]]
