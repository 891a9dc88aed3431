"""Record-mode digests made from the bytes a send reads anyway (one read per byte).

A sendshot record holds, per regular file, XXH3-128 and BLAKE3-256 of its content and the
seeded XXH3-128 of every 4 KiB block of its data ranges. :class:`BlockHasher` makes them
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

import blake3

from .. import TYPE_CHECKING, _native
from .._optional import need
from ..errors import BtrdeltaError
from ..fs.btrfs import get_fileattr
from .extents import extents_of

if TYPE_CHECKING:
    from typing import Any

    from .scan import Node

__all__ = ["BLOCK", "BlockHasher", "SentWhole", "block_digests_py", "digests_of",
           "hashed_as_sent"]

#: size of the blocks a sendshot record digests
BLOCK = 4096
#: zeros fed for holes, at most this many at a time
_PIECE = 1 << 20
_ZEROS = memoryview(bytes(_PIECE))
#: smallest file a full send hashes as it sends it (see :class:`SentWhole`)
_HASHED_AS_SENT = 1 << 20


def block_digests_py(data: Any, seed: int) -> bytes:
    """The seeded XXH3-128 digests (16 bytes each) of every 4 KiB block of ``data`` (the
    last one may be shorter), concatenated: the reference of ``_blockhash.blocks``."""
    bhash, view = need("xxhash", "make").xxh3_128_digest, memoryview(data)
    return b"".join([bhash(view[i:i + BLOCK], seed) for i in range(0, len(view), BLOCK)])


def _block_digests_fn() -> Any:
    """What makes the block digests of a buffer now: the C accelerator or the reference."""
    native = _native.live("blockhash")
    return native.blocks if native is not None else block_digests_py


class BlockHasher:
    """Record mode: the digests of one file's content fed in order, its data ranges
    (:func:`~.scan.block_segments`) at 4 KiB-aligned offsets, holes skipped: XXH3-128 and
    BLAKE3-256 of the whole content (holes as zeros) and the seeded XXH3-128 of every block
    of the data ranges."""

    __slots__ = ("_b3", "_blocks", "_blocks_of", "_h", "pos", "seed")

    def __init__(self, seed: int) -> None:
        xxhash = need("xxhash", "make")
        self.seed = seed
        self._h = xxhash.xxh3_128()
        self._b3 = blake3.blake3()
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
        self._b3.update(data)
        self._blocks.append(self._blocks_of(data, self.seed))
        self.pos = pos + len(data)

    def _zeros(self, end: int) -> None:
        while self.pos < end:
            n = min(_PIECE, end - self.pos)
            self._h.update(_ZEROS[:n])
            self._b3.update(_ZEROS[:n])
            self.pos += n

    def finish(self, size: int) -> tuple[bytes, bytes, bytes]:
        """(XXH3-128 digest, block digests, BLAKE3-256 digest) of a file of ``size`` bytes
        (zeros after the last bytes fed)."""
        self._zeros(size)
        return self._h.digest(), b"".join(self._blocks), self._b3.digest()


def digests_of(content: bytes, seed: int) -> tuple[bytes, bytes, bytes]:
    """:meth:`BlockHasher.finish` of a whole file's ``content`` fed at once (a small file,
    without holes), made without a hasher object."""
    xxhash = need("xxhash", "make")
    blocks = _block_digests_fn()(content, seed)
    return xxhash.xxh3_128_digest(content), blocks, blake3.blake3(content).digest()


def hashed_as_sent(fd: int, node: Node, segs: list[tuple[int, int]], hasher: BlockHasher,
                   chunk: int, *, extents: bool = False) -> None:
    """Fill in ``node``'s record digests (and flags, data ranges ``segs``; with ``extents``,
    the file being in a read-only btrfs snapshot, its extent items) from the bytes a send
    fed ``hasher`` in pieces of ``chunk`` bytes (read again only if they did not come in
    order).

    Raises:
        BtrdeltaError: the file changed size while it was sent.
    """
    if os.pread(fd, 1, node.size):
        raise BtrdeltaError("file changed while sending (size differs)", path=node.path)
    if hasher.pos < 0 or chunk % BLOCK:
        hasher = BlockHasher(hasher.seed)
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
        node.extents = extents_of(fd, node.st_ino, node.size, node.flags)
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
