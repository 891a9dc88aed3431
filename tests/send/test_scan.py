"""The reading half of a send: the parent tree scanned in a child process (send/scan.py).

Each case runs in a fresh interpreter: :class:`TreeScan` forks only while no other thread
runs, which a long pytest session cannot promise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from btrdelta.send.scan import hash_contents
from btrdelta.send.walk import scan_tree

_SCRIPT = """
import os, signal, sys
from btrdelta.send.scan import TreeScan
scan = TreeScan(sys.argv[1], sys.argv[2], workers=2)
try:
    forked = scan._forked
    assert forked is not None, "no child was forked"
    if sys.argv[3] == "kill":
        os.kill(forked._pid, signal.SIGKILL)
    tree = scan.old_tree()
    assert tree is not None
    assert scan._forked is None
    scan.hasher.wait()  # a tree scanned here is hashed by the threads with the new one
    print(tree.identity().hex())
finally:
    scan.close()
"""


def _tree(root: Path) -> Path:
    for d in range(3):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(20):
            (sub / f"f{i}").write_bytes(os.urandom(100 + i * 37))
    os.link(root / "d0" / "f0", root / "link")
    os.symlink("d1/f1", root / "sym")
    return root


@pytest.mark.parametrize("child", ["kill", "keep"])
def test_the_parent_tree_whether_the_child_lives_or_is_killed(
    tmp_path: Path, child: str
) -> None:
    old = _tree(tmp_path / "old")
    new = _tree(tmp_path / "new")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(new), str(old), child],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    expected = scan_tree(old)
    hash_contents([expected], workers=1)
    assert done.stdout.strip() == expected.identity().hex()


@pytest.mark.parametrize("workers", [1, 2])
def test_small_files_of_the_sent_tree_are_kept_as_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    from btrdelta.send import hashing as scan_mod
    from btrdelta.send.scan import ContentHasher, TreeScan

    root = tmp_path / "t"
    root.mkdir()
    (root / "small").write_bytes(b"a" * 5000)
    (root / "empty").write_bytes(b"")
    (root / "big").write_bytes(os.urandom(scan_mod.KEEP_MAX + 1))
    with open(root / "holes", "wb") as f:  # a hole first: not kept (the send reads its ranges)
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"x" * 4096)
    for i in range(6):
        (root / f"f{i}").write_bytes(bytes([i]) * 3000)
    monkeypatch.setattr(scan_mod, "KEEP_BUDGET", 5000 + 3 * 3000)  # room for some only
    ts = TreeScan(root, workers=workers, seed=7)
    ts.hasher.wait()
    plain = scan_tree(root)
    ref = ContentHasher(1, seed=7)
    ref.submit(plain)  # without keep
    ref.wait()
    by_path = {n.path: n for n in ts.new.nodes.values() if n.is_reg}
    kept = {p: ts.hasher.take(n) for p, n in by_path.items()}
    assert kept[b"empty"] == b""
    assert kept[b"big"] is None
    assert kept[b"holes"] is None
    got = {p: c for p, c in kept.items() if c}
    assert sum(map(len, got.values())) <= scan_mod.KEEP_BUDGET
    assert len(got) == 4  # the smallest first: four of 3000 bytes, not the one of 5000
    assert kept[b"small"] is None
    for path, content in got.items():
        assert content == (root / os.fsdecode(path)).read_bytes()
    assert ts.hasher.take(by_path[b"empty"]) is None  # taken once
    assert ts.hasher._kept_bytes == 0
    assert not ref._kept
    for n in plain.nodes.values():  # the same digests as without keeping
        if n.is_reg:
            m = by_path[n.path]
            assert (m.digest, m.blocks, m.bdigest, m.segments) == \
                (n.digest, n.blocks, n.bdigest, n.segments)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 12288, 70_000])
def test_digests_of_a_whole_content_are_the_block_hashers(size: int) -> None:
    from btrdelta.send.onepass import BlockHasher, digests_of

    data = os.urandom(size)
    hasher = BlockHasher(5)
    if size:
        hasher.update(0, data)
    assert digests_of(data, 5) == hasher.finish(size)


def test_the_keep_budget_follows_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from btrdelta.send import hashing

    pages = {"SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(hashing.os, "sysconf", lambda name: pages[name])
    for ram, want in ((256 << 20, 16 << 20), (64 << 20, 8 << 20), (32 << 30, 64 << 20)):
        pages["SC_PHYS_PAGES"] = ram // 4096
        assert hashing.keep_budget() == want


def test_hashing_threads_keep_order_errors_and_stop(tmp_path: Path) -> None:
    """The hashing threads (send/hashing.py ``_Batches``, not ``concurrent.futures``): results
    in the order queued, at most ``workers`` threads, an error raised by ``result``, what was
    not started (or queued while it runs) dropped on ``close`` and every thread joined."""
    import threading

    from btrdelta.errors import BtrdeltaError
    from btrdelta.send.hashing import _Batches

    gate = threading.Event()
    running: set[int] = set()
    peak = 0

    def run(batch: list[tuple[object, bytes]], keeping: bool) -> int:
        nonlocal peak
        running.add(threading.get_ident())
        peak = max(peak, len(running))
        gate.wait(5)
        running.discard(threading.get_ident())
        if batch and batch[0][1] == b"bad":
            raise BtrdeltaError("cannot read file", path=b"bad")
        return len(batch) + keeping

    pool = _Batches(run, 2)
    jobs = [pool.submit([(None, b"x")] * i, False) for i in range(1, 6)]
    bad = pool.submit([(None, b"bad")], True)
    gate.set()
    assert [j.result() for j in jobs] == [1, 2, 3, 4, 5]
    with pytest.raises(BtrdeltaError, match="cannot read file"):
        bad.result()
    assert peak <= 2
    pool.close()
    assert not any(t.is_alive() for t in pool._threads)
    # queued again after the threads ended: new ones start
    assert pool.submit([(None, b"y")], True).result() == 2
    # close while one runs: the running one finishes, the queued one is dropped
    gate.clear()
    one = _Batches(run, 1)
    first, second = one.submit([(None, b"a")], False), one.submit([(None, b"b")], False)
    while not running:
        threading.Event().wait(0.01)
    closer = threading.Thread(target=one.close)
    closer.start()
    while one._queue:
        threading.Event().wait(0.01)
    # queued while close() waits for the running one (a walk still publishing): dropped,
    # not left queued for a thread close() would join before it started
    late = one.submit([(None, b"c")], False)
    with pytest.raises(BtrdeltaError, match="hashing stopped"):
        late.result()
    gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert first.result() == 1
    with pytest.raises(BtrdeltaError, match="hashing stopped"):
        second.result()
    pool.close()


def test_an_idle_hashing_thread_takes_the_next_batch(tmp_path: Path) -> None:
    """A hashing thread that found the queue empty waits for the next batch (a full send's
    walk queues them as it goes) instead of ending and being started again; close() ends
    it at once."""
    import threading
    import time

    from btrdelta.send.hashing import _LINGER, _Batches

    ran: list[int] = []

    def run(batch: list[tuple[object, bytes]], keeping: bool) -> int:
        ran.append(threading.get_ident())
        return len(batch)

    pool = _Batches(run, 2)
    for i in range(1, 6):
        assert pool.submit([(None, b"x")] * i, False).result() == i
        deadline = time.monotonic() + _LINGER / 2
        while not pool._idle:  # (the thread is waiting again: a fixed sleep may end first
            assert time.monotonic() < deadline  # on a loaded machine, then a second starts)
            time.sleep(0.001)
    assert len(pool._threads) == 1
    assert len(set(ran)) == 1
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < _LINGER / 2
    assert not any(t.is_alive() for t in pool._threads)


def _many(root: Path, n: int = 300) -> None:
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(n // 3):
            (root / f"d{d}" / f"f{i:03}").write_bytes(bytes([i % 256]) * (100 + 97 * i))
    (root / "d2" / "big").write_bytes(b"b" * 40_000)
    (root / "d2" / "big2").write_bytes(b"b" * 40_000)  # a CLONE of d2/big, as before


def _stream(root: Path, *, ordered: bool, workers: int) -> tuple[bytes, list[bytes], Any]:
    from uuid import UUID

    from btrdelta.send.emit import Sender, StreamIds
    from btrdelta.send.scan import TreeScan, inode_order
    from btrdelta.stream.writer import StreamWriter

    scan = TreeScan(root, workers=workers, seed=3, order=inode_order if ordered else None)
    sender = Sender(root, scan=scan, version=2,
                    ids=StreamIds(uuid=UUID(int=1), ctransid=9))
    out: list[bytes] = []
    writer = StreamWriter(lambda b: out.append(bytes(b)), 2)
    paths = []
    for rec in sender.records():
        writer.write(rec)
        path = getattr(rec, "path", b"")
        if rec.__class__.__name__ in ("Write", "Clone") and path not in paths:
            paths.append(path)
    return b"".join(out), paths, sender


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_send_hashes_in_stream_order_and_streams_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A full record-mode send (``TreeScan(order=inode_order)``) sends its header before the
    files are hashed, hashes them in the order they are sent, and makes the same stream (and
    digests) as one that hashed every file first."""
    import threading
    from uuid import UUID

    from btrdelta.send import hashing
    from btrdelta.send.emit import Sender, StreamIds
    from btrdelta.send.scan import TreeScan, inode_order

    root = tmp_path / "t"
    _many(root)
    _stream(root, ordered=False, workers=workers)  # (relatime: the directories read once)
    before, before_paths, plain = _stream(root, ordered=False, workers=workers)
    assert not plain.streaming

    gate = threading.Event()
    hashed: list[bytes] = []
    late: list[bool] = []
    real = hashing._hash_file_blocks

    def spy(path: bytes, *args: Any, **kwargs: Any) -> Any:
        name = path[len(os.fsencode(root)) + 1:]
        if name == b"d2/f099":  # the last small file sent: hashed after the header only
            late.append(gate.wait(10))
        hashed.append(name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "_hash_file_blocks", spy)
    scan = TreeScan(root, workers=workers, seed=3, order=inode_order)
    sender = Sender(root, scan=scan, version=2, ids=StreamIds(uuid=UUID(int=1), ctransid=9))
    assert sender.streaming
    records = sender.records()
    next(records)  # the header, with the last file not hashed yet
    gate.set()
    rest = list(records)
    assert late == [True]
    assert rest[-1].__class__.__name__ == "End"
    assert sender.estimate == sum(n.size for n in sender.new.nodes.values() if n.is_reg)
    if workers == 1:  # hashed in this thread, each file when it is sent: in that order
        assert hashed == before_paths
    monkeypatch.setattr(hashing, "_hash_file_blocks", real)
    after, _paths, streamed = _stream(root, ordered=True, workers=workers)
    assert streamed.streaming
    assert after == before  # the same bytes, CLONE of the copy included
    assert any(p.endswith(b"big2") for p in before_paths)
    for a, b in zip(sorted(plain.new.nodes.values(), key=lambda n: n.path),
                    sorted(streamed.new.nodes.values(), key=lambda n: n.path), strict=True):
        assert (a.path, a.digest, a.blocks, a.bdigest, a.segments, a.flags) == \
            (b.path, b.digest, b.blocks, b.bdigest, b.segments, b.flags)
    assert streamed.new.identity() == plain.new.identity()


