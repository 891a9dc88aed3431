"""The output plan and writer: any rearrangement of an image's blocks, written in place,
comes out right without reading a block after overwriting it."""

from __future__ import annotations

import os
import random
import tempfile
from array import array
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from btrdelta.chunk.chunker import chunk_digest
from btrdelta.chunk.output import FETCH, KEEP, MOVE, OutputWriter, plan_output
from btrdelta.chunk.seed import SeedMap

BLOCK = 512


@dataclass
class _Layout:
    digests: list[bytes] = field(default_factory=list)
    raw_sizes: array[int] = field(default_factory=lambda: array("I"))
    order: array[int] = field(default_factory=lambda: array("I"))
    starts: array[int] = field(default_factory=lambda: array("Q", [0]))


def _image(blocks: list[bytes]) -> _Layout:
    layout = _Layout()
    seen: dict[bytes, int] = {}
    for data in blocks:
        d = chunk_digest(data)
        if d not in seen:
            seen[d] = len(layout.digests)
            layout.digests.append(d)
            layout.raw_sizes.append(len(data))
        layout.order.append(seen[d])
        layout.starts.append(layout.starts[-1] + len(data))
    return layout


@given(
    st.integers(2, 40), st.integers(0, 2**32 - 1), st.integers(0, 6 * BLOCK),
    st.floats(0.0, 0.5),
)
def test_any_rearrangement_is_written_in_place_correctly(
    n: int, seed: int, stash_limit: int, new_share: float
) -> None:
    # block contents from a seeded generator: drawing them from hypothesis' own entropy
    # (st.randoms) exceeded its data budget on larger images (a failed health check)
    rnd = random.Random(seed)
    old_blocks = [rnd.randbytes(BLOCK) for _ in range(n)]
    new_blocks = [rnd.choice(old_blocks) if rnd.random() >= new_share else rnd.randbytes(BLOCK)
                  for _ in range(rnd.randint(1, n + 3))]
    old, new = b"".join(old_blocks), b"".join(new_blocks)
    layout = _image(new_blocks)
    wanted = set(layout.digests)
    seeds = SeedMap(["out"], {}, [{}])
    for i, data in enumerate(old_blocks):
        d = chunk_digest(data)
        if d in wanted:
            seeds.at[0][i * BLOCK] = d
            seeds.where.setdefault(d, (0, i * BLOCK))
    plan = plan_output(layout, seeds, out_seed=0, stash_limit=stash_limit)
    stashed = sum(BLOCK for is_stash, _ in plan.moves if is_stash)
    assert stashed <= stash_limit
    for pos, kind in enumerate(plan.kind):  # KEEP only where the bytes already are
        if kind == KEEP:
            assert old[pos * BLOCK : (pos + 1) * BLOCK] == new_blocks[pos]
    planned_fetch = {e: list(p) for e, p in plan.fetch.items()}
    moves = plan.kind.count(MOVE)
    by_digest = {chunk_digest(b): b for b in new_blocks}
    with tempfile.TemporaryFile() as f:
        f.write(old)
        f.flush()
        fd = f.fileno()
        writer = OutputWriter(fd, "out", layout, plan, digest=chunk_digest, in_place=True)
        writer.write_local([(fd, "out")], None)
        # no move read a block another write had already replaced: nothing to refetch
        assert plan.fetch == planned_fetch
        assert plan.kind.count(MOVE) == moves
        for entry in plan.fetch:
            writer.put_fetched(entry, by_digest[layout.digests[entry]])
        os.ftruncate(fd, len(new))
        writer.verify(chunk_digest(new))
        f.seek(0)
        assert f.read() == new
    fetched = sum(BLOCK for k in plan.kind if k == FETCH)
    report = writer.report
    assert report.in_place + report.moved + report.fetched == len(new)
    assert report.fetched <= fetched
