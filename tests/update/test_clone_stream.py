"""A clone stores each chunk as soon as its bytes have arrived and checked, named in durable
batches: a kill -9 in the middle of a rate-limited range keeps every chunk named so far (a
re-run fetches only the others), progress advances chunk by chunk while one range is still
arriving, and no chunk name ever points at content that was not made durable first, even
when the sync fails or the process dies between the write and the sync."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrdelta.chunk import store as store_mod
from btrdelta.chunk.archive import decode_header, decode_index
from btrdelta.chunk.store import ChunkStore
from btrdelta.cli import main, progress
from btrdelta.update.clone import clone_image
from tests.chunk.images import ImagePair
from tests.conftest import Children
from tests.update.conftest import Nginx

SRC = str(Path(__file__).parents[2] / "src")


def _index(arc: Path) -> tuple[int, list[bytes], list[int], int]:
    """(header + index bytes a clone reads first, chunk ids, compressed sizes, archive size)."""
    blob = arc.read_bytes()
    h = decode_header(blob)
    index = decode_index(h, blob[h.index_offset : h.index_offset + h.index_size])
    return 160 + h.index_size + h.sig_size, index.digests, list(index.comp_sizes), len(blob)


def _named(store: Path) -> set[Path]:
    return {p for p in (store / "chunks").rglob("*") if p.is_file()}


@pytest.fixture
def www(image_pair: ImagePair, tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    os.link(image_pair.arc2, root / "v2.bdar")
    return root


def _clone(*args: str) -> list[str]:
    return [sys.executable, "-m", "btrdelta", "image", "clone", "--json", *args]


def test_kill_9_inside_one_range_keeps_every_chunk_that_arrived(
    www: Path, image_pair: ImagePair, tmp_path: Path, children: Children
) -> None:
    head, digests, comp, size = _index(image_pair.arc2)
    slow = Nginx(www, tmp_path / "slow", limit_rate="256k")
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": SRC}
    try:
        proc = children.start(_clone(f"{slow.url}/v2.bdar", f"{store}/v2"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not store.exists() or len(_named(store)) < 40:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no chunk was named while its range arrived"
            time.sleep(0.05)
        # nginx logs a request once it has written it whole (the header, the index)
        done_requests = slow.requests(idle=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        slow.stop()
    # the header and the index, and the chunks' range only if nginx had written all of it
    # into the connection's buffers, which a loaded client was still reading (kept, below,
    # is the client's side: fewer chunks than the range holds)
    assert len(done_requests) in (2, 3), done_requests
    assert sum(n for _, n, _ in done_requests[:2]) == head
    kept = _named(store)
    assert 40 <= len(kept) < len(digests)
    whole = ChunkStore(store).check({bytes.fromhex(p.name): p.stat().st_size for p in kept})
    assert not whole.damaged
    assert len(whole.ok) == len(kept)
    assert not (store / "v2").exists()
    fast = Nginx(www, tmp_path / "fast")
    try:
        again = subprocess.run(_clone(f"{fast.url}/v2.bdar", f"{store}/v2"), env=env,
                               capture_output=True, text=True, timeout=120, check=False)
        served = fast.served()
        requests = fast.requests()
    finally:
        fast.stop()
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    have = {bytes.fromhex(p.name) for p in kept}
    lacking = [n for d, n in zip(digests, comp, strict=True) if d not in have]
    assert report["from_store"] == len(kept)
    assert report["fetch_chunks"] == len(lacking)  # only the chunks the kill did not keep
    # the server sent the header, the index and the lacking chunks, nothing else (a
    # multipart reply adds a few hundred bytes of framing per range)
    assert served <= head + sum(lacking) + 512 * report["spans"], (served, requests)
    assert served < size - sum(comp) + sum(lacking) + 512 * report["spans"]
    assert subprocess.run([sys.executable, "-m", "btrdelta", "image", "verify", f"{store}/v2"],
                          env=env, capture_output=True, check=False).returncode == 0


def test_progress_advances_chunk_by_chunk_while_a_range_arrives(
    www: Path, image_pair: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(progress, "_PLAIN_EVERY", 0.0)  # a plain line per update
    printed: list[float] = []
    plain = progress.Progress._print

    def timed(self: progress.Progress, text: str) -> None:
        printed.append(time.monotonic())
        plain(self, text)

    monkeypatch.setattr(progress.Progress, "_print", timed)
    _, digests, _, _ = _index(image_pair.arc2)
    srv = Nginx(www, tmp_path / "nginx", limit_rate="2m")
    try:
        capsys.readouterr()
        start = time.monotonic()
        rc = main(["image", "clone", "--progress", f"{srv.url}/v2.bdar",
                   str(tmp_path / "store" / "v2")])
        took = time.monotonic() - start
        data_requests = len(srv.requests()) - 2  # less the header and the index
    finally:
        srv.stop()
    # the first line came while the first range was arriving, not once it had all arrived
    assert printed[0] - start < took / 3, (printed[0] - start, took)
    err = capsys.readouterr().err
    assert rc == 0, err
    line = re.compile(r"clone fetch: ([\d.]+ \w?i?B) of ([\d.]+ \w?i?B), [\d.]+ \w?i?B/s, "
                      r"(\d+)%, ETA \d+s$")
    fetch = [m for m in map(line.match, err.splitlines()) if m]
    assert 1 <= data_requests <= 4
    # one line per chunk stored (the last one printed twice: by update and close)
    assert len(fetch) >= len(digests), err[-2000:]
    pct = [int(m[3]) for m in fetch]
    assert pct == sorted(pct)
    assert pct[0] < 5
    assert pct[-1] == 100
    assert len({m[1] for m in fetch}) > 10 * data_requests  # advanced inside each range


def test_no_chunk_is_named_before_its_batch_is_durable(
    image_pair: ImagePair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spy on the store: every chunk file is written unnamed, its batch made durable, and
    only then named; small batches and a short delay make many of both kinds of flush."""
    state: dict[int, str] = {}
    durable_calls: list[int] = []
    write, durable, link, discard = (store_mod.write_unnamed, store_mod._durable,
                                     store_mod.link_written, store_mod.discard_written)

    def spy_write(dir_fd: int, name: str, data: bytes) -> tuple[int, str | None]:
        fd, tmp = write(dir_fd, name, data)
        state[fd] = "written"
        return fd, tmp

    def spy_durable(fds: list[int]) -> bool:
        synced = durable(fds)
        durable_calls.append(len(fds))
        for fd in fds:
            assert state[fd] == "written"
            state[fd] = "durable"
        return synced

    def spy_link(fd: int, tmp: str | None, dir_fd: int, name: str, **kw: bool) -> bool:
        assert state.pop(fd) == "durable", "a chunk was named before it was made durable"
        return link(fd, tmp, dir_fd, name, **kw)

    def spy_discard(fd: int, tmp: str | None, dir_fd: int) -> None:
        state.pop(fd, None)
        discard(fd, tmp, dir_fd)

    for name, spy in (("write_unnamed", spy_write), ("_durable", spy_durable),
                      ("link_written", spy_link), ("discard_written", spy_discard)):
        monkeypatch.setattr(store_mod, name, spy)
    monkeypatch.setattr(store_mod, "BATCH_FILES", 7)
    report = clone_image(str(image_pair.arc2), target=f"{tmp_path}/store/v2")
    _, digests, _, _ = _index(image_pair.arc2)
    assert report.fetched == len(digests)
    assert sum(durable_calls) == len(digests)
    assert len(durable_calls) >= len(digests) // 7
    assert not state  # every chunk named (or dropped), no descriptor left
    assert len(_named(tmp_path / "store")) == len(digests)


