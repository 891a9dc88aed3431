"""One conformance suite for every registered delta codec."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.delta.codecs import CODECS, Codec, CodecUnavailableError, get_codec, make_best
from btrdelta.errors import BtrdeltaError, StreamFormatError

ALL = [pytest.param(c, id=c.name) for c in CODECS.values()]


def _real_pair() -> tuple[bytes, bytes]:
    old = Path("/usr/bin/zstd").read_bytes()[:400_000]
    new = bytearray(old)
    for i in range(1000, len(new), 37_000):
        new[i : i + 6] = b"CHANGE"
    new[5000:5000] = b"inserted bytes"
    return old, bytes(new)


@pytest.mark.parametrize("codec", ALL)
def test_real_binary_round_trip_and_is_small(codec: Codec) -> None:
    old, new = _real_pair()
    patch = codec.make(old, new)
    assert codec.apply(old, patch, new_size=len(new)) == new
    assert len(patch) < len(new) // 50


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize(("old", "new"), [(b"", b""), (b"", b"abc"), (b"abc", b""),
                                          (b"x" * 1000, b"x" * 999 + b"y")])
def test_edge_cases(codec: Codec, old: bytes, new: bytes) -> None:
    assert codec.apply(old, codec.make(old, new)) == new


@pytest.mark.parametrize("codec", ALL)
@given(old=st.binary(max_size=3000), new=st.binary(max_size=3000))
def test_apply_make_is_identity(codec: Codec, old: bytes, new: bytes) -> None:
    assert codec.apply(old, codec.make(old, new), new_size=len(new)) == new


@pytest.mark.parametrize("codec", ALL)
@given(data=st.data())
def test_garbage_patches_raise_only_our_error(codec: Codec, data: st.DataObject) -> None:
    old = data.draw(st.binary(max_size=2000))
    new = data.draw(st.binary(max_size=2000))
    patch = bytearray(codec.make(old, new))
    kind = data.draw(st.sampled_from(["flip", "truncate", "random", "size"]))
    if kind == "flip" and patch:
        i = data.draw(st.integers(0, len(patch) - 1))
        patch[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del patch[data.draw(st.integers(0, len(patch))) :]
    elif kind == "random":
        patch = bytearray(data.draw(st.binary(max_size=200)))
    try:
        out = codec.apply(old, bytes(patch), new_size=len(new) + (kind == "size"))
    except StreamFormatError:
        return
    # a corrupted patch may still decode: the caller's digest check catches that
    assert isinstance(out, bytes)


@pytest.mark.parametrize("codec", ALL)
def test_declared_size_mismatch_is_refused_before_allocating(codec: Codec) -> None:
    patch = codec.make(b"old content", b"new content!")
    with pytest.raises(StreamFormatError):
        codec.apply(b"old content", patch, new_size=1 << 40)


def test_registry_ids_and_names_are_stable() -> None:
    assert {c.codec_id: c.name for c in CODECS.values()} == {
        1: "bsdiff", 2: "zstd", 3: "hdiff", 4: "hdiff-raw", 5: "edits", 6: "edits2"
    }
    assert get_codec("zstd-long") is get_codec(2)
    with pytest.raises(StreamFormatError):
        get_codec(99)
    with pytest.raises(BtrdeltaError, match="unknown codec"):
        get_codec("nope")


def test_auto_picks_the_smallest() -> None:
    old, new = _real_pair()
    codec, patch = make_best(old, new, ("hdiff", "zstd", "bsdiff"))
    sizes = [len(get_codec(n).make(old, new)) for n in ("hdiff", "zstd", "bsdiff")]
    assert len(patch) == min(sizes)
    assert codec.apply(old, patch) == new


def test_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = type(get_codec("bsdiff"))()
    monkeypatch.setattr(type(codec), "module", "no_such_module_for_btrdelta")
    assert not codec.available()
    with pytest.raises(CodecUnavailableError, match="bsdiff4"):
        codec.make(b"a", b"b")
    assert os.environ.get("BTRDELTA_NOPE") is None


def test_hdiff_from_raw_is_the_compressed_diff() -> None:
    """``delta make`` diffs once: the compressed hdiff patch recompressed from the raw one
    is byte for byte what a second diff would give, and applies."""
    old, new = _real_pair()
    hdiff, raw = get_codec("hdiff"), get_codec("hdiff-raw")
    patch = raw.make(old, new)
    assert hdiff.from_raw(patch, len(new)) == hdiff.make(old, new)  # type: ignore[attr-defined]
    assert hdiff.apply(old, hdiff.from_raw(patch, len(new)), new_size=len(new)) == new  # type: ignore[attr-defined]
