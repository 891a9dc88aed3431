"""The chunk store on its own: lock modes, durable creation, damage found by check."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrdelta.chunk.chunker import chunk_digest
from btrdelta.chunk.store import ChunkStore, StoreBusyError
from btrdelta.errors import ChecksumError, MissingBaseError
from tests.conftest import Children


def _holder(children: Children, store: Path, exclusive: bool) -> subprocess.Popen[str]:
    """Another process holding the store's lock until its stdin closes."""
    code = (
        "import sys\nfrom btrdelta.chunk.store import ChunkStore\n"
        f"with ChunkStore({str(store)!r}).locked(exclusive={exclusive}):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    proc = children.start([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()


def test_lock_modes_exclude_what_they_must(tmp_path: Path, children: Children) -> None:
    store = ChunkStore(tmp_path / "store")
    with pytest.raises(MissingBaseError), store.locked():  # no store, and not asked to create
        pass
    with store.locked(create=True):
        pass
    clone = _holder(children, tmp_path / "store", exclusive=False)  # a clone or verify running
    try:
        with store.locked():  # another clone may run alongside
            pass
        t = time.monotonic()
        with pytest.raises(StoreBusyError, match="busy"), store.locked(exclusive=True, wait=0.3):
            pass  # gc is refused ...
        assert time.monotonic() - t >= 0.3  # ... after waiting as long as asked
    finally:
        _release(clone)
    with store.locked(exclusive=True):  # and runs once the clone is done
        pass
    gc = _holder(children, tmp_path / "store", exclusive=True)
    try:
        with pytest.raises(StoreBusyError), store.locked():
            pass  # nothing runs during gc
    finally:
        _release(gc)


def test_put_is_checked_durable_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    data = random.Random(1).randbytes(10_000)
    digest = chunk_digest(data)
    with pytest.raises(ChecksumError):
        store.put(digest, data[:-1])
    assert not store.has(digest)
    assert store.put(digest, data)
    assert not store.put(digest, data)  # already there: untouched
    store.sync()
    path = Path(store.chunk_path(digest))
    assert path.read_bytes() == data
    assert oct(path.stat().st_mode & 0o777) == oct(0o444 & ~_umask())
    assert sorted(p.name for p in path.parent.iterdir()) == [digest.hex()]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_check_names_each_kind_of_damage(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    rnd = random.Random(2)
    chunks = [rnd.randbytes(5000 + i) for i in range(6)]
    sizes = {chunk_digest(c): len(c) for c in chunks}
    for c in chunks:
        store.put(chunk_digest(c), c)
    store.sync()
    ids = list(sizes)
    paths = [Path(store.chunk_path(d)) for d in ids]
    for p in paths:
        p.chmod(0o644)
    paths[0].write_bytes(b"")
    paths[1].write_bytes(chunks[1][:100])
    paths[2].write_bytes(chunks[2] + b"!")
    flipped = bytearray(chunks[3])
    flipped[77] ^= 4
    paths[3].write_bytes(bytes(flipped))
    paths[4].unlink()
    found = store.check(sizes)
    assert found.damaged == {ids[0]: "empty", ids[1]: "short", ids[2]: "long",
                             ids[3]: "content"}
    assert found.missing == [ids[4]]
    assert found.ok == {ids[5]}
    assert all(store.drop(d) for d in found.damaged)
    assert not any(store.has(d) for d in found.damaged)


def test_an_interrupt_drops_the_unnamed_batch_without_waiting_for_a_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) inside :meth:`ChunkStore.writing` ends it at once: the batch not
    yet named is dropped (fetched again next time), no ``syncfs`` is waited for. Here the
    disk is slow: ``syncfs`` (which writes out the whole file system's dirty data: ~2 s
    beside one writer of 1.5 GB, up to 6.7 s at load 9) waits until the test lets it go.
    Before, the interrupted ``update`` waited for the background flush's ``syncfs``, then
    made its own."""
    import threading

    from btrdelta.chunk import store as store_mod

    real = store_mod._syncfs
    in_sync, go = threading.Event(), threading.Event()

    def slow_syncfs(fd: int) -> bool:
        in_sync.set()
        go.wait(20)
        return real(fd)

    monkeypatch.setattr(store_mod, "_syncfs", slow_syncfs)
    store = ChunkStore(tmp_path / "store")
    rng = random.Random(2)
    first, second = rng.randbytes(5000), rng.randbytes(6000)
    backstop = threading.Timer(3, go.set)  # (before: the interrupt waited for it)
    took = None
    try:
        with store.writing():
            store.put(chunk_digest(first), first)
            assert in_sync.wait(20)  # the batch's flush (half a second old) is in syncfs
            store.put(chunk_digest(second), second)  # the next batch, not named yet
            backstop.start()
            t0 = time.monotonic()
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # (went through)
        took = time.monotonic() - t0
    finally:
        go.set()
        backstop.cancel()
    assert took is not None
    assert took < 2, took
    deadline = time.monotonic() + 20  # the first batch: named once its syncfs returned
    while not store.has(chunk_digest(first)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [d for d, _ in store.iter_chunks()] == [chunk_digest(first)]
    assert Path(store.chunk_path(chunk_digest(first))).read_bytes() == first
