"""Optional C path of applying HDiffPatch HDIFF13 patches (see _hpatch.c); absent without a
compiler."""

from typing import Any

def apply(
    old: Any, new_size: int, covers: Any, cover_count: int, rle_ctrl: Any, rle_code: Any,
    new_data: Any, /
) -> bytes | None: ...
def equal_runs(
    new: Any, old: Any, start: int, end: int, block: int, min_len: int, /
) -> list[tuple[int, int]]: ...