@pytest.mark.parametrize("seed", [None, 5])
def test_files_opened_ahead_are_closed_and_a_vanished_one_named(
    tmp_path: Path, seed: int | None
) -> None:
    """The hashing threads open the next files of a batch ahead (their reads started); a
    file gone since the scan fails with its path, and no descriptor is left open."""
    from btrdelta.errors import BtrdeltaError
    from btrdelta.send import hashing
    from btrdelta.send.scan import ContentHasher

    root = tmp_path / "t"
    root.mkdir()
    n = hashing._AHEAD * 3
    for i in range(n):
        (root / f"f{i:03}").write_bytes(bytes([i]) * (1000 + i))
    tree = scan_tree(root)
    fds = len(os.listdir("/proc/self/fd"))
    ok = ContentHasher(1, seed=seed)
    ok.submit(tree)
    ok.wait()
    assert all(node.digest for node in tree.nodes.values() if node.is_reg)
    assert len(os.listdir("/proc/self/fd")) == fds
    tree = scan_tree(root)
    (root / f"f{n - 5:03}").unlink()  # opened ahead while the first ones are read
    bad = ContentHasher(1, seed=seed)
    bad.submit(tree)
    with pytest.raises(BtrdeltaError, match=f"f{n - 5:03}"):
        bad.wait()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_streamed_full_send_keeps_every_small_file_while_the_budget_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashed in the order they are sent, small files are taken soon after they are read:
    each one is kept (none opened again by the send) though all of them exceed the budget,
    which only bounds what is kept and not taken yet."""
    from btrdelta.send import emit, hashing

    root = tmp_path / "t"
    _many(root)
    # all small files: 1.5 MB; the largest batch of them (one worker: hashed when the send
    # wants its first file, then taken one by one): 0.6 MB
    monkeypatch.setattr(hashing, "KEEP_BUDGET", 800_000)
    opened: list[bytes] = []
    real = emit.open_file

    def spy(path: bytes) -> int:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(emit, "open_file", spy)
    _data, _paths, sender = _stream(root, ordered=True, workers=1)
    assert opened == []
    assert sender._hasher is not None
    assert sender._hasher._kept_bytes == 0
    _data, _paths, sender = _stream(root, ordered=False, workers=1)
    assert len(opened) > 50  # (the smallest first, while they fit)


def test_a_full_sends_match_pairs_the_roots_only_as_the_whole_matcher_would(
    tmp_path: Path,
) -> None:
    from btrdelta.send import diff
    from btrdelta.send.scan import ROOT, Tree

    root = tmp_path / "t"
    _many(root)
    (root / "link").symlink_to("d0/f001")
    new = scan_tree(root)
    hash_contents([new])
    base = Tree(new.root, {ROOT: new.nodes[ROOT]}, {ROOT: {}})
    fast = diff.match_trees(base, new)
    whole = diff._Matcher(base, new, quick=False, virtual=False)
    whole.same_path_same_content()
    whole.same_content_elsewhere()
    whole.same_path_changed()
    whole.others()
    whole.directories({})
    assert (fast.n2o, fast.o2n, fast.unchanged) == \
        (whole.m.n2o, whole.m.o2n, whole.m.unchanged) == ({ROOT: ROOT}, {ROOT: ROOT}, set())


def test_files_hashed_before_they_are_numbered_are_kept_each(tmp_path: Path) -> None:
    """The files a change sweep finds are hashed before the tree is numbered (every node's
    ``id`` is 0): each file's bytes are still kept for it, and taken by it alone."""
    from btrdelta.send.scan import ContentHasher

    root = tmp_path / "t"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(bytes([65 + i]) * (1000 + i))
    tree = scan_tree(root)
    files = [n for n in tree.nodes.values() if n.is_reg]
    for n in files:
        n.id = 0
    hasher = ContentHasher(1, seed=3)
    hasher.submit(tree, keep=True)
    hasher.wait()
    for i, n in enumerate(files):  # numbered afterwards, as Changes.build does
        n.id = 100 + i
    for n in files:
        assert hasher.take(n) == (root / os.fsdecode(n.path)).read_bytes()
    assert hasher._kept_bytes == 0
    assert not hasher._kept