def test_without_syncfs_each_chunk_is_fsynced_once_named(
    image_pair: ImagePair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel has no syncfs, a chunk's data is fsync-ed before its name and the
    chunk again once named: btrfs logs nothing of an inode without links, so the first
    fsync alone let a later directory fsync log the name with an empty file (fs.atomic,
    docs/device.md section 9). Every fsync is seen with the inode's link count then."""
    synced: list[tuple[int, int]] = []  # (inode, links) at each fsync
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_nlink))
        real_fsync(fd)

    monkeypatch.setattr(store_mod, "_syncfs", lambda fd: False)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    store = tmp_path / "store"
    report = clone_image(str(image_pair.arc1), target=f"{store}/v1")
    monkeypatch.undo()
    named = {p.stat().st_ino for p in _named(store)}
    assert report.fetched == len(named) > 0
    assert {ino for ino, links in synced if links == 0} >= named  # data out before the name
    assert {ino for ino, links in synced if links > 0} >= named, (
        "a chunk was not fsync-ed once it had its name")


def test_a_sync_that_fails_names_no_chunk(
    image_pair: ImagePair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault lands between the writes and the sync: nothing of the batch gets a name,
    nothing is left behind, and a clone after it fetches every chunk."""

    def failing(fds: list[int]) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    store = tmp_path / "store"
    with monkeypatch.context() as mp:
        mp.setattr(store_mod, "_durable", failing)
        with pytest.raises(OSError, match="Input/output error"):
            clone_image(str(image_pair.arc2), target=f"{store}/v2")
    assert not _named(store)
    assert sorted(os.listdir(store)) == [".lock", "chunks"]  # no description, no leftovers
    assert all(not os.listdir(d) for d in (store / "chunks").iterdir())
    report = clone_image(str(image_pair.arc2), target=f"{store}/v2")
    assert report.from_store == 0
    assert report.fetched == report.chunks


def test_kill_9_between_the_writes_and_the_sync_leaves_no_name(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    """A process killed while its first batch waits for the sync (a power cut at that point
    loses the same): the chunks written are gone, no name points at them."""
    store = tmp_path / "store"
    marker = tmp_path / "syncing"
    code = (
        "import pathlib, time\n"
        "from btrdelta.chunk import store\n"
        "from btrdelta.update.clone import clone_image\n"
        "def stuck(fds):\n"  # (the marker appears whole: the test may read it at once)
        f"    pathlib.Path({str(marker) + '.tmp'!r}).write_text(str(len(fds)))\n"
        f"    pathlib.Path({str(marker) + '.tmp'!r}).rename({str(marker)!r})\n"
        "    time.sleep(600)\n"
        "store._durable = stuck\n"
        f"clone_image({str(image_pair.arc2)!r}, target={str(store / 'v2')!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert int(marker.read_text()) > 0  # chunks were written, waiting for their sync
    assert not _named(store)
    assert all(not os.listdir(d) for d in (store / "chunks").iterdir())  # O_TMPFILE: gone
