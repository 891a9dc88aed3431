"""Range planning and HTTP range syntax (pure functions)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.errors import TransportError
from btrdelta.transport.plan import (
    BodyRegions,
    Part,
    batch_spans,
    coalesce,
    format_range_header,
    parse_content_range,
    parse_range_header,
)


def test_coalesce_merges_neighbours_only() -> None:
    parts = [Part(0, 100, 10), Part(1, 110, 5), Part(2, 200, 10), Part(3, 212, 4)]
    spans = coalesce(parts)
    assert [(s.start, s.end) for s in spans] == [(100, 115), (200, 210), (212, 216)]
    spans = coalesce(parts, max_gap=2)
    assert [(s.start, s.end) for s in spans] == [(100, 115), (200, 216)]
    assert [p.key for p in spans[1].parts] == [2, 3]
    assert len(coalesce(parts, max_span=12)) == 4


@given(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 500)), max_size=60),
       st.integers(0, 300), st.integers(1, 5000), st.randoms())
def test_coalesce_covers_every_part_once(raw, gap: int, max_span: int, rnd) -> None:  # type: ignore[no-untyped-def]
    parts, pos = [], 0
    for i, (skip, n) in enumerate(raw):  # disjoint, like chunks in an archive
        parts.append(Part(i, pos + skip, n))
        pos += skip + n
    rnd.shuffle(parts)
    spans = coalesce(parts, max_gap=gap, max_span=max_span)
    keys = sorted(p.key for s in spans for p in s.parts)
    assert keys == list(range(len(parts)))
    for s in spans:
        assert all(s.start <= p.start and p.end <= s.end for p in s.parts)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    batches = batch_spans(spans, max_ranges=3, max_bytes=1000)
    assert [s for b in batches for s in b] == spans
    assert all(len(b) <= 3 for b in batches)


def test_range_header_round_trip() -> None:
    assert format_range_header([(0, 10), (20, 30)]) == "bytes=0-9,20-29"
    assert parse_range_header("bytes=0-9,20-29", 100) == [(0, 10), (20, 30)]
    assert parse_range_header("bytes=-10", 100) == [(90, 100)]
    assert parse_range_header("bytes=95-", 100) == [(95, 100)]
    assert parse_range_header("bytes=90-200", 100) == [(90, 100)]
    assert parse_range_header("bytes=200-300", 100) == []
    assert parse_range_header("bytes=9-1", 100) is None
    assert parse_range_header("items=0-1", 100) is None
    assert parse_range_header("bytes=" + ",".join(["0-1"] * 100), 100) is None


def test_content_range() -> None:
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range("bytes 5-5/*") == (5, 6, None)
    for bad in ("bytes 9-1/100", "bytes 0-100/100", "0-9/100", "bytes a-b/c"):
        with pytest.raises(TransportError):
            parse_content_range(bad)


def _regions(body: bytes, step: int) -> BodyRegions:
    regions = BodyRegions(b"XYZ")
    for at in range(0, len(body), step):
        regions.feed(body[at:at + step])
    regions.finish()
    return regions


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_multipart_regions_as_the_body_arrives(step: int) -> None:
    body = (b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Range: bytes 2-4/10\r\n\r\nabc\r\n--XYZ\r\n"
            b"Content-Range: bytes 7-8/10\r\n\r\nde\r\n--XYZ--\r\n")
    regions = _regions(body, step)
    assert [(a, bytes(regions.body[at:at + b - a])) for a, b, at in regions.regions] == [
        (2, b"abc"), (7, b"de")]
    for cut in (20, 60, len(body) - 12):
        with pytest.raises(TransportError):
            _regions(body[:cut], step)
    with pytest.raises(TransportError):
        _regions(body.replace(b"Content-Range", b"X-Range"), step)


def test_single_range_body_must_be_whole() -> None:
    regions = BodyRegions(None, single=(5, 9))
    regions.feed(b"abc")
    with pytest.raises(TransportError):
        regions.finish()
    regions.feed(b"d")
    regions.finish()
    assert regions.regions == [(5, 9, 0)]