@pytest.mark.parametrize("workers", [1, 2])
def test_only_the_files_the_predicate_accepts_are_kept(tmp_path: Path, workers: int) -> None:
    """``submit(keep=predicate)`` (an incremental send: new files are sent whole, changed
    ones only where their blocks changed) keeps the bytes of the files it accepts; the
    others are hashed from the one reused buffer, with the same digests."""
    from btrdelta.send.scan import ContentHasher

    root = tmp_path / "t"
    root.mkdir()
    for i in range(6):
        (root / f"f{i}").write_bytes(os.urandom(3000 + 7000 * i))
    tree, plain = scan_tree(root), scan_tree(root)
    hasher, ref = ContentHasher(workers, seed=3), ContentHasher(1, seed=3)
    hasher.submit(tree, keep=lambda n: n.path in (b"f1", b"f4"))
    ref.submit(plain)
    hasher.wait()
    ref.wait()
    files = {n.path: n for n in tree.nodes.values() if n.is_reg}
    kept = {p: hasher.take(n) for p, n in files.items()}
    assert {p for p, c in kept.items() if c is not None} == {b"f1", b"f4"}
    assert kept[b"f4"] == (root / "f4").read_bytes()
    by_path = {n.path: n for n in plain.nodes.values() if n.is_reg}
    for p, n in files.items():
        o = by_path[p]
        assert (n.digest, n.bdigest, n.blocks, n.segments) == \
            (o.digest, o.bdigest, o.blocks, o.segments) != (b"", b"", b"", None)


