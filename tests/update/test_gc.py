"""``repo gc`` on a repository of real MarkupSafe releases with real garbage: a ``repo add``
killed (SIGKILL) once its first pack is in place, and indexes signed three times. Oracles:
the index documents read as a client reads them (which bins they name), the file listing
before and after, and ``btrdelta update`` over nginx of every version afterwards
(tree-sum of the release trees)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.tree import tree_sum
from tests.fs.test_remove import _deep
from tests.jsondoc import checked
from tests.update.conftest import Nginx

MIRRORED = ("packs", "fulls", "deltas", "bins", "index")


def _listing(repo: Path) -> set[str]:
    """Every file of the mirrored directories (the publisher's .btrdelta/ aside)."""
    out = {p for p in os.listdir(repo) if p != ".btrdelta"} - set(MIRRORED)
    for kind in MIRRORED:
        if (repo / kind).is_dir():
            out |= {f"{kind}/{p}" for p in os.listdir(repo / kind)}
    return out


def _named_bins(repo: Path, version: int) -> set[str]:
    doc = json.loads((repo / "index" / f"{version}.json").read_text())
    return {f"bins/{digest}.json" for _count, _length, digest in doc["signed"]["bins"]}


def _killed_add(repo: Path, name: str, tree: Path) -> None:
    """``repo add`` killed once its first pack is in place (before the catalog names it)."""
    packs = set(os.listdir(repo / "packs"))
    proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "repo", "add", str(repo), name,
                             str(tree)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and set(os.listdir(repo / "packs")) == packs:
            time.sleep(0.0005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_gc_removes_what_nothing_names_and_every_version_still_updates(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    repo, key = tmp_path / "repo", tmp_path / "root.pem"
    trust.save_key_pair(trust.generate_key(), str(key), str(tmp_path / "root.pub"))
    assert main(["repo", "init", str(repo), "--avg-chunk", "4K"]) == 0
    for i in range(1, 5):
        assert main(["repo", "add", str(repo), f"v{i}", str(releases[i - 1])]) == 0
        if i > 1:  # index versions 1, 2, 3
            assert main(["repo", "sign", str(repo), "--key", str(key)]) == 0
    before = _listing(repo)
    _killed_add(repo, "v5", releases[4])
    after_kill = _listing(repo)
    orphans = after_kill - before
    assert any(p.startswith("packs/") for p in orphans), orphans
    stale = ({p for p in before if p.startswith("bins/")}
             - _named_bins(repo, 2) - _named_bins(repo, 3)) | {"index/1.json"}
    assert len(stale) > 1
    capsys.readouterr()
    assert main(["repo", "gc", str(repo), "--dry-run", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["removed"]) == orphans | stale
    assert _listing(repo) == after_kill
    assert main(["repo", "gc", str(repo), "--json"]) == 0
    report = checked("repo gc", json.loads(capsys.readouterr().out))
    assert set(report["removed"]) == orphans | stale
    assert report["kept_indexes"] == [2, 3]
    assert _listing(repo) == after_kill - orphans - stale
    # nothing anyone needs went: every version from nothing, and v1 -> v4 by deltas
    srv = Nginx(repo, tmp_path / "nginx")
    try:
        for i in range(1, 5):
            dest = tmp_path / f"d{i}"
            assert main(["update", srv.url, str(dest), "--to", f"v{i}", "--key",
                         str(tmp_path / "root.pub")]) == 0
            assert tree_sum(dest / f"v{i}") == tree_sum(releases[i - 1])
        assert main(["update", srv.url, str(tmp_path / "d1"), "--to", "v4"]) == 0
        assert tree_sum(tmp_path / "d1" / "v4") == tree_sum(releases[3])
        # the add cut short completes, and is served
        assert main(["repo", "add", str(repo), "v5", str(releases[4])]) == 0
        assert main(["repo", "sign", str(repo), "--key", str(key)]) == 0
        assert main(["update", srv.url, str(tmp_path / "d1"), "--to", "v5"]) == 0
        assert tree_sum(tmp_path / "d1" / "v5") == tree_sum(releases[4])
    finally:
        srv.stop()
    # a second collection finds only the index that fell out of the newest two
    capsys.readouterr()
    assert main(["repo", "gc", str(repo), "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)["removed"]
    assert "index/2.json" in removed
    assert all(p == "index/2.json" or p.startswith("bins/") for p in removed)
    # a `repo sign` cut short after writing its index, before the timestamp: the index the
    # timestamp names stays, whatever --keep-indexes says, and so does the stray one (its
    # number must not come back with other content)
    shutil.copytree(repo, tmp_path / "copy")
    assert main(["repo", "sign", str(tmp_path / "copy"), "--key", str(key)]) == 0
    shutil.copy(tmp_path / "copy/index/5.json", repo / "index/5.json")
    capsys.readouterr()
    assert main(["repo", "gc", str(repo), "--keep-indexes", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept_indexes"] == [4, 5]
    assert "index/3.json" in report["removed"]
    srv = Nginx(repo, tmp_path / "nginx2")
    try:
        dest = tmp_path / "after"
        assert main(["update", srv.url, str(dest), "--key", str(tmp_path / "root.pub")]) == 0
        assert tree_sum(dest / "v5") == tree_sum(releases[4])
    finally:
        srv.stop()
    assert main(["repo", "sign", str(repo), "--key", str(key)]) == 0
    assert (repo / "index/6.json").exists()


def test_gc_removes_leftovers_deeper_than_the_recursion_limit(deep_tmp_path: Path) -> None:
    """A killed ``repo add`` of a deep tree leaves its temporaries; gc takes them away."""
    repo = deep_tmp_path / "repo"
    assert main(["repo", "init", str(repo)]) == 0
    leftover = repo / ".btrdelta" / "tmp" / "job"
    leftover.mkdir(parents=True)
    _deep(leftover, sys.getrecursionlimit() + 200)  # shutil.rmtree dies here
    assert main(["repo", "gc", str(repo)]) == 0
    assert not (repo / ".btrdelta" / "tmp").exists()
