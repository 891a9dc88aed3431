"""The C applier of HDIFF13 patches (``delta/_hpatch.c``) against HDiffPatch's own."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btrdelta import _native
from btrdelta.delta.codecs import get_codec
from btrdelta.delta.codecs.hdiff import _apply_c, _declared_sizes, windowed_diff
from btrdelta.errors import StreamFormatError

hdiffpatch = pytest.importorskip("hdiffpatch")
pytestmark = pytest.mark.skipif(
    not _native.available("hpatch") and os.environ.get("CI") != "true",
    reason="the C applier (_hpatch.c) is not built",
)
CODECS = ["hdiff", "hdiff-raw"]


def _edited(rng: random.Random, old: bytes, edits: int) -> bytes:
    """``old`` with insertions, deletions, byte changes and runs (what the RLE stream
    and the new-data stream carry)."""
    new = bytearray(old)
    for _ in range(edits):
        i = rng.randrange(len(new) + 1)
        op = rng.randrange(4)
        if op == 0:
            new[i:i] = rng.randbytes(rng.randrange(1, 300))
        elif op == 1:
            del new[i : i + rng.randrange(1, 300)]
        elif op == 2 and new:
            new[min(i, len(new) - 1)] ^= rng.randrange(1, 256)
        else:
            new[i:i] = bytes([rng.choice((0, 255, rng.randrange(256)))]) * rng.randrange(1, 500)
    return bytes(new)


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1 << 30), size=st.sampled_from([0, 1, 9, 700, 20_000]),
       edits=st.integers(0, 25))
def test_c_applier_gives_the_library_result(codec: str, seed: int, size: int,
                                            edits: int) -> None:
    rng = random.Random(seed)
    old = rng.randbytes(size)
    new = _edited(rng, old, edits)
    patch = get_codec(codec).make(old, new)
    fast = _native.live("hpatch")
    assert fast is not None
    assert _apply_c(fast, old, patch) == hdiffpatch.apply(old, patch) == new


def test_c_applier_takes_a_windowed_patch() -> None:
    """A patch joined from windows (many covers, old positions stepping back and forth)."""
    rng = random.Random(7)
    old = rng.randbytes(3 << 20)
    new = _edited(rng, old[1 << 20 :] + old[: 1 << 20], 40)
    patch = windowed_diff(lambda o, n: bytes(hdiffpatch.diff(o, n, None, validate=False)),
                          old, new, step=1 << 19, overlap=1 << 16)
    fast = _native.live("hpatch")
    assert fast is not None
    assert _apply_c(fast, old, patch) == new
    assert get_codec("hdiff").apply(old, patch, new_size=len(new)) == new


def test_c_applier_large_output_faulted_in_by_a_second_thread() -> None:
    """An output of 8 MiB or more is faulted in by a second thread while the patch writes
    it (``_hpatch.c``'s prefault, which must leave the content alone): the result is still
    the library's, byte for byte, from its first to its last page."""
    rng = random.Random(11)
    old = rng.randbytes(12 << 20)
    new = _edited(rng, old, 60)
    patch = windowed_diff(lambda o, n: bytes(hdiffpatch.diff(o, n, None, validate=False)),
                          old, new, step=4 << 20, overlap=1 << 16)
    fast = _native.live("hpatch")
    assert fast is not None
    for _ in range(3):
        assert _apply_c(fast, old, patch) == hdiffpatch.apply(old, patch) == new


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_c_applier_never_takes_what_the_library_refuses(codec: str,
                                                       data: st.DataObject) -> None:
    """A damaged patch: the C applier declines it (``None``: the library then names the
    fault) or gives what the library gives; it never accepts one the library refuses."""
    rng = random.Random(data.draw(st.integers(0, 1 << 30)))
    old = rng.randbytes(data.draw(st.sampled_from([0, 50, 3000])))
    patch = bytearray(get_codec(codec).make(old, _edited(rng, old, 8)))
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "grow"]))
        if kind == "flip" and patch:
            patch[data.draw(st.integers(0, len(patch) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del patch[data.draw(st.integers(0, len(patch))) :]
        else:
            patch += data.draw(st.binary(min_size=1, max_size=8))
    try:  # what the caller checks first (HdiffCodec.apply): the declared sizes
        size, old_size = _declared_sizes(bytes(patch))
    except StreamFormatError:
        return
    if size > 1 << 20 or old_size != len(old):
        return
    fast = _native.live("hpatch")
    assert fast is not None
    ours = _apply_c(fast, old, bytes(patch))
    try:
        ref = hdiffpatch.apply(old, bytes(patch))
    except (hdiffpatch.HDiffPatchError, ValueError, MemoryError):
        assert ours is None
        return
    assert ours is None or ours == ref


def test_receive_path_does_not_import_the_library() -> None:
    """Applying an hdiff patch with the C applier live looks the library up but does not
    import it (and its ``attrs``: ~20 ms of every receive); the Python backend uses it."""
    code = (
        "import sys\n"
        "from btrdelta import _native\n"
        "from btrdelta.delta.codecs import get_codec\n"
        "old = bytes(range(256)) * 64; new = old[:5000] + b'x' * 99 + old[5000:]\n"
        "patch = bytes.fromhex(sys.argv[1])\n"
        "assert get_codec(3).apply(old, patch, new_size=len(new)) == new\n"
        "print('hdiffpatch' in sys.modules, 'attrs' in sys.modules)\n"
    )
    old = bytes(range(256)) * 64
    patch = get_codec("hdiff").make(old, old[:5000] + b"x" * 99 + old[5000:]).hex()
    env = {k: v for k, v in os.environ.items() if k != "BTRDELTA_PURE_PYTHON"}
    runs = {}
    for pure in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, patch], capture_output=True,
                             text=True, check=True, env={**env, "BTRDELTA_PURE_PYTHON": pure})
        runs[pure] = out.stdout.split()
    assert runs == {"0": ["False", "False"], "1": ["True", "True"]}


@settings(max_examples=300, deadline=None)
@given(old=st.binary(max_size=600), edits=st.lists(st.integers(0, 700), max_size=4),
       grow=st.binary(max_size=40), start=st.integers(0, 700), end=st.integers(0, 700),
       block=st.sampled_from([1, 7, 64, 128]), min_len=st.sampled_from([0, 1, 64, 200]))
def test_equal_runs_in_c_gives_the_python_runs(old: bytes, edits: list[int], grow: bytes,
                                               start: int, end: int, block: int,
                                               min_len: int) -> None:
    """``_hpatch.equal_runs`` (the blocks of a patched file's new content equal to its old
    file's, which receive clones) gives what ``patching._equal_runs`` gives, and those are
    the equal blocks: whole ones, or the short last one where it ends both contents."""
    from btrdelta.delta import _hpatch  # type: ignore[attr-defined]
    from btrdelta.delta.patching import _equal_runs

    new = bytearray(old[: len(old) - len(grow) // 2] + grow)
    for i in edits:
        if i < len(new):
            new[i] ^= 0x5A
    runs = _equal_runs(bytes(new), old, start, end, block, min_len)
    assert _hpatch.equal_runs(bytes(new), old, start, end, block, min_len) == runs
    for at, n in runs:
        assert n >= min_len
        assert at % block == 0
        assert start <= at <= at + n <= end
        assert new[at : at + n] == old[at : at + n]
        assert n % block == 0 or at + n == len(new) == len(old)


def _anonymous_kib(path: Path) -> int:
    """The ``Anonymous`` kB of this process's writable private mappings of ``path`` (the
    pages copied on write: /proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                ours = fields[1] == "rw-p" and line.rstrip().endswith(str(path))
            elif ours and fields[0] == "Anonymous:":
                total += int(fields[1])
    return total


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("size", "grow"), [(3 << 20, 0), (3 << 20, 70_001), (3 << 20, -9_999),
                                            ((1 << 20) + 123, 4096), (5000, 1)])
def test_c_applier_over_the_old_file_gives_the_library_result(
    codec: str, size: int, grow: int, tmp_path: Path
) -> None:
    """``apply_over``: the result mapped over the old file (a private mapping of it,
    anonymous memory past its end where the new content is longer) is the library's, byte
    for byte, longer or shorter than the old file or the same size, a page multiple or
    not; the old file is left as it was (the writes are the mapping's own copies)."""
    from btrdelta.delta import _hpatch  # type: ignore[attr-defined]

    rng = random.Random(size + grow)
    old = rng.randbytes(size)
    new = bytearray(old[: size + grow] if grow < 0 else old + rng.randbytes(grow))
    for at in (0, size // 3, size // 2 + 4097, len(new) - 1):
        new[at % len(new)] ^= 0xA5
    new[size // 4 : size // 4] = b"inserted" * 100
    new[-(size // 5) :] = new[-(size // 5) :][::-1]
    patch = get_codec(codec).make(old, bytes(new))
    (tmp_path / "old").write_bytes(old)
    fd = os.open(tmp_path / "old", os.O_RDONLY)
    try:
        out = get_codec(codec).apply_over(old, patch, new_size=len(new), old_fd=fd)
    finally:
        os.close(fd)
    assert type(out) is _hpatch.Output
    assert len(out) == len(new)
    assert bytes(memoryview(out)) == hdiffpatch.apply(old, patch) == new
    assert (tmp_path / "old").read_bytes() == old
    with pytest.raises(TypeError):
        memoryview(out)[0] = 0  # read-only


def test_c_applier_over_the_old_file_leaves_its_unchanged_pages_alone(tmp_path: Path) -> None:
    """The point of ``apply_over``: a cover at the same offset is not copied, so the pages
    of an 8 MiB old file that a few byte changes do not touch stay the file's page cache
    pages; only the changed ones are copied on write (the kernel's count of the
    mapping's anonymous pages, /proc/self/smaps), where the fresh output of ``apply``
    would have 8 MiB of them."""
    rng = random.Random(5)
    old = rng.randbytes(8 << 20)
    new = bytearray(old)
    for at in (100, 3 << 20, (6 << 20) + 17):
        new[at] ^= 0x0F
    patch = get_codec("hdiff").make(old, bytes(new))
    path = tmp_path / "old-file"
    path.write_bytes(old)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = get_codec("hdiff").apply_over(old, patch, new_size=len(new), old_fd=fd)
    finally:
        os.close(fd)
    assert bytes(memoryview(out)) == new
    assert 0 < _anonymous_kib(path) <= 3 * 4 * 4  # three changed pages (4 KiB; or 16 KiB)
    del out
    assert _anonymous_kib(path) == 0  # unmapped with the last reference


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("seed", range(6))
def test_equal_runs_of_a_content_mapped_over_its_old_file(codec: str, seed: int,
                                                          tmp_path: Path) -> None:
    """``equal_runs`` of an ``Output`` given the old content ``apply`` was given counts the
    blocks the patch never wrote as equal without comparing them (receive: scipy's
    OpenBLAS): the runs are the ones a comparison of every block gives (the Python
    reference on the content's bytes), whatever the patch did where: bytes changed in
    place (the RLE stream), data inserted and removed (covers moved), a tail appended or
    cut, a block changed and changed back by the patch's additions; another old buffer
    of the same bytes, compared block by block, gives the same."""
    import mmap

    from btrdelta.delta import _hpatch  # type: ignore[attr-defined]
    from btrdelta.delta.patching import _equal_runs

    rng = random.Random(seed)
    size = (1 << 20) + rng.randrange(0, 3 * 4096)
    old = bytes(rng.randbytes(4096)) * (size // 4096) + rng.randbytes(size % 4096)
    new = bytearray(old)
    for _ in range(rng.randrange(0, 12)):  # in place: the RLE additions
        at = rng.randrange(len(new))
        new[at] ^= 1 << rng.randrange(8)
    for _ in range(rng.randrange(0, 3)):  # moved: covers elsewhere, new data between
        at = rng.randrange(len(new))
        new[at:at] = rng.randbytes(rng.randrange(1, 9000))
        cut = rng.randrange(len(new))
        del new[cut : cut + rng.randrange(1, 5000)]
    if seed % 3 == 1:
        new += rng.randbytes(rng.randrange(1, 10000))
    elif seed % 3 == 2:
        del new[-rng.randrange(1, 10000) :]
    patch = get_codec(codec).make(old, bytes(new))
    path = tmp_path / "old"
    path.write_bytes(old)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, len(old), prot=mmap.PROT_READ)  # as receive maps it
        out = get_codec(codec).apply_over(mapped, patch, new_size=len(new), old_fd=fd)
    finally:
        os.close(fd)
    assert type(out) is _hpatch.Output
    assert bytes(memoryview(out)) == new
    for start, end, block, min_len in ((0, len(new), 4096, 65536), (0, len(new), 4096, 0),
                                       (8192, len(new) // 2, 4096, 4096),
                                       (0, len(new), 8192, 0), (0, len(new), 1024, 0)):
        runs = _equal_runs(bytes(new), old, start, end, block, min_len)
        assert _hpatch.equal_runs(out, mapped, start, end, block, min_len) == runs
        assert _hpatch.equal_runs(out, bytes(old), start, end, block, min_len) == runs
    del out
    mapped.close()


def test_c_applier_over_a_file_of_another_size_is_fresh_memory(tmp_path: Path) -> None:
    """The old file is checked: one whose size is not the old content's (it changed, or
    the wrong file) gets no mapping over it, the result is ordinary bytes."""
    rng = random.Random(9)
    old = rng.randbytes(1 << 20)
    new = old[:1000] + b"changed" + old[1007:]
    patch = get_codec("hdiff").make(old, new)
    (tmp_path / "old").write_bytes(old + b"longer")
    fd = os.open(tmp_path / "old", os.O_RDONLY)
    try:
        out = get_codec("hdiff").apply_over(old, patch, new_size=len(new), old_fd=fd)
    finally:
        os.close(fd)
    assert type(out) is bytes
    assert out == new
