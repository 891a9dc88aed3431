"""The sparse form of a file's XXH3-128 content digest, for a file of more than
:data:`~.onepass.DENSE_MAX` bytes (32 TiB; docs/formats/sendshot.md, "Sparse form").

XXH3-128 of the whole content feeds every byte of every hole (~3 s of CPU per TiB with the
C accelerator): a file with data at 2^62 never finished. The sparse form is XXH3-128,
seeded, of a head and the file's tree-sum-3 content digest (:mod:`btrdelta.tree.content`:
runs of zero blocks by their count), so it costs the data, and it is a function of the
content alone (a hole and written zeros alike): every path that hashes a file agrees.
Imported only for such a file.
"""

from __future__ import annotations

import threading
from typing import Any

from .._optional import need
from ..tree.content import ContentDigest
from .onepass import Stopped

__all__ = ["Sparse", "sparse_digest"]

_HEAD = b"btrdelta sparse content\0"
_SEED = int.from_bytes(b"sparse\0\0", "little")


def sparse_digest(content3: bytes) -> bytes:
    """The sparse form of the content digest of a file whose tree-sum-3 content digest is
    ``content3``: XXH3-128, seeded, of ``"btrdelta sparse content\\0" || content3``
    (seeded: no file's whole-content XXH3-128, unseeded, is it by construction)."""
    digest: bytes = need("xxhash", "make").xxh3_128_digest(_HEAD + content3, _SEED)
    return digest


class Sparse:
    """The sparse form (:func:`sparse_digest`) of content fed in order: its tree-sum-3
    content digest, holes by length."""

    __slots__ = ("_c3", "_pos")

    def __init__(self) -> None:
        self._c3 = ContentDigest()
        self._pos = 0

    def update(self, data: Any) -> None:
        self._c3.update(data)
        self._pos += len(data)

    def zeros(self, n: int, stop: threading.Event | None = None) -> None:
        if stop is not None and stop.is_set():
            raise Stopped("hashing stopped")
        if n > 0:
            self._c3.zeros(n)
            self._pos += n

    def digest(self) -> bytes:
        return sparse_digest(self._c3.digest(self._pos))
