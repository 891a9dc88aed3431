"""The deltas ``repo add`` makes (update/jobs.py): patches that ``update`` applies at its
speed. Oracles: the codecs the delta's own records name (``delta stat``'s reader), the
same pair through ``delta make``, tree-sum of the release after ``update``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.delta import open_delta
from btrdelta.delta.stats import collect_delta_stats
from btrdelta.tree import tree_sum


def _codecs(delta: Path) -> dict[str, int]:
    with open(delta, "rb") as f:
        return dict(collect_delta_stats(open_delta(f)).patched_files)


def test_repository_deltas_carry_no_lzma_patches(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A relinked binary (rel32 call operands shifted, as after a rebuild) gets an
    ``hdiff-lzma`` patch from ``delta make`` but an LZMA-free one in the repository: its
    inflation took the regex update path from ~40 to ~65 ms of CPU (issue 14's apply
    speed). The update still gives the release exactly."""
    old = Path("/usr/bin/zstd").read_bytes()[:600_000]
    new = bytearray(old)
    for i in range(0, len(new) - 5, 13):
        if new[i] == 0xE8:
            new[i + 1] = (new[i + 1] + 16) & 0xFF
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for tree, data in ((v1, old), (v2, bytes(new))):
        (tree / "bin").mkdir(parents=True)
        (tree / "bin" / "prog").write_bytes(data)
        (tree / "README").write_text("release\n")
    stream, made = tmp_path / "s.stream", tmp_path / "made.delta"
    assert main(["send", str(v2), "--parent", str(v1), "-o", str(stream), "-q"]) == 0
    assert main(["delta", "make", str(stream), "--old", str(v1), "-o", str(made), "-q"]) == 0
    assert _codecs(made) == {"hdiff-lzma": 1}  # (the data would take it)

    repo = tmp_path / "repo"
    assert main(["repo", "init", str(repo), "--avg-chunk", "4K"]) == 0
    for name, tree in (("1", v1), ("2", v2)):
        assert main(["repo", "add", str(repo), name, str(tree), "-q"]) == 0
    trust.save_key_pair(trust.generate_key(), str(tmp_path / "root.pem"),
                        str(tmp_path / "root.pub"))
    assert main(["repo", "sign", str(repo), "--key", str(tmp_path / "root.pem"), "-q"]) == 0
    (delta,) = (repo / "deltas").glob("*.delta")
    got = _codecs(delta)
    assert "hdiff-lzma" not in got
    assert sum(got.values()) == 1  # still a patch, not the data

    dest = tmp_path / "dest"
    key = ["--key", str(tmp_path / "root.pub"), "-q"]
    assert main(["update", str(repo), str(dest), "--to", "1", *key]) == 0
    capsys.readouterr()
    assert main(["update", str(repo), str(dest), "--to", "2", "--json", *key]) == 0
    steps = json.loads(capsys.readouterr().out)["plan"]["steps"]
    assert [(s["from"], s["to"]) for s in steps] == [("1", "2")]  # the delta hop
    assert tree_sum(dest / "2") == tree_sum(v2)
