"""Knobs of ``delta make`` and ``delta expand`` (a light module: the CLI builds its parser
from these defaults without importing the codecs' libraries)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .format import DEFAULT_MAX_FILE_SIZE, HashAlgo

__all__ = ["DEFAULT_LEVEL", "DEFAULT_MAX_FILE_SIZE", "MakeOptions"]

#: zstd level of the command carrier (``zstd -19``)
DEFAULT_LEVEL = 19


@dataclass
class MakeOptions:
    """Knobs of :func:`make_delta`.

    Attributes:
        codec: a codec name, or ``auto`` (smallest of :data:`~.codecs.AUTO` per file).
        max_file_size: files (old or new data) larger than this are not diffed.
        min_file_size: groups with less WRITE data than this are not diffed.
        jobs: diff worker threads.
        level: zstd level of carried commands (0: uncompressed passthrough).
        hash_algo: digest for old file, new content and the whole stream.
        verify: check of the output before success (:mod:`.verify`): ``cheap`` (structure,
            the patch rule, lengths and counts), ``full`` (a whole expansion), ``none``.
        check_parent: refuse an old tree that is a btrfs subvolume other than the stream's
            parent (off for streams whose parent UUID is not a btrfs one).
    """

    codec: str = "auto"
    max_file_size: int = 256 << 20
    min_file_size: int = 64
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    level: int = DEFAULT_LEVEL
    hash_algo: int = HashAlgo.BLAKE3_128
    #: regenerate compressed extents (ENCODED_WRITE) by recompressing them
    recompress: bool = True
    verify: str = "cheap"
    check_parent: bool = True
    #: look for the old files nearest to a new file (by name and content, :mod:`.nearest`)
    nearest: bool = True
    #: codec of the carrier: ``zstd`` (fast to expand), ``xz`` (raw LZMA2: smaller where
    #: much new file data is carried, slower to make and to expand) or ``auto`` (xz once
    #: 8 MiB of uncompressed file data, WRITEs, is carried, else zstd:
    #: :data:`~.writer.AUTO_XZ_FROM`)
    carrier: str = "auto"
    #: most old files one patch may use as its base, one after the other (BASES)
    max_bases: int = 4
    #: ``auto`` may choose ``hdiff-lzma`` (6-8 % smaller patches of rebuilt native code,
    #: ~10 ms of LZMA inflation a MB of raw diff on apply); off for the deltas of a
    #: repository (:mod:`btrdelta.update.jobs`), whose ``update`` hops keep to 100 MB/s
    lzma_patches: bool = True

    @property
    def bases(self) -> int:
        """Old files one patch may be made against."""
        return self.max_bases
