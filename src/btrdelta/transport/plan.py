"""Range planning and HTTP range syntax (sans-I/O).

This module owns the pure parts of range transport: coalescing the byte ranges a client
lacks into few requests, the ``Range``/``Content-Range`` header syntax, and parsing
``multipart/byteranges`` bodies. No sockets, no files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .._value import Value
from ..errors import TransportError

__all__ = [
    "BodyRegions",
    "Part",
    "Span",
    "batch_spans",
    "coalesce",
    "coalesce_ranges",
    "format_range_header",
    "parse_content_range",
    "parse_range_header",
]


class Part(Value, frozen=True):
    """One wanted piece: ``length`` bytes at ``start``, tagged with a caller's ``key``."""

    key: int
    start: int
    length: int

    @property
    def end(self) -> int:
        """Exclusive end offset."""
        return self.start + self.length


class Span(Value, frozen=True):
    """A contiguous byte range ``[start, end)`` covering one or more parts."""

    start: int
    end: int
    parts: tuple[Part, ...]

    @property
    def length(self) -> int:
        """Bytes in the span."""
        return self.end - self.start


def coalesce(parts: Iterable[Part], *, max_gap: int = 0, max_span: int = 8 << 20) -> list[Span]:
    """Merge parts into spans, joining neighbours at most ``max_gap`` bytes apart.

    Args:
        parts: wanted pieces (any order; overlaps allowed).
        max_gap: unwanted bytes we accept to fetch to save a range.
        max_span: a span is not grown past this many bytes (a single larger part still
            makes its own span).

    Returns:
        Spans sorted by offset; every part is inside exactly one span.
    """
    spans: list[Span] = []
    cur: list[Part] = []
    start = end = 0
    for part in sorted(parts, key=lambda p: (p.start, p.length)):
        if cur and part.start - end <= max_gap and max(end, part.end) - start <= max_span:
            cur.append(part)
            end = max(end, part.end)
            continue
        if cur:
            spans.append(Span(start, end, tuple(cur)))
        cur, start, end = [part], part.start, part.end
    if cur:
        spans.append(Span(start, end, tuple(cur)))
    return spans


def batch_spans(
    spans: Sequence[Span], *, max_ranges: int, max_bytes: int = 16 << 20
) -> list[list[Span]]:
    """Group spans into requests of at most ``max_ranges`` ranges and ``max_bytes`` bytes."""
    batches: list[list[Span]] = []
    cur: list[Span] = []
    size = 0
    for span in spans:
        if cur and (len(cur) >= max_ranges or size + span.length > max_bytes):
            batches.append(cur)
            cur, size = [], 0
        cur.append(span)
        size += span.length
    if cur:
        batches.append(cur)
    return batches


def format_range_header(spans: Sequence[tuple[int, int]]) -> str:
    """``[(0, 10), (20, 30)]`` (half-open) -> ``"bytes=0-9,20-29"``."""
    return "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in spans)


_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.ASCII)


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """``"bytes 0-9/100"`` -> ``(0, 10, 100)`` (half-open; total ``None`` for ``*``).

    Raises:
        TransportError: malformed header.
    """
    m = _CONTENT_RANGE.match(value)
    if not m:
        raise TransportError(f"malformed Content-Range {value[:80]!r}")
    first, last = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if last < first or (total is not None and last >= total):
        raise TransportError(f"impossible Content-Range {value[:80]!r}")
    return first, last + 1, total


_RANGE_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*$", re.ASCII)
#: a position with more digits than this is past the end of any file (and never parsed:
#: a 5000-digit number would exceed Python's int-from-string limit)
_MAX_DIGITS = 18


