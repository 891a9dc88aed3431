"""Delta streams: btrfs send streams whose file data is replaced by binary patches.

``format`` (records, sans-I/O), ``codecs`` (bsdiff, zstd long-window, HDiffPatch),
``make`` (stream + old snapshot -> delta stream), ``expand`` (delta stream + old snapshot
-> the original stream, byte for byte, or its events for ``btrdelta receive``).
See ``docs/formats/delta-stream.md``.
"""

from .expand import expand_events, expand_items, expand_to, open_delta
from .format import DELTA_MAGIC, is_delta_stream
from .make import MakeOptions, MakeStats, make_delta

__all__ = [
    "DELTA_MAGIC",
    "MakeOptions",
    "MakeStats",
    "expand_events",
    "expand_items",
    "expand_to",
    "is_delta_stream",
    "make_delta",
    "open_delta",
]
