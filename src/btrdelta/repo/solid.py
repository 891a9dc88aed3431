"""A release's *solid full* (``solids/<blake3>.zst``): its plain send stream as a few large
zstd frames, what a device that holds nothing of the release downloads (pure).

The chunked full (``fulls/`` + ``packs/``) compresses each ~64 KiB chunk alone, which loses
the stream's long-range redundancy: 79.3 MB for a 150 MB Debian release against 60.0 MB for
``zstd -19 --long`` of the stream (docs/performance.md). The solid full compresses runs of
consecutive chunks of the full index's order, ~32 MiB each, as one zstd frame (level 19, a
window as large as the frame), so a device downloads ~20% fewer bytes and still checks every
chunk against its id: a frame decompresses to the concatenation of its chunks, cut by the
full index's sizes.

:class:`Solid` is the bin record's ``solid`` value; :func:`cut_frames` where the publisher
cuts; :func:`choose_frames` which frames a device takes solid and which chunks it fetches
from the packs instead (a frame whose chunks it mostly has costs less by chunk ranges).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from .._value import Value
from .canonical import Fields

__all__ = ["DEFAULT_SOLID_LEVEL", "FRAME_TARGET", "Frame", "Solid", "choose_frames",
           "cut_frames"]

#: zstd level of the frames (``repo init --solid-level``; 0: no solid full)
DEFAULT_SOLID_LEVEL = 19

#: a frame is closed at the first chunk boundary at or past this many stream bytes
FRAME_TARGET = 32 << 20
#: a frame's stream bytes at most (a zstd window of 2^27, the decoders' default limit)
MAX_FRAME = 1 << 27
#: a frame's bytes at most: zstd's bound on the compressed size of MAX_FRAME (a frame of
#: incompressible bytes is stored raw, a few bytes a block more)
MAX_FRAME_BYTES = MAX_FRAME + (MAX_FRAME >> 8) + (1 << 17)
_PATH = re.compile(r"solids/([0-9a-f]{64})\.zst")
_MAX_LEN = (1 << 53) - 1
_MAX_FRAMES = 1 << 20


class Frame(Value, frozen=True):
    """One zstd frame of a solid full: ``[offset, offset + length)`` of the file, holding
    the chunks at order positions ``first .. first + count - 1`` of the full index."""

    offset: int
    length: int
    first: int
    count: int


class Solid(Value, frozen=True):
    """The ``solid`` value of a version record: the file and its frames."""

    path: str
    length: int
    frames: tuple[Frame, ...]

    @property
    def blake3(self) -> str:
        """The file's BLAKE3-256 (hex), from its name."""
        return self.path[len("solids/"):-len(".zst")]

    def first_install(self, full_index: int) -> int:
        """The bytes a device that holds nothing downloads for its version: the full index
        (``full_index`` bytes) and every frame (the publisher's page says it, the client's
        plan prices the full so; without a solid full, the chunks)."""
        return full_index + self.length

    @classmethod
    def make(cls, digest_hex: str, frames: Sequence[Frame]) -> Solid:
        return cls(f"solids/{digest_hex}.zst", sum(f.length for f in frames), tuple(frames))

    def encode(self) -> dict[str, Any]:
        return {"path": self.path, "length": self.length,
                "frames": [[f.offset, f.length, f.first, f.count] for f in self.frames]}

    @classmethod
    def decode(cls, f: Fields) -> Solid:
        """Decode and check that the frames tile the file and the chunk order from 0 (that
        they end where the full index's order ends is checked against the full index)."""
        path = f.text("path")
        if not _PATH.fullmatch(path):
            f.fail("not a solids/<blake3>.zst name", "path")
        length = f.integer("length", 1, _MAX_LEN)
        frames: list[Frame] = []
        offset = first = 0
        for i, item in enumerate(f.array("frames", _MAX_FRAMES)):
            if not (type(item) is list and len(item) == 4
                    and all(type(x) is int for x in item)):
                f.fail("not [offset, length, first chunk, chunks]", f"frames[{i}]")
            frame = Frame(*item)
            if frame.offset != offset or frame.first != first or frame.length < 1 \
                    or frame.count < 1:
                f.fail(f"frame {i} does not follow frame {i - 1} (offset {offset}, chunk "
                       f"{first}) or is empty", "frames")
            if frame.length > MAX_FRAME_BYTES:  # (a device holds a frame while it is cut)
                f.fail(f"frame {i} is {frame.length} bytes, more than a frame of "
                       f"{MAX_FRAME} bytes compresses to", "frames")
            frames.append(frame)
            offset += frame.length
            first += frame.count
        if not frames or offset != length:
            f.fail(f"frames cover {offset} bytes of {length}", "frames")
        return cls(path, length, tuple(frames))


def cut_frames(raw_sizes: Sequence[int], target: int = FRAME_TARGET) -> list[tuple[int, int]]:
    """``(first, count)`` of each frame over chunks of ``raw_sizes`` (in stream order): a
    frame ends at the first chunk boundary at or past ``target`` bytes."""
    out: list[tuple[int, int]] = []
    first = size = 0
    for i, n in enumerate(raw_sizes):
        size += n
        if size >= target:
            out.append((first, i + 1 - first))
            first, size = i + 1, 0
    if first < len(raw_sizes):
        out.append((first, len(raw_sizes) - first))
    return out


def choose_frames(solid: Solid, order: Sequence[int], comp_sizes: Sequence[int],
                  digests: Sequence[bytes], have: Callable[[bytes], bool]
                  ) -> tuple[list[Frame], int]:
    """The frames to download, and the bytes of them plus of the chunks left to fetch
    from the packs (the full index not counted).

    ``order`` maps order positions to chunk entries (an entry may repeat), ``comp_sizes``
    and ``digests`` are the entries' packed sizes and ids, ``have(id)``: the device holds
    the chunk already. In order, a frame is taken when it is smaller than the packed
    chunks it would bring that nothing before brought; a device that holds nothing takes
    every frame (a frame is smaller than its chunks compressed alone), one that holds most
    chunks of a frame fetches the rest of them."""
    got: set[int] = set()  # entries held, brought by a frame or fetched before
    frames: list[Frame] = []
    cost = 0
    for frame in solid.frames:
        new = [e for e in dict.fromkeys(order[frame.first : frame.first + frame.count])
               if e not in got and not have(digests[e])]
        packed = sum(comp_sizes[e] for e in new)
        if frame.length < packed:
            frames.append(frame)
            cost += frame.length
            got.update(order[frame.first : frame.first + frame.count])
        else:
            cost += packed
            got.update(new)
    return frames, cost