def test_a_block_of_zeros_is_found_as_counting_every_block_finds_it() -> None:
    """``no_zero_block`` (each block's first word picked, then a block compared) says what
    counting the zeros of every 4 KiB block says (a last, partial block of zeros counts),
    around every edge: runs shorter and longer than a block, across block boundaries,
    aligned or not, at the start and the end."""
    import random

    from btrdelta.tree.content import no_zero_block

    def counted(content: bytes) -> bool:
        n = len(content)
        return all(content.count(0, i, i + 4096) != min(4096, n - i) for i in range(0, n, 4096))

    z = bytes(4096)
    cases = [b"", b"\0", z[:63], z[:64], z, z + b"a", b"a" + z, b"a" + z + z[:4095],
             b"a" * 4095 + z + b"\0", b"a" * 4096 + z, b"a" * 4096 + z[:10],
             b"a" * 4096 + z[:4095] + b"b", z[:4095] + b"a", z[:100] + b"a" * 4000 + z + z,
             (b"\x03" + z[:4095]) * 3, (z[:64] + b"x") * 200]
    rng = random.Random(5)
    for i in range(2000):
        n = rng.randrange(0, 20000 if i % 10 else 300000)  # (past 16 blocks: strided)
        data = bytearray(rng.randbytes(n) if rng.random() < 0.5
                         else bytes(rng.choice((0, 0, 0, 1)) for _ in range(n)))
        for _ in range(rng.randrange(4)):
            at, length = rng.randrange(n + 1), rng.randrange(9000)
            data[at:at + length] = bytes(len(data[at:at + length]))
        cases.append(bytes(data))
    assert sum(not counted(c) for c in cases) > 500  # both answers are well represented
    for content in cases:
        assert no_zero_block(content) == counted(content), len(content)


