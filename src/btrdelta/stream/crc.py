"""CRC-32C (Castagnoli): the fastest implementation present, in the usual convention.

:func:`crc32c` has the signature and meaning of ``crc32c.crc32c`` from the ``crc32c``
package: ``crc32c(data, value)`` continues the finished CRC ``value`` over ``data``. btrfs's
send-stream CRC is the raw register (seed 0, no inversion), see
:func:`btrdelta.stream.codec.btrfs_crc32c`.

When the C accelerator (``_speedups``) is live at import (:mod:`btrdelta._native`) and the
CPU has the SSE4.2 CRC instruction, its function is used and the ``crc32c`` package is never
imported (its import reads package metadata, ~25 ms of every command's start-up). Otherwise,
or with ``BTRDELTA_PURE_PYTHON=1``, the package does the work (C, with SSE4.2, ARMv8 or
tables). Both are C: the choice is made once, here, and ``_native.use_backend`` leaves it.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import TYPE_CHECKING, _native

if TYPE_CHECKING:
    from typing import Any

__all__ = ["IMPL", "crc32c"]


def _pick() -> tuple[Callable[..., int], str]:
    speedups = _native.live("speedups")
    if speedups is not None and speedups.CRC_IMPL == "sse4.2":
        return speedups.crc32c_std, "btrdelta (sse4.2)"
    import crc32c as lib

    return lib.crc32c, "crc32c package"


_impl: tuple[Callable[..., int], str] = _pick()

#: which implementation :func:`crc32c` is
IMPL: str = _impl[1]
crc32c: Callable[[Any, int], int] = _impl[0]
