"""casync's chunker in C (see _buzhash.c); absent without a compiler."""

def cuts(
    buf: object, start: int, stop: int, min_size: int, max_size: int, d: int, /
) -> list[int]: ...
