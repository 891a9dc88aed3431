"""``repo add``'s peak memory on a release of mostly new files that do not compress: the
delta is as large as the new data (its WRITEs go beside the carrier, as they are), and
``repo add`` must not hold it whole. Measured on the CLI in a child (``wait4``'s peak RSS,
``tests.conftest.run_peak_rss``); oracles: the published delta is named by its BLAKE3,
and ``update`` through it gives the release's tree-sum."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import blake3

from btrdelta.tree import tree_sum
from tests.conftest import run_peak_rss

#: new data of the second release (random 4 KiB blocks: nothing compresses, nothing is
#: shared with the first)
NEW = 64 << 20
#: ``repo add``'s peak for it: before, the delta (64 MiB) was read whole and copied to
#: its content-addressed name (156 MiB on the machine of session 31); now the delta is
#: made in ~115 MiB (the interpreter, the chunking's windows, the writer) and renamed
LIMIT = 144 << 20


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "btrdelta", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_repo_add_of_new_incompressible_files_does_not_hold_the_delta(tmp_path: Path) -> None:
    rng = random.Random(31)
    pool = [rng.randbytes(4096) for _ in range(2048)]
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for tree in (v1, v2):
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "release").write_text("base\n")
    (v2 / "new").mkdir()
    for i in range(NEW // (4 << 20)):
        (v2 / "new" / f"f{i:02d}").write_bytes(
            b"".join(rng.choice(pool) for _ in range((4 << 20) // 4096)))
    repo = tmp_path / "repo"
    _cli("repo", "init", str(repo))
    _cli("repo", "add", "-q", str(repo), "1", str(v1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    code, err, rss = run_peak_rss([sys.executable, "-m", "btrdelta", "repo", "add", "-q",
                                   str(repo), "2", str(v2)], env)
    assert code == 0, err
    assert rss <= LIMIT, f"repo add peaked at {rss >> 20} MiB, the limit is {LIMIT >> 20}"

    (delta,) = (repo / "deltas").glob("*.delta")
    data = delta.read_bytes()
    assert len(data) > NEW * 9 // 10  # (the new data as it is: the case measured)
    assert delta.name == f"{blake3.blake3(data).hexdigest()}.delta"
    assert oct(delta.stat().st_mode & 0o777) == oct(0o644 & ~_umask())  # (a web server reads it)
    assert not list((repo / ".btrdelta" / "jobs").rglob("*.delta"))  # (moved, not copied)
    listing = subprocess.run([sys.executable, "-m", "btrdelta", "repo", "ls", "--json",
                              str(repo)], check=True, capture_output=True, text=True).stdout
    assert str(len(data)) in json.dumps(json.loads(listing))

    key = tmp_path / "root"
    _cli("key", "generate", "-q", "-o", str(key))
    _cli("repo", "sign", "-q", str(repo), "--key", f"{key}.key")
    dest = tmp_path / "dest"
    _cli("update", "-q", str(repo), str(dest), "--to", "1", "--key", f"{key}.pub")
    _cli("update", "-q", str(repo), str(dest), "--to", "2", "--key", f"{key}.pub")
    assert tree_sum(dest / "2") == tree_sum(v2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
