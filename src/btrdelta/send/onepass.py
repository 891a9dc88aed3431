"""Record-mode digests made from the bytes a send reads anyway (one read per byte).

A sendshot record holds, per regular file, XXH3-128 and BLAKE3-256 of its content (record
version 4: the tree-sum-3 content digest, :mod:`btrdelta.tree.content`, its holes taken by
length; version 3: BLAKE3 of the whole content, ``content3=False``) and the seeded
XXH3-128 of every 4 KiB block of its data ranges. :class:`BlockHasher` makes them
from a file's bytes fed in order; the hashing threads of :mod:`.scan` feed it what they read,
and a full send (:mod:`.emit`) feeds it the bytes it sends of the files :class:`SentWhole`
leaves to it, then :func:`hashed_as_sent` fills in the node. Owns no reading policy beyond
that choice; the record format is :mod:`btrdelta.tree.sendshot`'s.

The block digests of a buffer are one call of the ``blockhash`` C accelerator
(``_blockhash.c``) when it is built, else :func:`block_digests_py` (the reference: one
``xxh3_128_digest`` call per block). For Debian's ``/usr`` (111 MiB in 31,070 blocks) that
is 9 ms of CPU against 15-17 ms; the whole-file digests (BLAKE3 and XXH3) take 36-41 ms.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

import blake3

from .. import TYPE_CHECKING, _native
from .._optional import need
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from ..fs.content import has_byte_at
from ..tree.content import WHOLE_MAX, ContentDigest, content_digest
from .extents import EXTENT_MAX, extents_of

if TYPE_CHECKING:
    from typing import Any

    from .scan import Node
    from .sparse import Sparse

__all__ = ["BLOCK", "BlockHasher", "SentWhole", "Stopped", "block_digests_py", "block_segments",
           "content_hasher", "digests_of", "hashed_as_sent", "segment_max"]

#: size of the blocks a sendshot record digests
BLOCK = 4096
#: zeros fed for holes, at most this many at a time (:func:`_zeros`)
_PIECE = 1 << 20
_ZEROS: list[memoryview] = []
#: zeros the C hasher takes by length at a time (~0.1 s on an idle core)
_HOLE_PIECE = 16 << 30
#: smallest file a full send hashes as it sends it (see :class:`SentWhole`)
_HASHED_AS_SENT = 1 << 20
#: the largest file whose XXH3-128 content digest is XXH3-128 of its whole content, holes
#: as zeros (32 TiB: at least 96 s of an idle core with the C accelerator, 3.0 s per TiB of
#: holes, ~6.5 min with python-xxhash alone); a larger file's is its sparse form,
#: :mod:`.sparse` (docs/formats/sendshot.md, "Sparse form")
DENSE_MAX = 1 << 45


def _zeros(n: int) -> memoryview:
    """``n`` zeros (at most :data:`_PIECE`), of one buffer made when first asked for: made at
    import, its 1 MiB was zeroed in every send's start (~250 page faults, ~0.3 ms of a small
    ``send --from-sendshot``, which feeds no zeros: holes are hashed by length)."""
    if not _ZEROS:
        _ZEROS.append(memoryview(bytes(_PIECE)))
    return _ZEROS[0][:n]


def block_digests_py(data: Any, seed: int) -> bytes:
    """The seeded XXH3-128 digests (16 bytes each) of every 4 KiB block of ``data`` (the
    last one may be shorter), concatenated: the reference of ``_blockhash.blocks``."""
    bhash, view = need("xxhash", "make").xxh3_128_digest, memoryview(data)
    return b"".join([bhash(view[i:i + BLOCK], seed) for i in range(0, len(view), BLOCK)])


def _block_digests_fn() -> Any:
    """What makes the block digests of a buffer now: the C accelerator or the reference."""
    native = _native.live("blockhash")
    return native.blocks if native is not None else block_digests_py


class Stopped(BtrdeltaError):
    """Hashing was stopped (:meth:`~.hashing.ContentHasher.close`: an error elsewhere, a
    signal) before the file was hashed."""


class _ZerosFed:
    """XXH3-128 of content fed in order, a run of zeros fed as zeros (python-xxhash)."""

    __slots__ = ("_h", "update")

    def __init__(self) -> None:
        self._h = need("xxhash", "make").xxh3_128()
        self.update = self._h.update

    def zeros(self, n: int, stop: threading.Event | None = None) -> None:
        while n > 0:
            if stop is not None and stop.is_set():
                raise Stopped("hashing stopped")
            k = min(_PIECE, n)
            self._h.update(_zeros(k))
            n -= k

    def digest(self) -> bytes:
        digest: bytes = self._h.digest()
        return digest


class _ZerosByLength:
    """XXH3-128 of content fed in order, a run of zeros by its length (the C accelerator's
    ``x3_*``: a 1 TiB hole in ~6 s of one idle core instead of ~60 s; its data path, SSE2
    only, 15 GB/s of CPU against python-xxhash's 19 near idle, ~6 against ~20 under load)."""

    __slots__ = ("_native", "_state")

    def __init__(self, native: Any) -> None:
        self._native = native
        self._state = bytearray(native.X3_STATE_SIZE)

    def update(self, data: Any) -> None:
        self._native.x3_update(self._state, data)

    def zeros(self, n: int, stop: threading.Event | None = None) -> None:
        while n > 0:  # (in pieces of ~0.1 s on an idle core, to be stopped between them)
            if stop is not None and stop.is_set():
                raise Stopped("hashing stopped")
            k = min(_HOLE_PIECE, n)
            self._native.x3_zeros(self._state, k)
            n -= k

    def digest(self) -> bytes:
        digest: bytes = self._native.x3_digest(self._state)
        return digest


def content_hasher(holes: int = 1, data: int = 0) -> _ZerosFed | _ZerosByLength | Sparse:
    """An XXH3-128 hasher of a file's content fed in order (``update(bytes)``,
    ``zeros(n)``: its holes, ``digest()``: canonical, 16 bytes; the digest is the same
    either way). For a file with ``holes`` bytes of holes and ``data`` bytes of data it is
    the ``blockhash`` C accelerator's when built and the holes are at least as many bytes
    as the data (its data path is slower than python-xxhash's: 0.8x near idle, ~0.3x under
    load; its holes ~5x faster than hashing their zeros), else python-xxhash's, zeros fed
    as bytes."""
    if holes + data > DENSE_MAX:  # (the sparse form's)
        from .sparse import Sparse

        return Sparse()
    native = _native.live("blockhash") if holes >= data else None
    if native is not None and hasattr(native, "x3_zeros"):
        return _ZerosByLength(native)
    return _ZerosFed()


def segment_max(extent_max: int | None = None) -> int:
    """The most data segments a record keeps for one file: as many as it keeps cells of
    its extent items (``extent_max``, a store's bound: bytes of 50-byte items; None:
    :data:`~.extents.EXTENT_MAX`, 83,886), at least one."""
    return max(1, (EXTENT_MAX if extent_max is None else extent_max) // 50)


def block_segments(segs: Iterable[tuple[int, int]], size: int, most: int | None = None
                   ) -> list[tuple[int, int]]:
    """Data segments (in order) widened to whole 4 KiB blocks (the last one ends at
    ``size``), merged; at most ``most`` of them (a file of more holes: those shorter than
    the least length of 8 KiB times a power of two that leaves no more are taken as data,
    its zeros read and hashed as data). ``segs`` is taken one at a time (a file of
    millions of holes is never listed whole)."""
    out: list[tuple[int, int]] = []
    gap = 1  # holes shorter than this are data (at first: none)
    for off, length in segs:
        a = off - off % BLOCK
        b = min(size, -(-(off + length) // BLOCK) * BLOCK)
        if out and a < out[-1][0] + out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], b) - out[-1][0])
            continue
        out.append((a, b - a))
        while most is not None and len(out) > most:
            gap = max(2 * BLOCK, 2 * gap)
            merged = out[:1]
            for a, n in out[1:]:
                last = merged[-1]
                if a < last[0] + last[1] + gap:
                    merged[-1] = (last[0], a + n - last[0])
                else:
                    merged.append((a, n))
            out = merged
    return out


class BlockHasher:
    """Record mode: the digests of one file's content fed in order, its data ranges
    (:func:`~.scan.block_segments`) at 4 KiB-aligned offsets, holes skipped: XXH3-128 and
    the content digest (``content3``: tree-sum-3's, holes by length; else BLAKE3-256 of the
    whole content, holes as zeros) and the seeded XXH3-128 of every block of the data
    ranges."""

    __slots__ = ("_b3", "_blocks", "_blocks_of", "_c3", "_h", "_stop", "content3", "pos",
                 "seed")

    def __init__(self, seed: int, stop: threading.Event | None = None,
                 content3: bool = True, size: int = 0) -> None:
        self.seed = seed
        self.content3 = content3
        #: set: feeding a hole's zeros raises :class:`Stopped` within a MiB
        self._stop = stop
        # (the C one if built: its slower data path costs ~4 % of a record's hashing beside
        # BLAKE3's and the block digests', its holes' zeros are free)
        # (a file of ``size`` bytes: past WHOLE_MAX the content digest is tree-sum-3's
        # either way; past DENSE_MAX the XXH3-128 one is its sparse form, which hashes the
        # data with BLAKE3 once more: such files are rare, the send path's code is not)
        self._h = content_hasher(size)
        self._c3 = ContentDigest() if content3 or size > WHOLE_MAX else None
        self._b3 = None if self._c3 is not None else blake3.blake3()
        self._blocks_of = _block_digests_fn()
        self._blocks: list[bytes] = []
        #: the offset the next bytes are at, or -1 once fed out of order (unusable)
        self.pos = 0

    def update(self, pos: int, data: Any) -> None:
        """``data`` at ``pos`` (a block boundary at or after the last byte fed: zeros in
        between)."""
        if pos < self.pos or pos % BLOCK or self.pos < 0:
            self.pos = -1
            return
        self._zeros(pos)
        self._h.update(data)
        if self._c3 is not None:
            self._c3.update(data)
        else:
            assert self._b3 is not None
            self._b3.update(data)
        self._blocks.append(self._blocks_of(data, self.seed))
        self.pos = pos + len(data)

    def _zeros(self, end: int) -> None:
        if self.pos >= end:
            return
        self._h.zeros(end - self.pos, self._stop)
        if self._c3 is not None:  # (by length)
            self._c3.zeros(end - self.pos)
            self.pos = end
            return
        assert self._b3 is not None
        while self.pos < end:
            if self._stop is not None and self._stop.is_set():
                raise Stopped("hashing stopped")
            n = min(_PIECE, end - self.pos)
            self._b3.update(_zeros(n))
            self.pos += n

    def finish(self, size: int) -> tuple[bytes, bytes, bytes]:
        """(XXH3-128 digest, block digests, content digest) of a file of ``size`` bytes
        (zeros after the last bytes fed)."""
        self._zeros(size)
        whole = self._c3.digest(size) if self._c3 is not None else \
            self._b3.digest() if self._b3 is not None else b""
        return self._h.digest(), b"".join(self._blocks), whole


def digests_of(content: bytes, seed: int, content3: bool = True, no_zeros: bool = False
               ) -> tuple[bytes, bytes, bytes]:
    """:meth:`BlockHasher.finish` of a whole file's ``content`` fed at once (a small file,
    without holes), made without a hasher object (``no_zeros``: none of its blocks is all
    zeros, as the caller found)."""
    xxhash = need("xxhash", "make")
    blocks = _block_digests_fn()(content, seed)
    return xxhash.xxh3_128_digest(content), blocks, \
        content_digest(content, no_zeros) if content3 else blake3.blake3(content).digest()


def hashed_as_sent(fd: int, node: Node, segs: list[tuple[int, int]], hasher: BlockHasher,
                   chunk: int, *, extents: bool = False, extent_max: int | None = None) -> None:
    """Fill in ``node``'s record digests (and flags, data ranges ``segs``; with ``extents``,
    the file being in a read-only btrfs snapshot, its extent items, past ``extent_max``
    bytes cut to cells: the record's bound, :func:`~.extents.extents_of`) from the bytes a send
    fed ``hasher`` in pieces of ``chunk`` bytes (read again only if they did not come in
    order).

    Raises:
        BtrdeltaError: the file changed size while it was sent.
    """
    if has_byte_at(fd, node.size):
        raise BtrdeltaError("file changed while sending (size differs)", path=node.path)
    if hasher.pos < 0 or chunk % BLOCK:
        hasher = BlockHasher(hasher.seed, content3=hasher.content3, size=node.size)
        for off, length in segs:
            pos = off
            while pos < off + length:
                buf = os.pread(fd, min(_PIECE, off + length - pos), pos)
                if not buf:
                    raise BtrdeltaError("file changed while sending (short read)",
                                        path=node.path)
                hasher.update(pos, buf)
                pos += len(buf)
    node.flags = get_fileattr(fd)
    if extents:
        node.extents = extents_of(fd, node.st_ino, node.size, node.flags, most=extent_max)
    node.digest, node.blocks, node.bdigest = hasher.finish(node.size)
    node.segments = segs


class SentWhole:
    """Which regular files of a full send streamed while its tree is scanned are hashed as
    they are sent (True), read whole anyway, instead of by the hashing threads first: those
    of 1 MiB or more that no earlier file (in the order found, the order sent) can be a
    copy of: no earlier one has their size and their first and last 4 KiB. Smaller ones
    are read ahead by the hashing threads, which keeps many reads in flight; the send then
    finds them cached.

    A later copy of such a file is hashed first (its sample is the same), so it becomes a
    ``CLONE`` of it, whose digest is known once it was sent: the records are those of a
    send that hashed every file of a size shared with another before the stream.
    """

    def __init__(self, root: bytes) -> None:
        self.root = root
        #: size -> [node, its sample or None: not read yet] of the files seen of that size
        self._seen: dict[int, list[list[Any]]] = {}

    def __call__(self, node: Node) -> bool:
        if node.size < _HASHED_AS_SENT:
            return False
        same = self._seen.get(node.size)
        if same is None:
            self._seen[node.size] = [[node, None]]
            return True
        mine = _sample(self.root + b"/" + node.path, node.size)
        first = True
        for entry in same:
            if entry[1] is None:
                entry[1] = _sample(self.root + b"/" + entry[0].path, node.size)
            if entry[1] == mine:
                first = False
                break
        same.append([node, mine])
        return first


def _sample(path: bytes, size: int) -> bytes:
    """The first and last 4 KiB of a file (b"" when it cannot be read: hashed first)."""
    from .scan import open_file

    try:
        fd = open_file(path)
    except OSError:
        return b""
    try:
        return os.pread(fd, BLOCK, 0) + os.pread(fd, BLOCK, max(0, size - BLOCK))
    except OSError:
        return b""
    finally:
        os.close(fd)
