"""Optional C path of the delta carrier's unfolding (see _unfold.c); absent without a
compiler or without btrdelta.stream._speedups."""

from typing import Any

def run(
    raw: Any, pos: int, group: bytearray, state: Any, fmt: int, limit: int, max_cmd: int,
    max_out: int, max_count: int = ..., /
) -> tuple[int, int]: ...
