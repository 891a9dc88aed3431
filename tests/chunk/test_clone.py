"""Clone from local archives into a store: bit-perfect output, reuse, seeds, resume, gc."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from btrdelta.chunk.archive import decode_header
from btrdelta.chunk.chunker import ChunkerParams, chunk_digest, iter_chunks
from btrdelta.chunk.clone import FileSource, clone
from btrdelta.chunk.store import ChunkStore
from btrdelta.errors import ChecksumError, MissingBaseError, StreamFormatError
from btrdelta.transport.plan import Span

from .images import PARAMS, ImagePair


def _clone(arc: Path, store: ChunkStore, name: str, **kw):  # type: ignore[no-untyped-def]
    src = FileSource(arc)
    try:
        return clone(src, store, name, **kw)
    finally:
        src.close()


def test_clone_v1_then_v2_reuses_chunks(image_pair: ImagePair, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    r1 = _clone(image_pair.arc1, store, "v1", output=str(tmp_path / "v1.img"))
    assert (tmp_path / "v1.img").read_bytes() == image_pair.img1.read_bytes()
    assert r1.from_store == 0
    assert r1.fetched == r1.chunks
    dry = _clone(image_pair.arc2, store, "v2", dry_run=True)
    assert not (tmp_path / "store" / "v2").exists()
    r2 = _clone(image_pair.arc2, store, "v2", output=str(tmp_path / "v2.img"))
    assert (tmp_path / "v2.img").read_bytes() == image_pair.img2.read_bytes()
    assert dry.fetch_bytes == r2.fetch_bytes
    assert r2.from_store > r2.chunks // 2  # most of v2 was already there
    arc2_size = image_pair.arc2.stat().st_size
    assert r2.fetch_bytes + r2.index_bytes < arc2_size / 3
    assert store.verify("v2").ok
    assert store.verify("v1").ok
    # a second clone of the same image fetches nothing
    again = _clone(image_pair.arc2, store, "v2")
    assert again.fetched == 0
    assert again.fetch_bytes == 0


def test_seed_supplies_chunks(image_pair: ImagePair, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    r = _clone(image_pair.arc2, store, "v2", seeds=[str(image_pair.img1)],
               output=str(tmp_path / "v2.img"))
    assert r.from_seeds > r.chunks // 2
    assert r.fetched == r.chunks - r.from_seeds
    assert (tmp_path / "v2.img").read_bytes() == image_pair.img2.read_bytes()


class _Interrupting(FileSource):
    """Delivers ``limit`` chunks (one per span), then fails like a dropped link."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path)
        self.limit = limit
        self.delivered: list[Span] = []

    def fetch(self, spans: Sequence[Span], on_span: Callable[[Span, memoryview], None]) -> None:
        for part in (p for span in spans for p in span.parts):
            if len(self.delivered) == self.limit:
                raise ConnectionResetError("link dropped")
            one = Span(part.start, part.end, (part,))
            on_span(one, memoryview(self.read(part.start, part.end)))
            self.delivered.append(one)


