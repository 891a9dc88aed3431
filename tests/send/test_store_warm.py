"""``SendshotStore.keep_decoded`` (``replicate --every``'s store): a store object kept over
rounds of sends of a live btrfs subvolume (patch records on patch records) reads only
each round's new record, and sends exactly the stream a store read afresh every round
sends. Oracle: the same send through a new ``SendshotStore`` of a copy of the store, which
reads the whole chain, each round."""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import pytest

from btrdelta.send import store as store_mod
from btrdelta.send.sendshot import send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.testing.loopfs import run as sh
from tests.conftest import btrfs_loop


def _change(src: Path, rng: random.Random, i: int) -> None:
    (src / f"new{i}").write_bytes(rng.randbytes(5000 + i))
    with open(src / "grows", "ab") as f:
        f.write(rng.randbytes(9000))
    if i > 1:
        os.rename(src / f"new{i - 1}", src / f"moved{i}")
    if i > 2:
        os.unlink(src / f"moved{i - 1}")


def _send(src: Path, store: SendshotStore, first: bool) -> tuple[bytes, str]:
    """A send of a read-only snapshot of ``src`` (the one both stores send)."""
    snap = src.parent / "snap"
    if not snap.exists():
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(src), str(snap))
    out = io.BytesIO()
    got = send_with_sendshots(out.write, snap, store=store, version=2, name=b"src",
                              from_sendshot=None if first else "latest", snapshot=False,
                              source_name=os.fsencode(src))
    assert got.recorded is not None
    return out.getvalue(), got.recorded.digest


@pytest.mark.btrfs
def test_a_kept_store_reads_only_the_new_record_and_sends_the_same(tmp_path: Path) -> None:
    with btrfs_loop("256M") as mnt:
        src = mnt / "src"
        sh("btrfs", "-q", "subvolume", "create", str(src))
        _rounds(src, tmp_path)


def _rounds(src: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    for i in range(30):
        (src / f"f{i}").write_bytes(rng.randbytes(200 * i))
    (src / "grows").write_bytes(rng.randbytes(100_000))
    warm = SendshotStore(tmp_path / "warm")
    warm.keep_decoded()
    _send(src, warm, True)
    sh("btrfs", "-q", "subvolume", "delete", str(src.parent / "snap"))
    opened: list[str] = []
    real = SendshotStore.open

    def spy(self: SendshotStore, record: store_mod.StoredSendshot) -> object:
        opened.append(record.digest)
        return real(self, record)

    SendshotStore.open = spy  # type: ignore[method-assign]
    try:
        chained = 0
        for i in range(1, 8):
            _change(src, rng, i)
            cold = tmp_path / f"cold{i}"
            shutil.copytree(warm.path, cold)
            opened.clear()
            want = _send(src, SendshotStore(cold), False)
            cold_reads = len(opened)
            opened.clear()
            got = _send(src, warm, False)
            sh("btrfs", "-q", "subvolume", "delete", str(src.parent / "snap"))
            assert got[0] == want[0], i  # the same stream (the records' times differ)
            chained = max(chained, cold_reads)
            # the newest record only (the first round: the whole record, kept since)
            assert len(opened) == 1, (i, cold_reads, len(opened))
            shutil.rmtree(cold)
        assert chained >= 3  # (a chain of patches was read whole by the cold store)
    finally:
        SendshotStore.open = real  # type: ignore[method-assign]
