"""Index, bin and timestamp documents: round trips and one-line errors on bad fields."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.errors import StreamFormatError
from btrdelta.repo.canonical import canonical, parse_json
from btrdelta.repo.model import (
    ArtifactRef,
    Bin,
    BinRef,
    DeltaRef,
    Index,
    IndexVersion,
    Timestamp,
    VersionRecord,
    check_version_name,
    format_time,
    parse_time,
)

H = "ab" * 32
KEY = "A" * 43 + "="


def _index() -> Index:
    versions = (IndexVersion("1.0", 5000, ()), IndexVersion("1.1", 5100, ((1, 300),)))
    return Index(7, 1_800_000_000, (KEY,), versions,
                 (BinRef(1, 2, ArtifactRef.make("bins", H, 900)),))


def _bin() -> Bin:
    rec = VersionRecord("1.1", H, 123456, ArtifactRef.make("fulls", H, 4000),
                        (DeltaRef(1, ArtifactRef.make("deltas", H, 300)),))
    return Bin(1, (rec,))


def test_round_trips_through_canonical_json() -> None:
    for doc, cls in ((_index(), Index), (_bin(), Bin)):
        data = canonical(doc.encode())
        assert cls.decode(parse_json(data, "x"), "x") == doc  # type: ignore[attr-defined]
    ts = Timestamp(3, 1_800_000_000, 7, 1234, H)
    assert Timestamp.decode(json.loads(canonical(ts.encode())), "t") == ts
    assert ts.index_path == "index/7.json"
    assert _bin().versions[0].full.blake3 == H


def test_canonical_is_sorted_compact_and_refuses_floats() -> None:
    assert canonical({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()
    with pytest.raises(StreamFormatError, match="floats"):
        canonical({"a": 1.5})
    with pytest.raises(StreamFormatError, match="not valid JSON"):
        parse_json(b'{"a": 1.5}', "f.json")


def _mutate(obj: Any, path: list[Any], value: Any) -> Any:
    out = copy.deepcopy(obj)
    cur = out
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return out


@pytest.mark.parametrize(("path", "value", "message"), [
    (["version"], "7", "version: not an integer"),
    (["expires"], "tomorrow", "expires: time 'tomorrow'"),
    (["versions", 1, 0], "../x", "versions\\[1\\]: version name"),
    (["versions", 1, 2], [[2, 5]], "versions\\[1\\]: a delta is not"),
    (["versions", 0, 0], "1.1", "listed twice"),
    (["versions", 1, 1], -1, "versions\\[1\\]: full bytes out of range"),
    (["versions", 1, 1], True, "versions\\[1\\]: not \\[name"),
    (["versions", 1], "1.2", "versions\\[1\\]: not \\[name"),
    (["versions", 1, 2], [[1, 5], [1, 6]], "versions\\[1\\]: two deltas from the same"),
    (["versions", 1, 2], [[1, True]], "versions\\[1\\]: a delta is not"),
    (["bins", 0, 2], "../../etc/passwd", "bins\\[0\\]: not \\[count"),
    (["bins", 0, 0], 1, "bins cover 1 versions"),
    (["timestamp_keys"], [], "timestamp_keys: not a list"),
    (["type"], "btrdelta-bin", "type: is 'btrdelta-bin'"),
])
def test_bad_index_fields_are_named(path: list[Any], value: Any, message: str) -> None:
    bad = _mutate(_index().encode(), path, value)
    with pytest.raises(StreamFormatError, match=message) as info:
        Index.decode(bad, "index/7.json")
    assert str(info.value).startswith("index/7.json: ")
    assert "\n" not in str(info.value)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_any_json_decodes_or_raises_our_error(value: Any) -> None:
    for cls in (Index, Bin, Timestamp):
        try:
            cls.decode(value, "f")  # type: ignore[attr-defined]
        except StreamFormatError:
            pass


def test_names_and_times() -> None:
    assert check_version_name("2024.4.16+build~1") == "2024.4.16+build~1"
    for bad in ("", ".hidden", "a/b", "..", "x" * 129, "ä"):
        with pytest.raises(ValueError, match="version name"):
            check_version_name(bad)
    assert parse_time(format_time(1_700_000_000)) == 1_700_000_000


def test_parse_time_agrees_with_strptime() -> None:
    """parse_time computes by hand what calendar.timegm(time.strptime(...)) gave (whose
    import was ~3 ms of every update): the same seconds, the same refusals (Feb 29 of a
    year not leap, hour 24, second 62, year 0)."""
    import calendar
    import random
    import time

    def oracle(text: str) -> int | None:
        try:
            return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            return None

    def ours(text: str) -> int | None:
        try:
            return parse_time(text)
        except ValueError:
            return None

    rng = random.Random(26)
    for _ in range(2000):
        seconds = rng.randrange(-62_135_596_800, 253_402_300_800)
        tm = time.gmtime(seconds)
        text = f"{tm.tm_year:04d}" + time.strftime("-%m-%dT%H:%M:%SZ", tm)
        assert ours(text) == oracle(text) == seconds, text
    for year in (0, 1900, 2000, 2023, 2024, 2100):
        for month in range(14):
            for day in (0, 1, 28, 29, 30, 31, 32):
                for hms in ("00:00:00", "23:59:59", "24:00:00", "23:60:00", "23:59:60",
                            "23:59:62"):
                    text = f"{year:04d}-{month:02d}-{day:02d}T{hms}Z"
                    assert ours(text) == oracle(text), text