def test_interrupted_clone_resumes_without_refetching(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    src = _Interrupting(image_pair.arc1, limit=20)
    with pytest.raises(ConnectionResetError):
        clone(src, store, "v1")
    src.close()
    assert not (tmp_path / "store" / "v1").exists()  # no description until complete
    got = sum(len(s.parts) for s in src.delivered)
    assert got > 0
    r = _clone(image_pair.arc1, store, "v1", output=str(tmp_path / "out"))
    assert r.from_store == got
    assert r.fetched == r.chunks - got
    assert (tmp_path / "out").read_bytes() == image_pair.img1.read_bytes()


def test_corrupted_chunk_is_never_stored(image_pair: ImagePair, tmp_path: Path) -> None:
    arc = bytearray(image_pair.arc1.read_bytes())
    h = decode_header(arc)
    from btrdelta.chunk.archive import decode_index

    index = decode_index(h, arc[h.index_offset : h.index_offset + h.index_size])
    victim = max(range(h.chunk_count), key=lambda e: index.comp_sizes[e])
    mid = index.offsets[victim] + index.comp_sizes[victim] // 2
    arc[mid] ^= 0x55
    bad = tmp_path / "bad.cba"
    bad.write_bytes(bytes(arc))
    store = ChunkStore(tmp_path / "store")
    with pytest.raises(StreamFormatError) as info:  # zstd checksum or BLAKE3 mismatch
        _clone(bad, store, "v1")
    assert info.value.index == victim
    assert not store.has(index.digests[victim])
    assert not (tmp_path / "store" / "v1").exists()
    for digest, path in store.iter_chunks():  # every stored chunk is good
        assert chunk_digest(Path(path).read_bytes()) == digest


def test_truncated_archive_fails_clearly(image_pair: ImagePair, tmp_path: Path) -> None:
    short = tmp_path / "short.cba"
    short.write_bytes(image_pair.arc1.read_bytes()[:5000])
    with pytest.raises(StreamFormatError, match="truncated"):
        _clone(short, ChunkStore(tmp_path / "s"), "x")


def test_verify_and_gc(image_pair: ImagePair, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")
    _clone(image_pair.arc2, store, "v2")
    assert store.descriptions() == ["v1", "v2"]
    v1, v2 = store.read_description("v1")[1], store.read_description("v2")[1]
    only_v1 = set(v1.digests) - set(v2.digests)
    assert only_v1
    # damage one chunk: verify names it
    victim = next(iter(only_v1))
    Path(store.chunk_path(victim)).write_bytes(b"garbage")
    report = store.verify("v1")
    assert report.bad == [victim]
    assert not store.verify("v2").bad
    os.unlink(store.description_path("v1"))
    (Path(store.chunks_dir) / "00").mkdir(exist_ok=True)
    (Path(store.chunks_dir) / "00" / ".tmp-123-456").write_bytes(b"leftover")
    gc = store.gc()
    assert gc.removed == len(only_v1)
    assert not any(store.has(d) for d in only_v1)
    assert store.verify("v2").ok
    assert not (Path(store.chunks_dir) / "00" / ".tmp-123-456").exists()
    with pytest.raises(MissingBaseError):
        store.read_description("v1")


def test_missing_chunk_is_reported(image_pair: ImagePair, tmp_path: Path) -> None:
    from btrdelta.chunk.store import ImageReader

    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")
    h, index = store.read_description("v1")
    os.unlink(store.chunk_path(index.digests[index.order[0]]))
    reader = ImageReader(store, index)
    with pytest.raises(MissingBaseError):
        reader.pread(10, 0)
    assert reader.pread(10, h.image_size - 10) == image_pair.img1.read_bytes()[-10:]
    reader.close()
    shutil.rmtree(tmp_path / "store")


def test_output_digest_is_checked(image_pair: ImagePair, tmp_path: Path) -> None:
    from btrdelta.chunk.clone import write_output

    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")
    h, index = store.read_description("v1")
    # swap a chunk file for another stored chunk of the same length: hashes no longer match
    digest = index.digests[0]
    data = bytearray(Path(store.chunk_path(digest)).read_bytes())
    data[0] ^= 1
    Path(store.chunk_path(digest)).write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        write_output(store, index, h, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_output_copies_from_seed(image_pair: ImagePair, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    out = tmp_path / "v2.img"
    r = _clone(image_pair.arc2, store, "v2", seeds=[str(image_pair.img1)], output=str(out))
    assert out.read_bytes() == image_pair.img2.read_bytes()
    size = image_pair.img2.stat().st_size
    assert r.out_in_place == 0  # a new file: nothing is in place
    assert r.out_from_seeds + r.out_from_store == size
    # every image position whose chunk v1 holds came from the seed, the rest from the store
    v1 = {chunk_digest(v) for _, v in iter_chunks(image_pair.img1.read_bytes(), PARAMS)}
    v2 = image_pair.img2.read_bytes()
    expected = sum(len(v) for _, v in iter_chunks(v2, PARAMS) if chunk_digest(v) in v1)
    assert r.out_from_seeds == expected > size // 2


def test_output_that_is_the_seed_is_updated_in_place(
    image_pair: ImagePair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")  # the store already has v1's chunks
    target = tmp_path / "partition.img"  # "the A partition", updated to v2 where it is
    old = image_pair.img1.read_bytes()
    target.write_bytes(old + b"junk past the new end" * 1000)
    inode = target.stat().st_ino
    writes: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def spy(fd: int, data: bytes | memoryview, offset: int) -> int:
        n = real_pwrite(fd, data, offset)
        writes.append((offset, offset + n))
        return n

    monkeypatch.setattr(os, "pwrite", spy)
    r = _clone(image_pair.arc2, store, "v2", seeds=[str(target)], output=str(target))
    monkeypatch.undo()
    new = image_pair.img2.read_bytes()
    assert target.read_bytes() == new  # bit-perfect, trailing junk cut off
    assert target.stat().st_ino == inode  # the same file, not a replacement
    # oracle: chunks of v2 whose bytes v1 has at the same offset are left alone, no others
    keep = [(o, o + len(v)) for o, v in iter_chunks(new, PARAMS) if old[o : o + len(v)] == v]
    assert r.out_in_place == sum(b - a for a, b in keep) > len(new) // 5
    written = sum(b - a for a, b in writes)
    assert written == len(new) - r.out_in_place
    for a, b in keep:
        assert not any(wa < b and a < wb for wa, wb in writes), (a, b)


def test_in_place_output_never_reads_what_it_overwrote(tmp_path: Path) -> None:
    # v2 swaps v1's halves: every chunk is in the seed, but at another offset, which the
    # in-place writes destroy; those chunks must come from the store
    from btrdelta.chunk.compress import compress_image

    params = ChunkerParams.from_avg(4096)
    old = random.Random(5).randbytes(300_000)
    new = old[150_000:] + old[:150_000]
    (tmp_path / "new.img").write_bytes(new)
    with open(tmp_path / "new.cba", "wb") as f:
        compress_image(tmp_path / "new.img", f, params=params)
    target = tmp_path / "target"
    target.write_bytes(old)
    store = ChunkStore(tmp_path / "store")
    r = _clone(tmp_path / "new.cba", store, "new", seeds=[str(target)], output=str(target))
    assert target.read_bytes() == new
    assert r.from_seeds > r.chunks // 2  # the seed supplied chunks to the store
    assert r.out_from_seeds == 0  # but never to its own overwritten copy
    assert r.out_from_store + r.out_in_place == len(new)


@pytest.mark.btrfs
def test_block_device_seed_is_updated_in_place(image_pair: ImagePair, tmp_path: Path) -> None:
    # the A/B update on a real block device (a loop device over a copy of v1)
    import subprocess

    if os.geteuid() != 0 or shutil.which("losetup") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("root and losetup are required under CI")
        pytest.skip("needs root and losetup")
    backing = tmp_path / "disk.img"
    shutil.copyfile(image_pair.img1, backing)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        store = ChunkStore(tmp_path / "store")
        r = _clone(image_pair.arc2, store, "v2", seeds=[dev], output=dev)
        with open(dev, "rb") as f:
            assert f.read() == image_pair.img2.read_bytes()
        assert r.out_in_place > 0
        assert r.out_from_seeds == 0  # the only seed is the output itself
        assert r.out_in_place + r.out_from_store == image_pair.img2.stat().st_size
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert backing.read_bytes() == image_pair.img2.read_bytes()
