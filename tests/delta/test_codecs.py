"""One conformance suite for every registered delta codec."""

from __future__ import annotations

import os
import random
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
        1: "bsdiff", 2: "zstd", 3: "hdiff", 4: "hdiff-raw", 5: "edits", 6: "edits2",
        7: "hdiff-lzma",
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


def test_hdiff_patch_is_the_library_patch() -> None:
    """``delta make`` diffs once and compresses the raw patch's streams itself (zstd's
    tables capped): where the caps do not bind (streams of up to ~1 MB), the patch is byte
    for byte HDiffPatch's own compressed diff and its recompression of the raw patch, and
    the library's patcher applies it."""
    import hdiffpatch

    old, new = _real_pair()
    hdiff, raw = get_codec("hdiff"), get_codec("hdiff-raw")
    config = hdiffpatch.ZStdConfig(level=19, window=(len(new) - 1).bit_length())
    library = bytes(hdiffpatch.diff(old, new, config, validate=False))
    patch = raw.make(old, new)
    assert hdiff.from_raw(patch, len(new)) == hdiff.make(old, new) == library  # type: ignore[attr-defined]
    assert bytes(hdiffpatch.recompress(patch, config)) == library
    assert bytes(hdiffpatch.apply(old, library)) == new


@given(seed=st.integers(0, 1 << 30), size=st.integers(0, 30_000),
       noise=st.integers(0, 20_000))
def test_hdiff_patches_apply_with_the_library(seed: int, size: int, noise: int) -> None:
    """Whatever the streams (empty, stored because zstd does not shrink them, compressed;
    their sizes written as HDiffPatch pads them), the patch is HDiffPatch's: the
    library's patcher and ours give the new content back."""
    import hdiffpatch

    old, new = _shifted_pair(seed, size)
    new += random.Random(seed).randbytes(noise)
    hdiff = get_codec("hdiff")
    patch = hdiff.make(old, new)
    assert bytes(hdiffpatch.apply(old, patch)) == new
    assert hdiff.apply(old, patch, new_size=len(new)) == new


def test_hdiff_caps_zstd_tables_on_large_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw patch with a 3 MB new-data stream: level 19 would size zstd's chain table to
    2**22 entries; the frame is made with CHAIN_LOG's, still one frame per stream with its
    content size (what the C applier inflates), and the library applies the patch."""
    import hdiffpatch
    import zstandard

    from btrdelta.delta.codecs import zstd as mod

    rng = random.Random(3)
    old = rng.randbytes(100_000)
    pool = [rng.randbytes(4096) for _ in range(64)]
    new = b"".join(rng.choice(pool) for _ in range(750))
    seen: list[int] = []
    real = zstandard.ZstdCompressor

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw["compression_params"].chain_log)
        return real(*args, **kw)

    from btrdelta._zstd import zstd

    monkeypatch.setattr(zstd, "ZstdCompressor", spy)
    patch = get_codec("hdiff").make(old, new)
    monkeypatch.undo()
    assert max(seen) == mod.CHAIN_LOG < 22
    assert bytes(hdiffpatch.apply(old, patch)) == new
    assert get_codec("hdiff").apply(old, patch, new_size=len(new)) == new


def _hdiff_raw(old: bytes, new: bytes) -> bytes:
    import hdiffpatch

    return bytes(hdiffpatch.diff(old, new, None, validate=False))


def _shifted_pair(seed: int, size: int) -> tuple[bytes, bytes]:
    """An old content and a new one with edits, an insertion and a deletion (what moves
    the old bytes a window lines up with), from a seed."""
    import random

    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 40)) for _ in range(300)]
    old = b"".join(rng.choice(words) for _ in range(size // 20))
    new = bytearray(old)
    for _ in range(20):
        i = rng.randrange(len(new) + 1)
        new[i : i + 4] = rng.randbytes(4)
    i = rng.randrange(len(new) + 1)
    new[i:i] = rng.randbytes(rng.randrange(1, 3000))
    i = rng.randrange(len(new) + 1)
    del new[i : i + rng.randrange(1, 3000)]
    return old, bytes(new)


def test_windowed_hdiff_in_one_window_is_the_library_patch() -> None:
    """The joined patch is the format the library writes: one window re-encodes the
    library's own patch byte for byte (covers, RLE streams, new data)."""
    from btrdelta.delta.codecs.hdiff import windowed_diff

    old, new = _real_pair()
    whole = _hdiff_raw(old, new)
    assert windowed_diff(_hdiff_raw, old, new, step=1 << 30, overlap=0, least=1) == whole