def test_small_files_with_a_byte_in_every_block_are_kept_without_seeking_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where holes are whole 4 KiB blocks, a small file whose every block holds a byte
    other than zero has none: it is read and kept without ``SEEK_DATA``/``SEEK_HOLE``; one
    with a block of zeros is looked at (written zeros: kept; a hole: not kept), and the
    digests are the same either way."""
    from btrdelta.send import hashing
    from btrdelta.send.scan import _whole_blocks

    files = {
        "random": os.urandom(9000),
        "one": b"\x01",
        "last": b"\0" * 8192 + b"\x02",  # two blocks of zeros: looked at
        "each": (b"\x03" + b"\0" * 4095) * 3,  # a byte in every block: not looked at
        "zeros": b"\0" * 8192,  # written: data, not holes
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "hole", "wb") as f:  # a hole, then data
        f.truncate(4096)
        f.seek(4096)
        f.write(b"h" * 5000)
    assert _whole_blocks(os.fsencode(tmp_path)) == (os.statvfs(tmp_path).f_frsize % 4096 == 0)
    sought: list[int] = []
    real = hashing.data_segments

    def spy(fd: int, size: int) -> list[tuple[int, int]]:
        sought.append(size)
        return real(fd, size)

    monkeypatch.setattr(hashing, "data_segments", spy)
    buf = bytearray(1 << 20)
    for name in [*files, "hole"]:
        path = os.fsencode(tmp_path / name)
        size = os.path.getsize(path)
        sought.clear()
        fast = hashing._hash_file_blocks(path, size, buf, 9, True, whole_blocks=True)
        fast_sought = list(sought)
        plain = hashing._hash_file_blocks(path, size, buf, 9, True)
        assert fast == plain, name
        assert (fast[5] is None) == (name == "hole"), name
        assert bool(fast_sought) == (name in ("last", "zeros", "hole")), name
