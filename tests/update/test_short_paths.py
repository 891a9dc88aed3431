"""``btrdelta update`` along a short path of several delta hops (real MarkupSafe releases
served by nginx on loopback): what a run keeps and removes on the way, and what it writes
without ``fsync`` because it checks it again when it reads it. Oracles: tree-sum of the
release trees, the requests in nginx's access log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.repo.metadata import read_trusted
from btrdelta.tree import tree_sum
from tests.update.conftest import Nginx

#: releases published (v1 .. v5): v1 -> v5 is a path of several delta hops
N = 5


@pytest.fixture(scope="module")
def signed(releases: list[Path], tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, Path]:
    """(repository, root public key)."""
    base = tmp_path_factory.mktemp("short")
    root = base / "repo"
    trust.save_key_pair(trust.generate_key(), str(base / "root.pem"), str(base / "root.pub"))
    assert main(["repo", "init", str(root), "--avg-chunk", "4K"]) == 0
    for i, tree in enumerate(releases[:N], 1):
        assert main(["repo", "add", str(root), f"v{i}", str(tree)]) == 0
    assert main(["repo", "sign", str(root), "--key", str(base / "root.pem")]) == 0
    return root, base / "root.pub"


@pytest.fixture
def server(signed: tuple[Path, Path], tmp_path: Path) -> Iterator[Nginx]:
    srv = Nginx(signed[0], tmp_path / "nginx")
    yield srv
    srv.stop()


def _update(url: str, dest: Path, *args: str) -> None:
    assert main(["update", url, str(dest), "--quiet", *args]) == 0


def test_a_damaged_metadata_cache_is_fetched_again(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
) -> None:
    """The cache of verified metadata (``DEST/.btrdelta/meta``) is written without
    ``fsync``: what a power cut can leave of it (an empty file, a file of other bytes) is
    a miss, fetched again, and the update ends as it would have."""
    _, pub = signed
    dest = tmp_path / "dest"
    _update(server.url, dest, "--to", "v2", "--key", str(pub))
    cached = sorted((dest / ".btrdelta" / "meta").iterdir())
    assert len(cached) >= 2  # the index and a bin at least
    for i, path in enumerate(cached):
        path.write_bytes(b"" if i % 2 else bytes(len(path.read_bytes())))
    before = len(server.requests())
    _update(server.url, dest)
    fetched = [uri for _status, _n, uri in server.requests()[before:]]
    assert any(uri.startswith("/index/") for uri in fetched), fetched
    assert any(uri.startswith("/bins/") for uri in fetched), fetched
    assert tree_sum(dest / f"v{N}") == tree_sum(releases[N - 1])
    assert all(p.read_bytes() for p in (dest / ".btrdelta" / "meta").iterdir())


def test_the_trusted_state_is_written_only_when_it_changes(
    signed: tuple[Path, Path], releases: list[Path], tmp_path: Path,
) -> None:
    """The state that guards against rollbacks (the index and timestamp versions trusted)
    is replaced, durably, when an update trusts a newer one; an update against the index
    it already trusts leaves the file as it is (no write, no ``fsync``); an older index
    served again is still a rollback."""
    root, pub = signed
    repo = tmp_path / "www"
    shutil.copytree(root, repo)
    srv = Nginx(repo, tmp_path / "nginx")
    try:
        dest = tmp_path / "dest"
        _update(srv.url, dest, "--to", "v2", "--key", str(pub))
        (state,) = (dest / ".btrdelta" / "trusted").glob("*[0-9a-f].json")
        first = state.stat()
        _update(srv.url, dest, "--to", "v3")
        assert tree_sum(dest / "v3") == tree_sum(releases[2])
        again = state.stat()
        assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
        old_ts = (repo / "timestamp.json").read_bytes()
        assert main(["repo", "sign", str(repo), "--key", str(pub.with_suffix(".pem"))]) == 0
        _update(srv.url, dest, "--to", "v4")
        assert state.stat().st_ino != first.st_ino
        assert read_trusted(state).index_version == json.loads(
            (repo / "timestamp.json").read_bytes())["signed"]["index"]["version"]
        (repo / "timestamp.json").write_bytes(old_ts)
        assert main(["update", srv.url, str(dest), "--quiet"]) == 5
        assert not (dest / f"v{N}").exists()
    finally:
        srv.stop()