@given(seed=st.integers(0, 1 << 30), size=st.integers(0, 60_000),
       step=st.integers(300, 20_000), overlap=st.integers(0, 5000))
def test_windowed_hdiff_applies_and_bounds_the_old_window(
    seed: int, size: int, step: int, overlap: int
) -> None:
    """Any windows give a patch HDiffPatch applies (the covers re-based, the streams
    joined), and no diff is handed more old bytes than a window's share plus the
    overlaps: the memory bound."""
    from btrdelta.delta.codecs.hdiff import windowed_diff

    old, new = _shifted_pair(seed, size)
    seen: list[tuple[int, int]] = []

    def diff(o: bytes, n: bytes) -> bytes:
        seen.append((len(o), len(n)))
        return _hdiff_raw(o, n)

    patch = windowed_diff(diff, old, new, step=step, overlap=overlap)
    assert get_codec("hdiff-raw").apply(old, patch, new_size=len(new)) == new
    share = -(-len(new) // len(seen))
    scale = len(old) / len(new) if new else 1.0
    assert all(o <= round(share * scale) + 2 * overlap + 1 and n <= share for o, n in seen)


def test_large_old_files_are_diffed_in_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above WINDOW_MIN both HDiffPatch codecs diff in windows (never the whole old
    content at once), the patches stay small (an insertion near the start shifts every
    later window's old part: the windows follow the covers) and apply."""
    from btrdelta.delta.codecs import hdiff as mod

    old, new = _shifted_pair(7, 400_000)
    new = new[:1000] + os.urandom(20_000) + new[1000:]
    whole = len(_hdiff_raw(old, new))
    monkeypatch.setattr(mod, "WINDOW_MIN", 100_000)
    monkeypatch.setattr(mod, "WINDOW_STEP", 64_000)
    monkeypatch.setattr(mod, "WINDOW_OVERLAP", 8_000)
    biggest = []
    real = mod.windowed_diff

    def spy(diff, o, n, **kw):  # type: ignore[no-untyped-def]
        def wrapped(a: bytes, b: bytes) -> bytes:
            biggest.append(len(a))
            return diff(a, b)
        return real(wrapped, o, n, step=mod.WINDOW_STEP, overlap=mod.WINDOW_OVERLAP)

    monkeypatch.setattr(mod, "windowed_diff", spy)
    for name in ("hdiff-raw", "hdiff"):
        codec = get_codec(name)
        patch = codec.make(old, new)
        assert codec.apply(old, patch, new_size=len(new)) == new
    assert len(biggest) == 2 * 7
    assert max(biggest) <= 64_000 + 16_000 + 1
    assert len(get_codec("hdiff-raw").make(old, new)) < whole + whole // 10 + 200


def test_windowed_hdiff_refuses_what_it_cannot_join() -> None:
    import hdiffpatch

    from btrdelta.delta.codecs.hdiff import windowed_diff

    def compressed(o: bytes, n: bytes) -> bytes:
        return bytes(hdiffpatch.diff(o, n, "zstd", validate=False))

    with pytest.raises(StreamFormatError):
        windowed_diff(compressed, b"old" * 100, b"new" * 100, step=100)


def test_hdiff_lzma_is_the_raw_diff_in_one_lzma2_stream() -> None:
    """Codec 7 (format 9): a byte naming the dictionary, then raw LZMA2 (xz's own decoder,
    the oracle) of exactly the ``hdiff-raw`` patch, which the library applies; on a
    rebuilt binary (every call site's operand moved) it is smaller than ``hdiff`` (zstd)
    and than ``bsdiff`` (bzip2), each of which compresses the streams apart."""
    import lzma

    rnd = random.Random(5)
    old = Path("/usr/bin/zstd").read_bytes()[:600_000]
    new = bytearray(old)
    for i in range(0, len(new) - 5, 97):  # shifted rel32 operands, as after a relink
        if new[i] == 0xE8:
            new[i + 1] = (new[i + 1] + 16) & 0xFF
    for _ in range(30):
        at = rnd.randrange(len(new))
        new[at : at + 8] = rnd.randbytes(8)
    new = bytes(new)
    lz, raw = get_codec("hdiff-lzma"), get_codec("hdiff-raw")
    patch = lz.make(old, new)
    inflated = lzma.decompress(patch[1:], lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "dict_size": 1 << patch[0]}])
    assert inflated == raw.make(old, new)
    assert bytes(raw.lib().apply(old, inflated)) == new
    assert lz.apply(old, patch, new_size=len(new)) == new
    assert len(patch) < min(len(get_codec("hdiff").make(old, new)),
                            len(get_codec("bsdiff").make(old, new)))


