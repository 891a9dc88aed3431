"""The index of old files' block digests an incremental record-mode send looks changed
blocks up in (``CLONE`` instead of ``WRITE``): bounded, a file's blocks all or none, the
smallest files first."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from btrdelta.send import record
from btrdelta.send.record import BlockIndex
from btrdelta.send.scan import BLOCK, Node
from btrdelta.send.sendshot import send_with_sendshots
from tests.send.conftest import run
from tests.send.test_extents import _Rounds, _write


def _old(nid: int, blocks: list[bytes]) -> Node:
    size = len(blocks) * BLOCK
    return Node(nid, 300 + nid, 0o100644, 0, 0, size, 0, 0, 0, segments=[(0, size)],
                blocks=b"".join(blocks))


def test_index_holds_whole_files_the_smallest_first_within_its_room() -> None:
    def d(i: int) -> bytes:
        return i.to_bytes(16, "big")

    small, mid, big = (_old(1, [d(1), d(2)]), _old(2, [d(10 + k) for k in range(5)]),
                       _old(3, [d(100 + k) for k in range(8)]))
    index = BlockIndex(8)
    index.add_all([big, mid, small])
    assert index.get(d(2)) == (small, BLOCK)
    assert index.get(d(14)) == (mid, 4 * BLOCK)
    assert index.get(d(100)) is None  # (8 blocks: past the room left, 1)
    assert index.room == 1
    index.add(big)  # (once: not again)
    assert index.room == 1
    whole = BlockIndex()
    whole.add_all([big])
    assert whole.get(d(107)) == (big, 7 * BLOCK)
    assert whole.room == record.INDEX_MAX - 8


@pytest.mark.btrfs
def test_a_changed_image_past_the_room_is_not_indexed(
        two_fs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 128 MiB image (32,768 blocks) written at a few places, one of them a copy of 8
    blocks of a small file that changed too: with the room lowered to 1,024 digests the
    image's old blocks are not indexed (the index holds at most 1,024 digests, with the
    room for them over 32,768: ~5.6 MB), the small file's are: the copy is still a
    ``CLONE``, and the kernel receives the stream equal to the source (_Rounds)."""
    snd, rcv = two_fs
    run("mount", "-o", "remount,noatime", snd)
    live = snd / "live"
    run("btrfs", "subvolume", "create", live)
    img, small = live / "vm.img", live / "small.bin"
    img.write_bytes(b"")
    for k in range(16):
        _write(img, k << 23, os.urandom(1 << 23))
    small.write_bytes(os.urandom(16 * BLOCK))
    rounds = _Rounds(snd, rcv, tmp_path / "store", tmp_path / "s")
    first = rounds.send().recorded
    assert first is not None
    copied = small.read_bytes()[:8 * BLOCK]  # (clones of less than 16 KiB are sent as data)
    for k in range(8):
        _write(img, (977 * k + 5) * BLOCK, os.urandom(BLOCK))
    _write(img, 1000 * BLOCK, copied)
    small.write_bytes(os.urandom(16 * BLOCK))
    run("sync")

    held: list[int] = []
    add = BlockIndex.add

    def counted(self: BlockIndex, node: Node) -> None:
        add(self, node)
        held.append(record.INDEX_MAX - self.room)  # (digests taken in)

    monkeypatch.setattr(BlockIndex, "add", counted)

    def against_first(room: int) -> int:
        """The most digests the index held in a send against the first record."""
        monkeypatch.setattr(record, "INDEX_MAX", room)
        held.clear()
        send_with_sendshots(lambda b: None, live, store=rounds.store,
                            from_sendshot=first.digest, record=False)
        return max(held)

    assert against_first(1 << 20) > 32768
    assert against_first(1024) <= 1024
    res = rounds.send()  # (received equal to the source)
    assert res.stats.cloned_bytes >= 8 * BLOCK
    assert res.stats.data_bytes < 24 * BLOCK + len(small.read_bytes())


def test_lookups_before_the_dict_answer_as_the_dict() -> None:
    """Digests repeated within and across files, files of several data segments and a
    partial last block: every lookup answered by scanning the added files (few lookups)
    is the one the dict gives (many lookups), and a few lookups in a big file build no
    dict."""
    rng = random.Random(5)
    pool = [rng.randbytes(16) for _ in range(40)]
    # misaligned look-alikes: a digest's bytes across two neighbours
    pool += [pool[0][8:] + pool[1][:8]]
    nodes = []
    for nid in range(1, 30):
        segs, pos = [], 0
        for _ in range(rng.randint(1, 4)):
            pos += rng.choice([0, BLOCK, 3 * BLOCK])
            n = rng.randint(1, 6) * BLOCK
            segs.append((pos, n))
            pos += n
        size = pos - rng.choice([0, 0, 100])  # the last block partial at times
        count = sum(n // BLOCK for _o, n in segs)
        nodes.append(Node(nid, 300 + nid, 0o100644, 0, 0, size, 0, 0, 0, segments=segs,
                          blocks=b"".join(rng.choice(pool) for _ in range(count))))
    eager = BlockIndex()
    eager.add_all(nodes)
    eager._build()
    for d in [*pool, bytes(16)]:
        lazy = BlockIndex()
        lazy.add_all(nodes)
        assert lazy.get(d) == eager.get(d), d
        assert lazy._where == {}  # (the first lookup scanned, no dict)
    many = BlockIndex()
    many.add_all(nodes)
    for _ in range(2000):
        d = rng.choice(pool)
        assert many.get(d) == eager.get(d)
    assert many._where  # (built once the scans cost more than the dict)

    big = _old(99, [rng.randbytes(16) for _ in range(100_000)])
    index = BlockIndex()
    index.add(big)
    assert index.get(big.blocks[16 * 70_000:16 * 70_001]) == (big, 70_000 * BLOCK)
    assert index.get(bytes(16)) is None
    assert index.room == record.INDEX_MAX - 100_000
    assert index._where == {}
