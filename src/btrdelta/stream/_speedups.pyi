"""Optional C accelerator for btrdelta.stream (see _speedups.c); absent without a compiler."""

from collections.abc import Callable, Iterable
from typing import Any

#: "sse4.2" (hardware CRC32C, three interleaved streams) or "table" (slicing-by-8)
CRC_IMPL: str

def configure(
    uuid_cls: type[Any],
    commands: tuple[tuple[type[Any], int, tuple[tuple[int, int, int], ...],
                          tuple[tuple[int, int, int], ...]] | None, ...],
    limits: tuple[tuple[int, int], ...],
    end_cmd: int,
    crc32c: Callable[[Any, int], int] | None = None,
    /,
) -> None: ...
def decode_batch(
    buf: Any, pos: int, limit: int, version: int, verify_crc: bool, /
) -> tuple[list[Any], int, bool]: ...
def render_dump(records: Iterable[Any], dumper: Any, /) -> str: ...
def crc32c(data: Any, crc: int = 0, /) -> int: ...
def crc32c_std(data: Any, value: int = 0, /) -> int: ...
def crc32c_table(data: Any, crc: int = 0, /) -> int: ...
def _set_crc_impl(name: str, /) -> str: ...