@pytest.mark.parametrize("dict_log", [0, 11, 27, 255])
def test_hdiff_lzma_refuses_bad_dictionaries_and_bombs(dict_log: int) -> None:
    """A dictionary size outside 4 KiB..64 MiB is refused before any decoder is made; an
    LZMA2 stream inflating far beyond what a patch of the declared new size can be is
    refused after at most that bound, not inflated whole."""
    import lzma

    lz = get_codec("hdiff-lzma")
    with pytest.raises(StreamFormatError, match="dictionary"):
        lz.apply(b"old", bytes((dict_log,)) + b"\x00", new_size=3)
    bomb = bytes((20,)) + lzma.compress(b"HDIFF13&\x00" + bytes(64 << 20), lzma.FORMAT_RAW,
                                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}])
    with pytest.raises(StreamFormatError, match="too large"):
        lz.apply(b"old", bomb, new_size=10)


@pytest.mark.parametrize("stride", [1, 40])
def test_windowed_hdiff_of_pieces_lines_windows_up_where_they_are_in_the_file(
    stride: int,
) -> None:
    """A new content made of pieces of its file (the changed blocks of a file changed in
    place) is diffed in windows of the file, each against the old bytes where its pieces
    are: as small as a diff of the whole old content, and it applies. Dense pieces (every
    block of the second half) and sparse ones (15 blocks anywhere in the file): lined
    up by the content's size, the first put every window 1.5 windows before its blocks,
    the second gave a window of pieces spread over the file the old part of its first."""
    from btrdelta.delta.codecs.hdiff import windowed_diff

    rng = random.Random(stride)
    block = 4096
    old = rng.randbytes(600 * block)
    new_file = bytearray(old)
    blocks = range(300, 600) if stride == 1 else sorted(rng.sample(range(600), 600 // stride))
    places: list[tuple[int, int]] = []
    pieces = []
    for i in blocks:
        new_file[i * block + 100 : i * block + 108] = rng.randbytes(8)
        places.append((len(places) * block, i * block))
        pieces.append(bytes(new_file[i * block : (i + 1) * block]))
    new = b"".join(pieces)
    whole = len(_hdiff_raw(old, new))
    patch = windowed_diff(_hdiff_raw, old, new, step=64 * block, overlap=8 * block,
                          places=places)
    assert get_codec("hdiff-raw").apply(old, patch, new_size=len(new)) == new
    assert len(patch) < whole + whole // 10 + 200
    blind = windowed_diff(_hdiff_raw, old, new, step=64 * block, overlap=8 * block)
    assert len(blind) > 2 * len(patch)  # (what the places are for)
