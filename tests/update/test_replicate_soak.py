"""Soak (``make soak``, not part of ``make test``): many rounds of replicating a live btrfs
subvolume under a SQLite write load and random file changes, with connections cut at random
points and resumed; every committed round equals the source (tree-sum), the sender never
keeps a snapshot, and a cut never costs more than one segment again (one between the
last ACK and the COMMIT costs nothing: the receiver keeps the complete subvolume hidden
and the next run only commits it)."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from pathlib import Path

import pytest

from btrdelta.errors import TransportError
from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from btrdelta.update.channels import spawn_local
from btrdelta.update.replicate import replicate
from tests.update.test_replicate import _Cut, _newest, _sh, fs2  # noqa: F401 - the fixture

ENABLED = bool(os.environ.get("BTRDELTA_SOAK"))
ROUNDS = int(os.environ.get("BTRDELTA_SOAK_ROUNDS", "30"))
SEG = 256 * 1024
pytestmark = [pytest.mark.btrfs, pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(not ENABLED, reason="soak: make soak")]


def test_soak(fs2: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    snd, rcv = fs2
    live = snd / "vol"
    _sh("btrfs", "subvolume", "create", live)
    seed = int(os.environ.get("BTRDELTA_SOAK_SEED", "1"))
    rng = random.Random(seed)
    con = sqlite3.connect(live / "db")
    con.execute("create table t (k integer primary key, v blob)")
    con.executemany("insert into t values (?, ?)", [(k, rng.randbytes(300)) for k in range(20000)])
    con.commit()
    store = SendshotStore(tmp_path / "store")
    dest = rcv / "dest"
    dest.mkdir()
    cuts = 0
    for _round in range(ROUNDS):
        for _ in range(300):
            con.execute("update t set v = ? where k = ?", (rng.randbytes(300),
                                                         rng.randrange(20000)))
        con.commit()
        name = live / f"f{rng.randrange(40)}"
        action = rng.randrange(4)
        if action == 0 or not name.exists():
            name.write_bytes(rng.randbytes(rng.randrange(1, 3_000_000)))
        elif action == 1:
            name.rename(live / f"f{rng.randrange(40)}")
        elif action == 2:
            with open(name, "ab") as f:
                f.write(rng.randbytes(rng.randrange(1, 200_000)))
        else:
            name.unlink()
        expected = tree_sum(live)
        if rng.random() < 0.4:
            cut = _Cut(spawn_local(str(dest)), rng.randrange(1000, 3_000_000))
            try:
                replicate(live, cut, store=store, segment=SEG)
            except TransportError:
                cuts += 1
            cut.close()
            expected = tree_sum(live)  # the resumed stream is of the snapshot taken then
        ch = spawn_local(str(dest))
        res = replicate(live, ch, store=store, segment=SEG)
        ch.close()
        assert res.outcome in ("committed", "refused"), res
        if res.outcome == "committed":
            assert tree_sum(_newest(dest)) == expected
        listing = subprocess.run(["btrfs", "subvolume", "list", str(snd)], capture_output=True,
                                 text=True, check=True).stdout.split()
        assert listing.count("vol") == 1
        assert not [w for w in listing if w.startswith(".btrdelta-replicate-")] or \
            (dest / ".btrdelta-partial").exists()
    con.close()
    ch = spawn_local(str(dest))
    res = replicate(live, ch, store=store, segment=SEG)
    ch.close()
    assert tree_sum(_newest(dest)) == tree_sum(live) or res.outcome == "refused"
    print(f"soak: {ROUNDS} rounds, {cuts} cuts, seed {seed}")
