"""Writing a release's solid full (``repo add``; a device reads it: ``fullfetch.py``).

The format is ``repo/solid.py``'s: the release's plain stream as zstd frames of consecutive
chunks of the full index's order, ~32 MiB each, every frame with its content size in the
header and a window as large as the frame. :func:`write_solid` compresses the frames on a
pool of daemon threads (each frame alone: zstd's own threads would cut a 32 MiB frame into
jobs of a smaller window; a Ctrl-C does not wait for them), writes them in order and names
the file by its BLAKE3.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import blake3
import zstandard

from .._pool import Pool, Task
from ..errors import ChecksumError, StreamFormatError
from ..repo.solid import DEFAULT_SOLID_LEVEL, Frame, Solid, cut_frames
from .packs import publish_file

__all__ = ["write_solid"]


def _compress(data: bytes, level: int) -> bytes:
    window = max(10, min(27, (len(data) - 1).bit_length()))  # the whole frame
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), window_log=window, write_content_size=True,
        write_checksum=False)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def write_solid(stream: Path, order: Sequence[int], raw_sizes: Sequence[int], root: Path,
                tmp: Path, *, level: int = DEFAULT_SOLID_LEVEL, threads: int = 2) -> Solid:
    """Compress ``stream`` (whose chunks in order are the entries ``order``, sized by
    ``raw_sizes``) into ``root/solids/<blake3>.zst``; the record naming it."""
    sizes = [raw_sizes[e] for e in order]
    cuts = cut_frames(sizes)
    frames: list[Frame] = []
    hasher = blake3.blake3()
    part = tmp / f"solid-{os.getpid()}.zst"
    fd = os.open(stream, os.O_RDONLY | os.O_CLOEXEC)
    pool = Pool(max(1, threads), "btrdelta-solid")
    try:
        with open(part, "wb") as out:
            todo: deque[tuple[int, int, Task[bytes]]] = deque()
            pos = offset = 0

            def drain(keep: int) -> None:
                nonlocal offset
                while len(todo) > keep:
                    first, count, task = todo.popleft()
                    blob = task.result()
                    out.write(blob)
                    hasher.update(blob)
                    frames.append(Frame(offset, len(blob), first, count))
                    offset += len(blob)

            for first, count in cuts:
                n = sum(sizes[first : first + count])
                data = os.pread(fd, n, pos)
                if len(data) != n:
                    raise StreamFormatError(f"stream ends at {pos + len(data)}, its chunks "
                                            f"at {pos + n}", source=str(stream))
                pos += n
                todo.append((first, count, pool.submit(_compress, data, level)))
                drain(max(1, threads))
            drain(0)
        digest, _size = publish_file(part, root / "solids", "zst")
    except BaseException:
        # (a Ctrl-C: the frames being compressed are not waited for, ~10 s of CPU each)
        pool.shutdown(wait=False)
        part.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    pool.shutdown()
    if digest != hasher.hexdigest():  # (what was renamed is what was written)
        raise ChecksumError("the solid full changed while it was published", source=str(part))
    return Solid.make(digest, frames)
