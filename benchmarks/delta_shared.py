"""What compressing a delta's patches together would save:
``python -m benchmarks.delta_shared OLD NEW``.

Not a benchmark (no peer): the measurement behind docs/performance.md's session 30
"patches compressed together" (the question of delta-stream.md §7.11: `bsdiff` of two
trees' tars compresses the patches of all changed files in one stream, a delta stream
compresses each compressed patch alone). OLD and NEW are two trees (unpacked releases);
the changed files are those at the same path whose contents differ. Each gets the patch
``delta make``'s choice would give it among the codecs that count here (``zstd`` against
the old file, ``hdiff-lzma``, ``edits2`` for a raw diff of at most 4 KiB, ``hdiff-raw``
left to the carrier, estimated as its zstd -19 alone), and the patches of the files whose
smallest is a *compressed* one are then made again together:

* the ``hdiff-lzma`` files: their raw HDiffPatch diffs in one LZMA2 stream (the codec's
  own settings), against the sum of their patches;
* the ``zstd`` files: one zstd patch of all their new contents (concatenated) against all
  their old ones, against the sum of their patches;
* every changed file: the concatenations diffed as one (HDiffPatch, LZMA), the upper bound
  ("diffed as one", §7.11), against the sum of every file's smallest patch.

Uncompressed patches (``edits2``, ``hdiff-raw``) already share the zstd carrier's one frame
with everything around them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import zstandard

from btrdelta.delta.codecs import CODECS

#: the codecs' ids (delta-stream.md §4)
_ZSTD, _RAW, _EDITS2, _LZMA = 2, 4, 6, 7
#: ``delta make`` tries ``edits2`` on raw diffs up to this long (``diffing.EDITS_TRY``)
_EDITS_TRY = 4 << 10


def _changed(old: Path, new: Path) -> list[tuple[str, bytes, bytes]]:
    out = []
    for p in sorted(new.rglob("*")):
        q = old / p.relative_to(new)
        if p.is_symlink() or not p.is_file() or q.is_symlink() or not q.is_file():
            continue
        a, b = q.read_bytes(), p.read_bytes()
        if a != b:
            out.append((str(p.relative_to(new)), a, b))
    return out


def _smallest(a: bytes, b: bytes, raw: bytes) -> tuple[int, int]:
    """(codec id, patch length) of the smallest patch; ``hdiff-raw`` as its zstd -19."""
    sizes = {_ZSTD: len(CODECS[_ZSTD].make(a, b)),
             _LZMA: len(CODECS[_LZMA].from_raw(raw, len(b))),  # type: ignore[attr-defined]
             _RAW: len(zstandard.ZstdCompressor(level=19).compress(raw)) - 12}
    if len(raw) <= _EDITS_TRY:
        sizes[_EDITS2] = len(CODECS[_EDITS2].make(a, b))
    codec = min(sizes, key=lambda k: sizes[k])
    return codec, sizes[codec]


def account(old: Path, new: Path) -> list[str]:
    """The lines of the measurement."""
    raw_codec, lzma_codec = CODECS[_RAW], CODECS[_LZMA]
    files = _changed(old, new)
    rows = []
    for name, a, b in files:
        raw = raw_codec.make_raw(a, b)  # type: ignore[attr-defined]
        codec, size = _smallest(a, b, raw)
        rows.append((name, a, b, raw, codec, size))
    lines = [f"{new}: {len(rows)} changed files, {sum(len(r[2]) for r in rows):,} B new; "
             "smallest patches: " + ", ".join(
                 f"{CODECS[c].name} {sum(1 for r in rows if r[4] == c)} files "
                 f"{sum(r[5] for r in rows if r[4] == c):,} B"
                 for c in (_EDITS2, _RAW, _ZSTD, _LZMA) if any(r[4] == c for r in rows))]
    lz = [r for r in rows if r[4] == _LZMA]
    if lz:
        one = lzma_codec.from_raw(b"".join(r[3] for r in lz),  # type: ignore[attr-defined]
                                  sum(len(r[2]) for r in lz))
        lines.append(f"  hdiff-lzma files' raw diffs in one LZMA2 stream: {len(one):,} B "
                     f"against {sum(r[5] for r in lz):,} B apart")
    zs = [r for r in rows if r[4] == _ZSTD]
    if zs:
        one = CODECS[_ZSTD].make(b"".join(r[1] for r in zs), b"".join(r[2] for r in zs))
        lines.append(f"  zstd files as one zstd patch: {len(one):,} B against "
                     f"{sum(r[5] for r in zs):,} B apart")
    if rows:
        raw = raw_codec.make_raw(b"".join(r[1] for r in rows),  # type: ignore[attr-defined]
                                 b"".join(r[2] for r in rows))
        one = lzma_codec.from_raw(raw, sum(len(r[2]) for r in rows))  # type: ignore[attr-defined]
        lines.append(f"  every changed file diffed as one (HDiffPatch, LZMA): {len(one):,} B "
                     f"against {sum(r[5] for r in rows):,} B of smallest patches")
    return lines


if __name__ == "__main__":
    for line in account(Path(sys.argv[1]), Path(sys.argv[2])):
        print(line)
