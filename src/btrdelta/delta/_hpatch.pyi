"""Optional C path of applying HDiffPatch HDIFF13 patches (see _hpatch.c); absent without a
compiler."""

from typing import Any

class Output:
    """A patched content mapped over its old file (a read-only buffer)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def apply(
    old: Any, new_size: int, covers: Any, cover_count: int, rle_ctrl: Any, rle_code: Any,
    new_data: Any, over_fd: int = -1, /
) -> bytes | Output | None: ...
def equal_runs(
    new: Any, old: Any, start: int, end: int, block: int, min_len: int, /
) -> list[tuple[int, int]]: ...
