"""The solid full's record and frame choice (``repo/solid.py``): round trips through a bin,
one-line errors on frames that do not tile, where frames are cut, and which frames a device
takes given the chunks it holds."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from btrdelta.errors import StreamFormatError
from btrdelta.repo.canonical import canonical, parse_json
from btrdelta.repo.model import ArtifactRef, Bin, VersionRecord
from btrdelta.repo.solid import Frame, Solid, choose_frames, cut_frames

H = "ab" * 32


def _solid() -> Solid:
    return Solid.make(H, [Frame(0, 700, 0, 3), Frame(700, 300, 3, 2)])


def _bin(solid: Solid | None) -> Bin:
    return Bin(1, (VersionRecord("1.0", H, 5000, ArtifactRef.make("fulls", H, 400), (),
                                 solid),))


def test_a_bin_record_round_trips_with_and_without_a_solid_full() -> None:
    for solid in (_solid(), None):
        b = _bin(solid)
        data = canonical(b.encode())
        assert Bin.decode(parse_json(data, "bins/x.json"), "bins/x.json") == b
        assert (b'"solid"' in data) == (solid is not None)


def test_a_reader_takes_the_record_without_the_keys_it_does_not_know() -> None:
    """How an older btrdelta reads a bin that has a ``solid`` key: a record's decoder reads
    the keys it names (this one cannot know ``solid2``, as one before solid fulls could
    not know ``solid``), so it goes on with the chunked full."""
    obj = _bin(_solid()).encode()
    obj["versions"][0]["solid2"] = obj["versions"][0].pop("solid")
    rec = Bin.decode(obj, "bins/x.json").versions[0]
    assert rec.solid is None
    assert rec.full.path == f"fulls/{H}.fidx"


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update(path="solids/x.zst"), "solid.path: not a solids/<blake3>.zst name"),
    (lambda s: s.update(length=999), "frames cover 1000 bytes of 999"),
    (lambda s: s["frames"][1].__setitem__(0, 701), "frame 1 does not follow frame 0"),
    (lambda s: s["frames"][1].__setitem__(2, 4), "frame 1 does not follow frame 0"),
    (lambda s: s["frames"][0].__setitem__(3, 0), "or is empty"),
    (lambda s: s["frames"].append([1000, 1]), "not [offset, length, first chunk, chunks]"),
    (lambda s: s.update(frames=[]), "frames cover 0 bytes of 1000"),
    (lambda s: s.update(length=700 + (1 << 28), frames=[[0, 700, 0, 3], [700, 1 << 28, 3, 2]]),
     f"frame 1 is {1 << 28} bytes, more than a frame of {1 << 27} bytes compresses to"),
])
def test_a_solid_whose_frames_do_not_tile_is_refused_in_one_line(change: Any,
                                                                 message: str) -> None:
    obj = copy.deepcopy(_bin(_solid()).encode())
    change(obj["versions"][0]["solid"])
    with pytest.raises(StreamFormatError) as info:
        Bin.decode(obj, "bins/x.json")
    assert message in str(info.value)
    assert "bins/x.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_frames_end_at_the_first_chunk_boundary_past_the_target() -> None:
    assert cut_frames([10, 10, 10, 10, 10], 25) == [(0, 3), (3, 2)]
    assert cut_frames([10, 10, 10], 20) == [(0, 2), (2, 1)]
    assert cut_frames([10, 10], 20) == [(0, 2)]
    assert cut_frames([50], 20) == [(0, 1)]
    assert cut_frames([], 20) == []


def test_a_device_takes_the_frames_that_cost_less_than_their_missing_chunks() -> None:
    # 5 chunks (entry 1 twice in order), packed 400 bytes each; frame 0 holds entries
    # 0, 1, 2 in 700 bytes, frame 1 entries 1 (again) and 3 in 300
    solid = Solid.make(H, [Frame(0, 700, 0, 3), Frame(700, 300, 3, 2)])
    order, comp = [0, 1, 2, 1, 3], [400] * 4
    digests = [bytes([i]) * 32 for i in range(4)]

    def take(held: set[int]) -> tuple[list[int], int]:
        frames, cost = choose_frames(solid, order, comp, digests,
                                     lambda d: d[0] in held)
        return [solid.frames.index(f) for f in frames], cost

    assert take(set()) == ([0, 1], 1000)  # nothing held: every frame
    assert take({0, 1, 2, 3}) == ([], 0)  # all held: nothing
    assert take({0, 1}) == ([1], 400 + 300)  # chunk 2 by range (400 < 700), frame 1 whole
    assert take({0, 2}) == ([1], 400 + 300)
    assert take({3}) == ([0], 700)  # frame 0 brought entry 1: frame 1 brings nothing new