def _position(digits: str) -> int:
    return int(digits) if len(digits.lstrip("0")) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_range_header(
    value: str, size: int, *, max_ranges: int = 64
) -> list[tuple[int, int]] | None:
    """Parse a request ``Range`` header against a resource of ``size`` bytes.

    Returns:
        Half-open ranges clipped to the resource, in the order asked, ``[]`` if none is
        satisfiable (416), or ``None`` if the header is malformed or has too many ranges
        (serve the whole resource, as RFC 9110 section 14.2 allows).
    """
    unit, _, specs = value.partition("=")
    if unit.strip().lower() != "bytes" or not specs:
        return None
    ranges: list[tuple[int, int]] = []
    items = specs.split(",")
    if len(items) > max_ranges:
        return None
    for item in items:
        m = _RANGE_SPEC.match(item)
        if not m or (not m[1] and not m[2]):
            return None
        if not m[1]:  # suffix range: last N bytes
            n = _position(m[2])
            if n == 0:
                continue
            ranges.append((max(0, size - n), size))
            continue
        first = _position(m[1])
        last = _position(m[2]) if m[2] else max(first, size - 1)
        if last < first:
            return None
        if first >= size:
            continue
        ranges.append((first, min(last, size - 1) + 1))
    return ranges


def coalesce_ranges(ranges: Sequence[tuple[int, int]], *, max_gap: int = 80
                    ) -> list[tuple[int, int]]:
    """Sort and merge ranges that overlap or lie less than ``max_gap`` bytes apart (less
    than the framing of another multipart part), as RFC 9110 section 15.3.7.2 allows: the
    reply to overlapping ranges is never longer than the resource."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] < max_gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


#: bytes allowed for the headers of one part of a ``multipart/byteranges`` body
_MAX_PART_HEAD = 8192


class BodyRegions:
    """Where each range of a ``206`` body lies, found as the body arrives (incremental).

    Feed the body's bytes in order (:meth:`feed`); :attr:`regions` lists, for each range
    whose headers have arrived, ``(first, end, offset)``: resource bytes ``[first, end)``
    start at body offset ``offset`` (the caller checks how much of it has arrived). A
    single-range reply is one region from ``Content-Range``; a multipart reply gains one
    region per part. :meth:`finish` checks the body was complete.

    Args:
        boundary: the multipart boundary, or ``None`` for a single-range reply.
        single: ``(first, end)`` of a single-range reply (from its ``Content-Range``).
    """

    def __init__(self, boundary: bytes | None, single: tuple[int, int] | None = None) -> None:
        self.regions: list[tuple[int, int, int]] = []
        self._delim = b"--" + boundary if boundary is not None else b""
        self._pos = 0  # where the next delimiter (or part data) starts
        self._phase = "delim"
        if boundary is None:
            assert single is not None
            self.regions.append((single[0], single[1], 0))
            self._pos = single[1] - single[0]
            self._phase = "single"
        self._body = bytearray()

    @property
    def body(self) -> bytearray:
        """The bytes received so far."""
        return self._body

    def feed(self, block: bytes) -> None:
        """Take the next bytes of the body.

        Raises:
            TransportError: the multipart framing is malformed.
        """
        self._body += block
        raw = self._body
        while self._phase in ("delim", "head", "data"):
            if self._phase == "data":
                if len(raw) < self._pos:
                    return
                self._phase = "delim"
            if self._phase == "delim":
                at = raw.find(self._delim, self._pos)
                if at < 0 or len(raw) < at + len(self._delim) + 2:
                    if len(raw) - self._pos > _MAX_PART_HEAD + len(self._delim):
                        raise TransportError("multipart body without its boundary")
                    return
                self._pos = at + len(self._delim)
                if raw.startswith(b"--", self._pos):
                    self._phase = "end"
                    return
                self._phase = "head"
            head_end = raw.find(b"\r\n\r\n", self._pos)
            if head_end < 0:
                if len(raw) - self._pos > _MAX_PART_HEAD:
                    raise TransportError("multipart part headers too long")
                return
            content_range = None
            for line in bytes(raw[self._pos:head_end]).split(b"\r\n"):
                name, _, val = line.partition(b":")
                if name.strip().lower() == b"content-range":
                    content_range = val.decode("latin-1")
            if content_range is None:
                raise TransportError("multipart part without Content-Range")
            first, end, _total = parse_content_range(content_range)
            self.regions.append((first, end, head_end + 4))
            self._pos = head_end + 4 + (end - first)
            self._phase = "data"

    def finish(self) -> None:
        """The body ended: it must have held every byte its framing announced.

        Raises:
            TransportError: truncated.
        """
        if self._phase == "single":
            if len(self._body) != self._pos:
                raise TransportError(
                    f"body is {len(self._body)} bytes, Content-Range says {self._pos}")
        elif self._phase != "end":
            raise TransportError("multipart body truncated (no closing boundary)")
