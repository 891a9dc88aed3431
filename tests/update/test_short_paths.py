"""``btrdelta update`` along a short path of several delta hops (real MarkupSafe releases
served by nginx on loopback): what a run keeps and removes on the way, and what it writes
without ``fsync`` because it checks it again when it reads it. Oracles: tree-sum of the
release trees, the requests in nginx's access log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.repo.metadata import read_trusted
from btrdelta.tree import tree_sum
from tests.conftest import spy_fsync
from tests.update.conftest import Nginx

#: releases published (v1 .. v9): v1 -> v9 is the path v1 -> v4 -> v8 -> v9 (3 delta hops)
N = 9


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


def test_cached_metadata_is_not_written_again(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
) -> None:
    """An update whose index and bins are in the cache of verified metadata reads them
    there (nginx is not asked for them) and writes none of them again: every cached file
    keeps its inode and mtime (the index was rewritten under its name each run)."""
    _, pub = signed
    dest = tmp_path / "dest"
    _update(server.url, dest, "--to", "v2", "--key", str(pub))
    meta = dest / ".btrdelta" / "meta"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in meta.iterdir()}
    assert len(kept) >= 2  # the index and a bin at least
    before = len(server.requests())
    _update(server.url, dest, "--to", "v2")
    fetched = [uri for _status, _n, uri in server.requests()[before:]]
    assert not [uri for uri in fetched if uri.startswith(("/index/", "/bins/"))], fetched
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in meta.iterdir()} == kept
    _update(server.url, dest)
    assert tree_sum(dest / f"v{N}") == tree_sum(releases[N - 1])
    for name, stamp in kept.items():
        path = meta / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, name


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


def _deltas(srv: Nginx) -> list[str]:
    """The delta files served, in order (HTTP 200 and 206 alike)."""
    return [uri for _status, _n, uri in srv.requests() if uri.startswith("/deltas/")]


def _entries(dest: Path) -> list[str]:
    return sorted(os.listdir(dest))


def test_the_next_delta_is_downloaded_while_a_hop_is_applied(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], dest_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Along v1 -> v4 -> v8 -> v9 the deltas of the second and third hops are downloaded
    by a thread of their own (each once), the first by the update's thread; every event
    reaches the caller in its own thread; the intermediates are gone at the end (in a
    directory DEST never registered) and the result is the release."""
    from btrdelta.repo.mirror import Mirrors
    from btrdelta.update.versions import update

    _, pub = signed
    dest = dest_dir
    _update(server.url, dest, "--to", "v1", "--key", str(pub))
    v1 = tree_sum(dest / "v1")
    by: list[str] = []
    real = Mirrors.download

    def download(self: Mirrors, *args: object, **kwargs: object) -> Path:
        by.append(threading.current_thread().name)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Mirrors, "download", download)
    before = len(_deltas(server))
    events: list[tuple[str, bool]] = []
    res = update(server.url, dest, on_event=lambda ev: events.append(
        (ev["event"], threading.current_thread() is threading.main_thread())))
    assert [(s.source, s.target) for s in res.plan.steps] == [(1, 4), (4, 8), (8, 9)]
    assert by == ["MainThread", "btrdelta-download", "btrdelta-download"]
    served = _deltas(server)[before:]
    assert len(served) == len(set(served)) == 3
    assert all(main_thread for _kind, main_thread in events)
    assert sum(kind == "bytes" for kind, _ in events) >= 3
    assert tree_sum(dest / "v9") == tree_sum(releases[8])
    assert tree_sum(dest / "v1") == v1
    assert [e for e in _entries(dest) if not e.startswith(".btrdelta")] == ["v1", "v9"]
    assert [e for e in _entries(dest) if e.startswith(".btrdelta-hop-")] == []
    assert not [t for t in threading.enumerate()
                if t.name in ("btrdelta-download", "btrdelta-remove")]
    registry = dest / ".btrdelta-subvols.json"  # (directories: no entry of intermediates)
    assert not registry.exists() or sorted(
        e["name"] for e in json.loads(registry.read_bytes())["subvols"]) == ["v1", "v9"]


