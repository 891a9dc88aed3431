"""The clone workflow on local archives: store, seeds, resume, damage, and straight-to-output
clones (new file, in place, moved chunks), checked byte for byte against the real images."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from btrdelta.chunk.archive import decode_header, decode_index
from btrdelta.chunk.chunker import ChunkerParams, chunk_digest, iter_chunks
from btrdelta.chunk.compress import compress_image
from btrdelta.chunk.source import FileSource
from btrdelta.chunk.store import ChunkStore, ImageReader
from btrdelta.errors import BtrdeltaError, MissingBaseError, StreamFormatError
from btrdelta.transport.plan import Span
from btrdelta.update.clone import CloneReport, clone_image
from tests.chunk.images import PARAMS, ImagePair


def _clone(arc: Path | FileSource, store: ChunkStore | None, name: str = "img",
           **kw: object) -> CloneReport:
    target = None if store is None else f"{store.root}/{name}"
    location = arc if isinstance(arc, FileSource) else str(arc)
    return clone_image(location, target=target, **kw)  # type: ignore[arg-type]


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
    assert r2.fetch_bytes + r2.index_bytes < image_pair.arc2.stat().st_size / 3
    assert store.verify("v2").ok
    assert store.verify("v1").ok
    assert store.source_of("v2") == str(image_pair.arc2)
    again = _clone(image_pair.arc2, store, "v2")  # a second clone fetches nothing
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
        _clone(src, store, "v1")
    src.close()
    assert not (tmp_path / "store" / "v1").exists()  # no description until complete
    got = sum(len(s.parts) for s in src.delivered)
    r = _clone(image_pair.arc1, store, "v1", output=str(tmp_path / "out"))
    assert r.from_store == got > 0
    assert r.fetched == r.chunks - got
    assert (tmp_path / "out").read_bytes() == image_pair.img1.read_bytes()


def test_corrupted_chunk_is_never_stored(image_pair: ImagePair, tmp_path: Path) -> None:
    arc = bytearray(image_pair.arc1.read_bytes())
    h = decode_header(arc)
    index = decode_index(h, arc[h.index_offset : h.index_offset + h.index_size])
    victim = max(range(h.chunk_count), key=lambda e: index.comp_sizes[e])
    arc[index.offsets[victim] + index.comp_sizes[victim] // 2] ^= 0x55
    bad = tmp_path / "bad.bdar"
    bad.write_bytes(bytes(arc))
    store = ChunkStore(tmp_path / "store")
    with pytest.raises(StreamFormatError) as info:  # zstd checksum or BLAKE3 mismatch
        _clone(bad, store, "v1")
    assert info.value.index == victim
    assert not store.has(index.digests[victim])
    assert not (tmp_path / "store" / "v1").exists()
    for digest, path in store.iter_chunks():  # every stored chunk is good
        assert chunk_digest(Path(path).read_bytes()) == digest
    with pytest.raises(StreamFormatError):  # without a store: no output left behind
        _clone(bad, None, output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_truncated_archive_fails_clearly(image_pair: ImagePair, tmp_path: Path) -> None:
    short = tmp_path / "short.bdar"
    short.write_bytes(image_pair.arc1.read_bytes()[:5000])
    with pytest.raises(StreamFormatError, match="archive is 5000 bytes, its header says"):
        _clone(short, ChunkStore(tmp_path / "s"), "x")


def test_damaged_chunks_are_detected_dropped_and_refetched(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")
    _, index = store.read_description("v1")
    victims = index.digests[:4]
    empty, short, flipped, longer = (Path(store.chunk_path(d)) for d in victims)
    empty.write_bytes(b"")  # what a crash can leave
    short.write_bytes(short.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    longer.write_bytes(longer.read_bytes() + b"x")
    report = store.verify("v1")
    assert set(report.bad) == set(victims)
    assert [report.reasons[d] for d in victims] == ["empty", "short", "content", "long"]
    r = _clone(image_pair.arc1, store, "v1", output=str(tmp_path / "out"))
    assert r.damaged == 4
    assert r.fetched == 4
    assert store.verify("v1").ok
    assert (tmp_path / "out").read_bytes() == image_pair.img1.read_bytes()


def test_gc_removes_unused_damaged_and_leftovers(image_pair: ImagePair, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")
    _clone(image_pair.arc2, store, "v2")
    assert store.descriptions() == ["v1", "v2"]
    v1, v2 = store.read_description("v1")[1], store.read_description("v2")[1]
    only_v1 = set(v1.digests) - set(v2.digests)
    shared = next(iter(set(v1.digests) & set(v2.digests)))
    Path(store.chunk_path(shared)).write_bytes(b"")
    os.unlink(store.description_path("v1"))
    (Path(store.chunks_dir) / "00").mkdir(exist_ok=True)
    (Path(store.chunks_dir) / "00" / ".tmp-123-456").write_bytes(b"leftover")
    gc = store.gc()
    assert gc.removed == len(only_v1) + 1
    assert gc.damaged == 1
    assert not any(store.has(d) for d in [*only_v1, shared])
    assert not (Path(store.chunks_dir) / "00" / ".tmp-123-456").exists()
    assert store.source_of("v1") is None  # the record of a removed image goes too
    assert store.verify("v2").missing == [shared]
    with pytest.raises(MissingBaseError):
        store.read_description("v1")


def test_missing_chunk_is_reported(image_pair: ImagePair, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    _clone(image_pair.arc1, store, "v1")
    h, index = store.read_description("v1")
    os.unlink(store.chunk_path(index.digests[index.order[0]]))
    reader = ImageReader(store, index)
    with pytest.raises(MissingBaseError):
        reader.pread(10, 0)
    assert reader.pread(10, h.image_size - 10) == image_pair.img1.read_bytes()[-10:]
    reader.close()


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


def _spy_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    writes: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def spy(fd: int, data: bytes | memoryview, offset: int) -> int:
        n = real_pwrite(fd, data, offset)
        writes.append((offset, offset + n))
        return n

    monkeypatch.setattr(os, "pwrite", spy)
    return writes


@pytest.mark.parametrize("with_store", [True, False])
def test_output_that_is_the_seed_is_updated_in_place(
    image_pair: ImagePair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_store: bool
) -> None:
    store = ChunkStore(tmp_path / "store") if with_store else None
    if store is not None:
        _clone(image_pair.arc1, store, "v1")  # the store already has v1's chunks
    target = tmp_path / "partition.img"  # "the A partition", updated to v2 where it is
    old = image_pair.img1.read_bytes()
    target.write_bytes(old + b"junk past the new end" * 1000)
    inode = target.stat().st_ino
    writes = _spy_writes(monkeypatch)
    r = _clone(image_pair.arc2, store, "v2", seeds=[str(target)], output=str(target))
    monkeypatch.undo()
    new = image_pair.img2.read_bytes()
    assert target.read_bytes() == new  # bit-perfect, trailing junk cut off
    assert target.stat().st_ino == inode  # the same file, not a replacement
    # oracle: chunks of v2 whose bytes v1 has at the same offset are left alone, no others
    keep = [(o, o + len(v)) for o, v in iter_chunks(new, PARAMS) if old[o : o + len(v)] == v]
    assert r.out_in_place >= sum(b - a for a, b in keep) > len(new) // 5
    written = sum(b - a for a, b in writes)
    assert written == len(new) - r.out_in_place
    for a, b in keep:
        assert not any(wa < b and a < wb for wa, wb in writes), (a, b)
    if store is None:  # nothing but v2's new chunks came over the wire, the rest moved
        assert r.missing_bytes < len(new) // 3
        assert r.out_in_place + r.out_moved + r.out_fetched == len(new)


def _swapped_halves(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    params = ChunkerParams.from_avg(4096)
    old = random.Random(5).randbytes(300_000)
    new = old[150_000:] + old[:150_000]
    (tmp_path / "new.img").write_bytes(new)
    with open(tmp_path / "new.bdar", "wb") as f:
        compress_image(tmp_path / "new.img", f, params=params)
    return old, new, tmp_path / "new.bdar"


def test_in_place_output_with_a_store_never_reads_what_it_overwrote(tmp_path: Path) -> None:
    # v2 swaps v1's halves: every chunk is in the seed, but at another offset, which the
    # in-place writes destroy; with a store those chunks come from the store
    old, new, arc = _swapped_halves(tmp_path)
    target = tmp_path / "target"
    target.write_bytes(old)
    store = ChunkStore(tmp_path / "store")
    r = _clone(arc, store, "new", seeds=[str(target)], output=str(target))
    assert target.read_bytes() == new
    assert r.from_seeds > r.chunks // 2  # the seed supplied chunks to the store
    assert r.out_from_seeds == 0  # but never to its own overwritten copy
    assert r.out_from_store + r.out_in_place == len(new)


def test_in_place_output_without_a_store_moves_chunks_in_a_safe_order(tmp_path: Path) -> None:
    # the same swap with no store: the chunks move within the output; every move must read
    # its source before another write overwrites it (a cycle: one side goes through memory).
    # A move that read overwritten bytes would fail its id check and be fetched instead.
    old, new, arc = _swapped_halves(tmp_path)
    target = tmp_path / "target"
    target.write_bytes(old)
    r = _clone(arc, None, output=str(target), in_place=True)
    assert target.read_bytes() == new
    assert r.out_moved > len(new) * 0.9  # the bulk moved within the output
    assert r.fetched == r.fetch_chunks  # no move had to be fetched after all
    assert r.out_fetched <= r.missing_bytes < len(new) // 10  # only chunks cut anew
    assert r.out_from_seeds == r.out_from_store == 0


def test_store_less_clone_to_a_new_file_reuses_its_old_content(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    out = tmp_path / "v2.img"
    shutil.copyfile(image_pair.img1, out)  # an older version already at the output path
    inode = out.stat().st_ino
    dry = _clone(image_pair.arc2, None, output=str(out), dry_run=True)
    assert out.read_bytes() == image_pair.img1.read_bytes()
    r = _clone(image_pair.arc2, None, output=str(out))
    assert out.read_bytes() == image_pair.img2.read_bytes()
    assert out.stat().st_ino != inode  # replaced whole, atomically
    assert r.fetch_bytes == dry.fetch_bytes
    assert r.out_from_seeds > image_pair.img2.stat().st_size // 2
    assert r.out_fetched == r.missing_bytes  # a new file: every fetched byte is written
    assert not list(tmp_path.glob(".*"))


def test_clone_needs_a_target(image_pair: ImagePair) -> None:
    with pytest.raises(BtrdeltaError, match="nothing to clone into"):
        _clone(image_pair.arc1, None)


@pytest.mark.btrfs
@pytest.mark.parametrize("with_store", [True, False])
def test_block_device_is_updated_in_place(
    image_pair: ImagePair, tmp_path: Path, with_store: bool
) -> None:
    # the A/B update on a real block device (a loop device over a copy of v1)
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("root and losetup are required under CI")
        pytest.skip("needs root and losetup")
    backing = tmp_path / "disk.img"
    shutil.copyfile(image_pair.img1, backing)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        store = ChunkStore(tmp_path / "store") if with_store else None
        seeds = [dev] if with_store else []  # without: the device's old content is used anyway
        r = _clone(image_pair.arc2, store, "v2", seeds=seeds, output=dev)
        with open(dev, "rb") as f:
            assert f.read() == image_pair.img2.read_bytes()
        assert r.out_in_place > image_pair.img2.stat().st_size // 5
        assert r.out_from_seeds == 0  # the only seed is the output itself
        assert sum((r.out_in_place, r.out_from_store, r.out_moved, r.out_fetched)) \
            == image_pair.img2.stat().st_size
        if store is None:
            assert r.out_fetched <= r.missing_bytes < image_pair.img2.stat().st_size // 3
            assert not (tmp_path / "store").exists()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert backing.read_bytes() == image_pair.img2.read_bytes()
