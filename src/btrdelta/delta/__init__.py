"""Delta streams: btrfs send streams whose file data is replaced by binary patches.

``format`` (numbers and items), ``encoding`` (items <-> bytes), ``parser`` (sans-I/O, on
the framing of ``stream.framing``), ``carrier`` (commands inside the zstd carrier, folded)
and ``unpack`` (the carrier read back), ``codecs`` (bsdiff, zstd long-window, HDiffPatch),
``make`` (stream + old snapshot -> delta stream), ``expand`` (delta stream + old snapshot ->
the original stream, byte for byte; ``patching`` applies the patches) and ``events`` (its
records for ``btrdelta receive``). See ``docs/formats/delta-stream.md``.

The names below are imported on first use (the CLI's start-up does not pay for the codec
and compression libraries of a command it does not run).
"""

from __future__ import annotations

from .. import TYPE_CHECKING, _import_module

if TYPE_CHECKING:
    from typing import Any

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

_WHERE = {
    "DELTA_MAGIC": "format", "is_delta_stream": "format", "MakeOptions": "options",
    "MakeStats": "make", "make_delta": "make", "expand_events": "events",
    "expand_items": "expand", "expand_to": "expand", "open_delta": "expand",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