def test_a_delta_downloaded_ahead_that_fails_is_said_when_its_hop_comes(
    signed: tuple[Path, Path], releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The last hop's delta, damaged on the server, fails its BLAKE3 in the thread that
    fetched it ahead: the update stops with one line naming it when that hop comes, the
    hops before it verified and kept (v8 as an intermediate, v4's removed), v1 untouched;
    once the server is repaired the next run downloads only that delta and ends right."""
    from btrdelta.update.publish import Repo

    root, pub = signed
    repo = tmp_path / "www"
    shutil.copytree(root, repo)
    digest, _ = Repo(repo).load().versions[8].deltas[8]
    bad = repo / "deltas" / f"{digest}.delta"
    good = bad.read_bytes()
    bad.write_bytes(good[:100] + bytes([good[100] ^ 0x40]) + good[101:])
    srv = Nginx(repo, tmp_path / "nginx")
    try:
        dest = tmp_path / "dest"
        _update(srv.url, dest, "--to", "v1", "--key", str(pub))
        v1 = tree_sum(dest / "v1")
        capsys.readouterr()
        assert main(["update", srv.url, str(dest), "--quiet"]) == 5
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"deltas/{digest}.delta" in err, err
        assert "Traceback" not in err
        assert tree_sum(dest / "v1") == v1
        assert [e for e in _entries(dest) if e.startswith(("v", ".btrdelta-hop-"))] == [
            ".btrdelta-hop-v8", "v1"]
        assert tree_sum(dest / ".btrdelta-hop-v8") == tree_sum(releases[7])
        assert not [t for t in threading.enumerate()
                    if t.name in ("btrdelta-download", "btrdelta-remove")]
        bad.write_bytes(good)
        before = len(_deltas(srv))
        _update(srv.url, dest)
        assert _deltas(srv)[before:] == [f"/deltas/{digest}.delta"]
        assert tree_sum(dest / "v9") == tree_sum(releases[8])
        assert [e for e in _entries(dest) if e.startswith(("v", ".btrdelta-hop-"))] == [
            "v1", "v9"]
    finally:
        srv.stop()


_KILL_AT = """
import os, signal, sys
from btrdelta.update.versions import update

def on_event(ev):
    if ev["event"] == "apply" and ev["hop"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

update(sys.argv[1], sys.argv[2], on_event=on_event)
"""


@pytest.mark.parametrize("hop", [2, 3])
def test_killed_while_a_hop_is_applied_then_run_again(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], dest_dir: Path,
    hop: int,
) -> None:
    """``kill -9`` of an update when hop 2 or 3 of v1 -> v4 -> v8 -> v9 starts applying
    (the next delta downloading beside it, the intermediate before it being removed):
    v1 is untouched, and the next run downloads no delta the killed one had (the one
    downloading ahead at most again), starts from the newest verified version and ends
    with only v1 and v9 in DEST."""
    _, pub = signed
    dest = dest_dir
    _update(server.url, dest, "--to", "v1", "--key", str(pub))
    v1 = tree_sum(dest / "v1")
    before = len(_deltas(server))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-c", _KILL_AT, server.url, str(dest), str(hop)],
                          env=env, check=False, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = _deltas(server)[before:]
    assert tree_sum(dest / "v1") == v1
    assert os.path.isdir(dest / (".btrdelta-hop-v4" if hop == 2 else ".btrdelta-hop-v8"))
    again = len(_deltas(server))
    _update(server.url, dest)
    fetched = _deltas(server)[again:]
    assert len(killed) + len(fetched) <= 4, (killed, fetched)
    assert not set(fetched) & set(killed[:hop])  # (the deltas of the hops reached)
    assert tree_sum(dest / "v9") == tree_sum(releases[8])
    assert tree_sum(dest / "v1") == v1
    assert [e for e in _entries(dest) if e.startswith(("v", ".btrdelta-hop-"))] == [
        "v1", "v9"]


_CTRL_C_AT = """
import os, signal, sys, time
from btrdelta.transport.config import HttpConfig
from btrdelta.update.versions import update

def on_event(ev):
    if ev["event"] == "apply" and ev["hop"] == 2:
        global t0
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

try:
    update(sys.argv[1], sys.argv[2], on_event=on_event,
           config=HttpConfig(timeout=10, retries=0))
except KeyboardInterrupt:
    print(f"{time.monotonic() - t0:.3f}")
"""


def test_ctrl_c_while_a_hop_is_applied_ends_the_download_beside_it(
    signed: tuple[Path, Path], releases: list[Path], tmp_path: Path,
) -> None:
    """Ctrl-C when hop 2 of v1 -> v4 -> v8 -> v9 starts applying, the last delta
    downloading beside it from a server that sends it at 1 byte a second: the update ends
    at once, with no line (no retry, no next mirror). It waited for that download: until
    its timeout (10 s here), with a Debian delta of up to 4 MiB on a slow link until it
    was whole."""
    from btrdelta.update.publish import Repo
    from tests.transport.nginx import nginx

    root, pub = signed
    digest, _ = Repo(root).load().versions[8].deltas[8]
    block = f"""listen 127.0.0.1:{{port}}; root {root};
                location = /deltas/{digest}.delta {{ limit_rate 1; }}"""
    dest = tmp_path / "dest"
    with nginx(tmp_path / "nginx", block) as port:
        url = f"http://127.0.0.1:{port}"
        _update(url, dest, "--to", "v1", "--key", str(pub))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
        proc = subprocess.run([sys.executable, "-c", _CTRL_C_AT, url, str(dest)], env=env,
                              check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert float(proc.stdout) < 5, proc.stdout
    assert os.path.isdir(dest / ".btrdelta-hop-v4")  # (hop 1 was applied)
    assert not [e for e in _entries(dest) if e in ("v8", "v9", ".btrdelta-hop-v8")]


def test_a_download_fsyncs_every_piece_but_the_last(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delta is downloaded in pieces (range requests), each ``fsync``-ed but the last:
    a delta of one piece (the short path's) is written with none. What a power cut can
    leave of such a file under its final name (its length of zeros) is hashed, found
    wrong and fetched again; the update ends as it would have."""
    from btrdelta.repo import mirror

    _, pub = signed
    dest = tmp_path / "dest"
    downloads = dest / ".btrdelta" / "downloads"
    _update(server.url, dest, "--to", "v1", "--key", str(pub))
    synced = spy_fsync(monkeypatch)
    _update(server.url, dest, "--to", "v4")
    (delta,) = _deltas(server)
    assert not [p for p in synced if "/downloads/" in p], synced
    length = len((signed[0] / delta.lstrip("/")).read_bytes())
    assert length > 600
    shutil.rmtree(dest / "v4")
    synced.clear()
    monkeypatch.setattr(mirror, "PIECE", 256)
    _update(server.url, dest, "--to", "v4")
    assert len([p for p in synced if "/downloads/" in p]) == (length - 1) // 256
    assert tree_sum(dest / "v4") == tree_sum(releases[3])
    shutil.rmtree(dest / "v4")
    downloads.mkdir(parents=True)
    (downloads / os.path.basename(delta)).write_bytes(bytes(length))
    before = len(server.requests())
    _update(server.url, dest, "--to", "v4")
    assert _deltas(server)[-1] == delta
    assert len(server.requests()) > before
    assert tree_sum(dest / "v4") == tree_sum(releases[3])


def test_the_last_intermediate_is_removed_while_the_downloads_are(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the end of v1 -> v4 -> v8 -> v9, the last intermediate (v8) is removed by its
    thread while the update's thread removes the downloads: that removal can wait until
    the downloads are gone (it waited 5 s for nothing when the update waited for it
    first); the update then ends as before, with v1 and v9 only."""
    import time

    from btrdelta.update import holdings

    _, pub = signed
    dest = tmp_path / "dest"
    downloads = dest / ".btrdelta" / "downloads"
    _update(server.url, dest, "--to", "v1", "--key", str(pub))
    real = holdings.remove_entry
    seen: list[tuple[str, bool]] = []

    def remove_entry(where: Path, name: str) -> None:
        if name == f"{holdings.HOP_PREFIX}v8" and \
                threading.current_thread().name == "btrdelta-remove":
            deadline = time.monotonic() + 5
            while downloads.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.append((name, not downloads.exists()))
        real(where, name)

    monkeypatch.setattr(holdings, "remove_entry", remove_entry)
    _update(server.url, dest)
    assert seen == [(f"{holdings.HOP_PREFIX}v8", True)]
    assert [e for e in _entries(dest) if not e.startswith(".btrdelta")] == ["v1", f"v{N}"]
    assert [e for e in _entries(dest) if e.startswith(holdings.HOP_PREFIX)] == []
    assert tree_sum(dest / f"v{N}") == tree_sum(releases[N - 1])


def test_an_update_keeps_one_connection_to_its_mirror(
    signed: tuple[Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every update asks for the next root of the chain, which is not there (HTTP 404):
    its error page is read, so the connection is kept, and the whole path (timestamp,
    index, bins, three deltas) goes over one connection to nginx (was: one more after
    each refused request). Oracle: the connections made to nginx's port, and the tree."""
    import socket

    _, pub = signed
    dest = tmp_path / "dest"
    _update(server.url, dest, "--to", "v1", "--key", str(pub))
    made: list[object] = []
    connect = socket.socket.connect

    def counted(sock: socket.socket, addr: object) -> None:
        if isinstance(addr, tuple) and addr[1] == server.port:
            made.append(addr)
        connect(sock, addr)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", counted)
    before = len(server.requests())
    _update(server.url, dest)
    asked = server.requests()[before:]
    assert {status for status, _n, _uri in asked} - {200, 206} == {404}
    assert len(asked) >= 5, asked
    assert len(made) == 1, asked
    assert tree_sum(dest / f"v{N}") == tree_sum(releases[N - 1])


def test_a_version_held_only_as_an_intermediate_is_given_its_name(
    signed: tuple[Path, Path], releases: list[Path], dest_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An update to v9 that stopped after hop v4 -> v8 (the last delta damaged on the
    server) keeps v8 as the intermediate ``.btrdelta-hop-v8``. ``update --to v1`` (held)
    then left it there, and ``update --to v8`` said 'v8 is already in DEST/v8: nothing to
    download' (exit 0) with no DEST/v8 at all. Now the intermediate is given its name
    (in a directory DEST registered first, as a received version is) and a leftover
    intermediate goes, as at the end of any update."""
    from btrdelta.update.holdings import remove_entry
    from btrdelta.update.publish import Repo

    root, pub = signed
    repo = dest_dir.parent / "www"
    shutil.copytree(root, repo)
    digest, _ = Repo(repo).load().versions[8].deltas[8]
    bad = repo / "deltas" / f"{digest}.delta"
    good = bad.read_bytes()
    damaged = good[:100] + bytes([good[100] ^ 0x40]) + good[101:]
    dest, versions = dest_dir, ("v", ".btrdelta-hop-")
    _update(str(repo), dest, "--to", "v1", "--key", str(pub))
    for target in ("v1", "v8"):
        bad.write_bytes(damaged)
        capsys.readouterr()
        assert main(["update", str(repo), str(dest), "--quiet"]) == 5
        capsys.readouterr()
        assert [e for e in _entries(dest) if e.startswith(versions)] == [
            ".btrdelta-hop-v8", "v1"]
        bad.write_bytes(good)
        assert main(["update", str(repo), str(dest), "--to", target]) == 0
        assert capsys.readouterr().out == \
            f"{target} is already in {dest / target}: nothing to download\n"
        assert [e for e in _entries(dest) if e.startswith(versions)] == sorted({"v1", target})
    assert tree_sum(dest / "v8") == tree_sum(releases[7])
    registry = dest / ".btrdelta-subvols.json"  # a directory DEST: v8 registered
    assert not registry.exists() or "v8" in [
        e["name"] for e in json.loads(registry.read_bytes())["subvols"]]
    # v8 is the parent of the next delta, as any version an update received
    _update(str(repo), dest, "--to", "v9")
    assert tree_sum(dest / "v9") == tree_sum(releases[8])
    remove_entry(dest, "v9")
    assert [e for e in _entries(dest) if e.startswith(versions)] == ["v1", "v8"]
