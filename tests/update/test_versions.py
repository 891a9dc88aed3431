"""``btrdelta update`` from a signed repository of nine real MarkupSafe releases served by
nginx on loopback. Oracles: tree-sum of the release trees, bytes from nginx's access log,
``delta make`` of the exact pair for the direct delta."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.errors import BtrdeltaError
from btrdelta.tree import tree_sum
from btrdelta.update.publish import Repo
from btrdelta.update.sign import sign_repo
from tests.jsondoc import checked
from tests.update.conftest import Nginx

N = 9


@pytest.fixture(scope="module")
def signed(releases: list[Path], tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, Path, Path]:
    """(repository, root public key, timestamp private key)."""
    base = tmp_path_factory.mktemp("versions")
    root = base / "repo"
    keys = {}
    for name in ("root", "ts"):
        trust.save_key_pair(trust.generate_key(), str(base / f"{name}.pem"),
                            str(base / f"{name}.pub"))
        keys[name] = base / f"{name}.pem"
    assert main(["repo", "init", str(root), "--avg-chunk", "4K"]) == 0
    for i, tree in enumerate(releases[:N], 1):
        assert main(["repo", "add", str(root), f"v{i}", str(tree)]) == 0
    assert main(["repo", "sign", str(root), "--key", str(keys["root"]), "--timestamp-key",
                 str(keys["ts"]), "--expires", "1d"]) == 0
    return root, base / "root.pub", keys["ts"]


@pytest.fixture(scope="module")
def server(signed: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Nginx]:
    srv = Nginx(signed[0], tmp_path_factory.mktemp("nginx"))
    yield srv
    srv.stop()


def _update(url: str, dest: Path, key: Path | None, *args: str,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    argv = ["update", url, str(dest), *args] + (["--key", str(key)] if key else [])
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _direct_delta(old: Path, new: Path, work: Path) -> int:
    stream, delta = work / "pair.stream", work / "pair.delta"
    assert main(["send", "--proto", "2", "--parent", str(old), str(new), "-o", str(stream)]) == 0
    assert main(["delta", "make", "-f", str(stream), "--old", str(old), "-o", str(delta)]) == 0
    return delta.stat().st_size


def test_every_start_reaches_newest_and_middle(
    signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, pub, _ = signed
    cat = Repo(root).load()
    ratios = []
    for start in range(0, N):
        for target in (N, 5):
            if start >= target:
                continue
            dest = tmp_path / f"d{start}-{target}"
            if start:
                rc, _, err = _update(server.url, dest, pub, "--to", f"v{start}", capsys=capsys)
                assert rc == 0, err
            before = server.served()
            rc, out, err = _update(server.url, dest, pub, "--to", f"v{target}", "--json",
                                   capsys=capsys)
            assert rc == 0, err
            served = server.served() - before
            report = checked("update", json.loads(out))
            assert tree_sum(dest / f"v{target}") == tree_sum(releases[target - 1])
            if start:  # the old version is still there, untouched
                assert tree_sum(dest / f"v{start}") == tree_sum(releases[start - 1])
            assert sorted(os.listdir(dest)) == sorted(
                [".btrdelta", ".btrdelta-subvols.json", f"v{target}"]
                + ([f"v{start}"] if start else []))
            artifacts = served - report["metadata_bytes"]
            # what nginx sent is the plan (plus multipart/byteranges framing)
            assert report["plan"]["bytes"] <= artifacts <= report["plan"]["bytes"] * 1.02 + 1024
            assert report["plan"]["bytes"] <= cat.versions[target - 1].full_bytes
            if start:
                direct = _direct_delta(releases[start - 1], releases[target - 1], tmp_path)
                ratios.append(artifacts / direct)
                assert artifacts <= 4 * direct, (start, target, artifacts, direct)
    print("planned/direct:", [round(r, 2) for r in ratios])


def _copy_repo(signed: tuple[Path, Path, Path], dest: Path) -> Path:
    """A copy of the repository with its catalog (not the publisher's trees)."""
    shutil.copytree(signed[0], dest, ignore=shutil.ignore_patterns("trees", "lock"))
    return dest


def _at_v8(url: str, tmp_path: Path, pub: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    dest = tmp_path / "dest"
    rc, _, err = _update(url, dest, pub, "--to", "v8", capsys=capsys)
    assert rc == 0, err
    return dest


def _snapshot(dest: Path) -> dict[str, str]:
    """Every entry of DEST but the state directory, with the tree-sum of versions."""
    return {p: tree_sum(dest / p) if (dest / p).is_dir() else "" for p in os.listdir(dest)
            if p != ".btrdelta"}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["delta", "index", "pack", "expired", "rollback", "bin"])
def test_tampering_is_refused_and_dest_unchanged(
    damage: str, signed: tuple[Path, Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, pub, ts_key = signed
    repo = _copy_repo(signed, tmp_path / "www")
    srv = Nginx(repo, tmp_path / "nginx")
    try:
        dest = _at_v8(srv.url, tmp_path, pub, capsys)
        before = _snapshot(dest)
        cat = Repo(root).load()
        args: list[str] = []
        if damage == "delta":
            digest, _ = cat.versions[N - 1].deltas[N - 1]
            _flip(repo / "deltas" / f"{digest}.delta", 1000)
            what = f"deltas/{digest}.delta"
        elif damage == "index":
            _flip(repo / "index" / "1.json", 300)
            what = "index/1.json"
            shutil.rmtree(dest / ".btrdelta" / "meta")  # not the verified copy it has
        elif damage == "bin":
            for b in (repo / "bins").iterdir():
                _flip(b, 50)
            what = "bins/"
            shutil.rmtree(dest / ".btrdelta" / "meta")  # not the verified copy it has
        elif damage == "pack":
            shutil.rmtree(dest)
            dest.mkdir()
            before = _snapshot(dest)
            for pack in (repo / "packs").iterdir():
                _flip(pack, 100)
            for solid in (repo / "solids").iterdir():  # (no frame: the packs instead)
                _flip(solid, 0)  # (its zstd magic: of a later byte, the chunks before it
                # in the frame would check, be kept, and maybe be the damaged ones)
            what = "packs/"
        elif damage == "expired":
            # the cron job stopped: the timestamp ran out (signed an hour ago for a minute)
            sign_repo(str(repo), root_key=None, timestamp_key=str(ts_key), expires=60,
                      index_expires=365 * 86400, now=time.time() - 3600)
            what = "expired"
        else:  # rollback: a newer timestamp was seen, the mirror serves the old one again
            old = (repo / "timestamp.json").read_bytes()
            assert main(["repo", "sign", str(repo), "--timestamp-key", str(ts_key)]) == 0
            # (a run with nothing to do: it trusts the new one; a dry run remembers nothing)
            assert _update(srv.url, dest, pub, "--to", "v8", capsys=capsys)[0] == 0
            (repo / "timestamp.json").write_bytes(old)
            what = "rollback"
        if damage == "pack":
            args = ["--to", "v8"]
        rc, _out, err = _update(srv.url, dest, pub, *args, capsys=capsys)
        assert rc == 5, (damage, rc, err)
        line = err.strip().splitlines()
        if damage == "pack":  # the solid full's line first: its chunks from the packs
            assert "solids/" in line[0], err
            assert "its chunks come from the packs instead" in line.pop(0), err
        assert len(line) == 1, err
        assert what in line[0], line[0]
        assert "Traceback" not in err
        assert _snapshot(dest) == before
    finally:
        srv.stop()


@pytest.mark.parametrize("age", ["0", "0d", "-5m"])
def test_a_lifetime_of_nothing_is_refused(signed: tuple[Path, Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          age: str) -> None:
    """`repo sign --expires 0` (or --index-expires) would publish metadata that expired as
    it was made: one line, exit 2, nothing signed; the API refuses it too."""
    _root, _pub, ts_key = signed
    repo = _copy_repo(signed, tmp_path / "www")
    before = (repo / "timestamp.json").read_bytes()
    for option in ("--expires", "--index-expires"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["repo", "sign", str(repo), "--timestamp-key", str(ts_key), f"{option}={age}"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"not a lifetime: '{age}'" in err[0], err[0]
    with pytest.raises(BtrdeltaError, match="lifetimes must be more than 0"):
        sign_repo(str(repo), root_key=None, timestamp_key=str(ts_key), expires=0,
                  index_expires=86400)
    assert (repo / "timestamp.json").read_bytes() == before


def test_an_older_signed_index_is_a_rollback(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _root, pub, ts_key = signed
    repo = _copy_repo(signed, tmp_path / "www")
    old_ts = (repo / "timestamp.json").read_bytes()
    srv = Nginx(repo, tmp_path / "nginx")
    try:
        root_key = pub.with_suffix(".pem")
        assert main(["repo", "sign", str(repo), "--key", str(root_key), "--timestamp-key",
                     str(ts_key)]) == 0  # index version 2
        dest = _at_v8(srv.url, tmp_path, pub, capsys)
        before = _snapshot(dest)
        (repo / "timestamp.json").write_bytes(old_ts)  # names index 1, validly signed
        rc, _, err = _update(srv.url, dest, pub, capsys=capsys)
        assert rc == 5
        assert "rollback" in err
        assert _snapshot(dest) == before
    finally:
        srv.stop()


def _artifact_bytes(srv: Nginx) -> int:
    return sum(n for _status, n, uri in srv.requests()
               if uri.startswith(("/deltas/", "/packs/", "/fulls/")))


def test_kill_9_and_resume(signed: tuple[Path, Path, Path], releases: list[Path],
                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, pub, _ = signed
    srv = Nginx(root, tmp_path / "nginx", limit_rate="3k")  # slow: kills land mid-transfer
    try:
        dest = tmp_path / "dest"
        rc, _, err = _update(srv.url, dest, pub, "--to", "v1", capsys=capsys)
        assert rc == 0, err
        v1 = tree_sum(dest / "v1")
        rc, out, _ = _update(srv.url, dest, None, "--dry-run", "--json", capsys=capsys)
        plan = checked("update", json.loads(out))["plan"]
        assert plan["hops"] >= 3
        biggest = max(s["bytes"] for s in plan["steps"])
        start = _artifact_bytes(srv)
        rng = random.Random(14)
        kills = 0
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
        for _ in range(12):
            proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "update", srv.url,
                                     str(dest)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env)
            time.sleep(rng.uniform(0.4, 2.0))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            assert tree_sum(dest / "v1") == v1  # the old version is never touched
        rc, _, err = _update(srv.url, dest, None, capsys=capsys)
        assert rc == 0, err
        assert kills >= 2
        assert tree_sum(dest / "v9") == tree_sum(releases[8])
        assert tree_sum(dest / "v1") == v1
        assert sorted(os.listdir(dest)) == [".btrdelta", ".btrdelta-subvols.json", "v1", "v9"]
        again = _artifact_bytes(srv) - start - plan["bytes"]
        # each interruption costs at most the artifact it was downloading
        assert again <= kills * biggest, (again, kills, biggest)
    finally:
        srv.stop()


def test_a_resumed_full_counts_the_chunks_it_holds(
    signed: tuple[Path, Path, Path], server: Nginx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full cut short (Ctrl-C, a dead mirror) leaves its chunks in DEST's store; the
    re-run downloads only the others, and its plan says so: "to download" is what nginx
    then serves. It said the whole full ("58.0 MiB to download" for a Debian full half
    downloaded), and the progress ended at "28.8 MiB of 58.0 MiB, 50%"."""
    from btrdelta.chunk.store import ChunkStore
    from btrdelta.repo.fullindex import decode_full_index
    from btrdelta.update.packs import LocalPacks, open_full

    root, pub, _ = signed
    v = Repo(root).load().versions[0]
    full = decode_full_index((root / "fulls" / f"{v.full_id}.fidx").read_bytes(),
                             source="fidx")
    with open_full(full, LocalPacks(root), source="x") as f:
        data = f.read()
    dest = tmp_path / "dest"
    store = ChunkStore(dest / ".btrdelta" / "chunks")  # what the cut run stored
    idx, pos, entries = full.index, 0, set()
    for n, entry in enumerate(idx.order):
        if n < len(idx.order) // 2:
            store.put(idx.digests[entry], data[pos : pos + idx.raw_sizes[entry]])
            entries.add(entry)
        pos += idx.raw_sizes[entry]
    store.sync()
    rc, out, err = _update(server.url, dest, pub, "--to", "v1", "--dry-run", "--json",
                           capsys=capsys)
    assert rc == 0, err
    plan = checked("update", json.loads(out))
    assert plan["plan"]["steps"][0]["kind"] == "full"
    # the full's chunks less those held (the plan's full index is metadata): fewer bytes
    # than its solid frame, which the plan priced (from nothing), so by chunk ranges
    held = sum(idx.comp_sizes[e] for e in entries)
    assert v.solid is not None
    assert plan["plan"]["bytes"] == v.full_length + v.solid.length
    assert plan["to_download"] == v.full_bytes - v.full_length - held < v.solid.length
    before = server.served()
    rc, out, err = _update(server.url, dest, pub, "--to", "v1", "--json", capsys=capsys)
    assert rc == 0, err
    report = checked("update", json.loads(out))
    artifacts = server.served() - before - report["metadata_bytes"]
    assert plan["to_download"] <= artifacts <= plan["to_download"] * 1.02 + 1024
    assert tree_sum(dest / "v1") == v.identity


class _TruncatingServer:
    """Serves a directory; artifact bodies are cut in half (Content-Length says more)."""

    def __init__(self, root: Path) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range")
                status = 200
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    first, last = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    body, status = data[first : last + 1], 206
                else:
                    body = data
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = self.path.startswith(("/deltas/", "/packs/"))
                self.wfile.write(body[: len(body) // 2] if cut else body)
                if cut:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("fault", ["404", "wrong-bytes", "truncated", "refused"])
def test_a_failing_mirror_is_replaced_by_the_next(
    fault: str, signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    root, pub, _ = signed
    dest = _at_v8(server.url, tmp_path, pub, capsys)
    repo = _copy_repo(signed, tmp_path / "www")
    digest, _ = Repo(root).load().versions[N - 1].deltas[N - 1]
    artifact = repo / "deltas" / f"{digest}.delta"
    bad: Nginx | _TruncatingServer | None = None
    if fault == "404":
        artifact.unlink()
    elif fault == "wrong-bytes":
        _flip(artifact, 10)
    if fault == "truncated":
        bad = _TruncatingServer(repo)
        url = bad.url
    elif fault == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
    else:
        bad = Nginx(repo, tmp_path / "bad")
        url = bad.url
    try:
        rc, _out, err = _update(url, dest, pub, "--mirror", server.url, "--json", capsys=capsys)
        assert rc == 0, err
        assert tree_sum(dest / "v9") == tree_sum(releases[8])
        # the failure is said (it was silent: a broken mirror went unnoticed)
        # the failure is said (it was silent: a broken mirror went unnoticed): a dead one
        # when it is found dead, one that lacked the file or served it wrong once another
        # mirror served it
        moved = [line for line in err.splitlines() if "the next mirror" in line]
        assert len(moved) == 1, err
        assert moved[0].startswith(f"btrdelta update: {url}/"), moved
        assert moved[0].endswith(f"; trying the next mirror, {server.url}" if fault in (
            "refused", "truncated") else f"; the next mirror, {server.url}, served it"), moved
        # every mirror failing is exit 7 (transport) naming each mirror
        if fault in ("404", "refused"):
            shutil.rmtree(dest / "v9")
            rc, _, err = _update(url, dest, pub, capsys=capsys)
            assert rc == 7 if fault == "refused" else rc in (5, 7), err
            assert url in err
    finally:
        if bad is not None:
            bad.stop()


def test_held_versions_are_checked_by_content_and_seed_the_full(
    signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, pub, _ = signed
    dest = tmp_path / "dest"
    dest.mkdir()
    # a plain copy of v9 (never received from the repository) and a v5 that is not v5
    shutil.copytree(releases[8], dest / "v9", symlinks=True)
    shutil.copytree(releases[3], dest / "v5", symlinks=True)
    rc, out, err = _update(server.url, dest, pub, "--to", "v8", "--dry-run", capsys=capsys)
    assert rc == 0, err
    assert "plan: from nothing (a full, reusing the chunks of v9) to v8: 1 hop, " in out
    before = server.served()
    rc, out, err = _update(server.url, dest, pub, "--to", "v8", "--json", capsys=capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["held"] == ["v9"]
    assert [s["kind"] for s in report["plan"]["steps"]] == ["full"]
    full = Repo(root).load().versions[7].full_bytes
    # chunks v8 shares with v9 came from v9's regenerated stream
    assert report["plan"]["bytes"] < full
    assert server.served() - before - report["metadata_bytes"] < full
    assert tree_sum(dest / "v8") == tree_sum(releases[7])
    assert tree_sum(dest / "v5") == tree_sum(releases[3])  # untouched
    # the wrong v5 is refused as a target rather than overwritten
    rc, _, err = _update(server.url, dest, pub, "--to", "v5", capsys=capsys)
    assert rc == 1
    assert "is not version 'v5'" in err
    # a delta from the copied v9? none go backwards; from v8 (received) forward there is one
    shutil.rmtree(dest / "v9")
    rc, out, err = _update(server.url, dest, pub, "--json", capsys=capsys)
    assert rc == 0, err
    assert [s["kind"] for s in json.loads(out)["plan"]["steps"]] == ["delta"]
    assert tree_sum(dest / "v9") == tree_sum(releases[8])


def test_the_plan_line_of_a_full_seeded_by_a_differing_copy_is_a_bound(
    signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A copy of v7 in DEST with one file changed is not held, but seeds the full of v8:
    the plan line said "N bytes to download", N the whole full, and then far fewer came
    (judge30). Now it says "at most N" and names the copy (``--json``: ``seeded_by``);
    the bytes the server sent for artifacts (oracle: nginx's log) stay under N."""
    _, pub, _ = signed
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copytree(releases[6], dest / "v7", symlinks=True)
    changed = next(Path(top) / f for top, _, files in sorted(os.walk(dest / "v7"))
                   for f in sorted(files) if not (Path(top) / f).is_symlink())
    changed.write_bytes(changed.read_bytes() + b"changed here\n")
    rc, out, err = _update(server.url, dest, pub, "--to", "v8", "--dry-run", capsys=capsys)
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("plan: "))
    assert line.startswith("plan: from nothing to v8: 1 hop, "), out
    assert "(at most " in line, out
    assert "the copy of v7 here differs from the repository's: it seeds the full" in out, out
    before = server.served()
    rc, out, err = _update(server.url, dest, pub, "--to", "v8", "--json", capsys=capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["held"] == []
    assert report["seeded_by"] == ["v7"]
    assert [s["kind"] for s in report["plan"]["steps"]] == ["full"]
    assert report["to_download"] == report["plan"]["bytes"]
    artifacts = server.served() - before - report["metadata_bytes"]
    assert artifacts < report["to_download"], (artifacts, report)
    assert tree_sum(dest / "v8") == tree_sum(releases[7])
    rc, out, err = _update(server.url, dest, pub, "--to", "v9", "--dry-run", capsys=capsys)
    assert rc == 0, err
    assert "at most" not in out, out  # (a delta from v8)
    assert "differs" not in out, out


def test_a_delta_hop_reads_only_the_files_its_stream_changed(
    signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path], dest_dir: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hop's result is checked by content identity (oracle: tree-sum of the release),
    reading again only what the stream touched (a file it wrote: read whole, or its
    written ranges read and the rest from the parent); a parent changed after it was checked
    (same size and mtime; on btrfs made writable for that and read-only again) is seen by
    its ctime and the hop refused."""
    from btrdelta.fs import btrfs as sv
    from btrdelta.receive import subvolumes
    from btrdelta.tree import incremental, treesum
    from btrdelta.update import versions

    _, pub, _ = signed
    dest = dest_dir
    rc, _, err = _update(server.url, dest, pub, "--to", "v8", capsys=capsys)
    assert rc == 0, err
    read: list[str] = []
    real = treesum._file_digest

    def spy(path: bytes, size: int, want_layout: bool, *stop: object) -> tuple[str, object]:
        read.append(os.fsdecode(path))
        return real(path, size, want_layout, *stop)  # type: ignore[arg-type]

    real_overlaid = incremental._overlaid

    def overlaid(new: bytes, *args: object) -> str | None:
        got = real_overlaid(new, *args)  # type: ignore[arg-type]
        if got is not None:
            read.append(os.fsdecode(new))
        return got

    snapshots: list[str] = []  # the threads that made the hop's snapshot
    real_snapshot = subvolumes.create_snapshot

    def snapshot(*args: object, **kwargs: object) -> None:
        snapshots.append(threading.current_thread().name)
        real_snapshot(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(treesum, "_file_digest", spy)
    monkeypatch.setattr(incremental, "_overlaid", overlaid)
    monkeypatch.setattr(subvolumes, "create_snapshot", snapshot)
    real_flag = subvolumes.set_readonly

    def set_readonly(fd: int, flag: bool) -> None:
        snapshots.append(threading.current_thread().name)
        real_flag(fd, flag)

    monkeypatch.setattr(subvolumes, "set_readonly", set_readonly)
    rc, out, err = _update(server.url, dest, pub, "--json", capsys=capsys)
    assert rc == 0, err
    assert [s["kind"] for s in json.loads(out)["plan"]["steps"]] == ["delta"]
    # on btrfs made ahead, before the stream's SNAPSHOT was expanded (the same snapshot),
    # and made read-only by the same thread
    assert snapshots == (["btrdelta-snapshot"] * 2 if (dest / "v8").stat().st_ino == 256
                         else [])
    assert tree_sum(dest / "v9") == tree_sum(releases[8])
    in_hop = [p.split("/.btrdelta-tmp-", 1)[1].split("/", 1)[1] for p in read
              if "/.btrdelta-tmp-" in p]
    unchanged = {"markupsafe/_speedups.c", "markupsafe/_native.py", "markupsafe/py.typed"}
    assert in_hop
    assert "markupsafe/__init__.py" in in_hop
    assert not unchanged & set(in_hop)
    assert len(in_hop) < sum(1 for p in (dest / "v9").rglob("*") if p.is_file())
    # the parent: on btrfs its digests were kept by the update that received it (none of
    # its files read again); a directory is read whole
    assert any("/v8/" in p for p in read) != ((dest / "v8").stat().st_ino == 256)

    # v9 again from v8, v8 changed behind the update's back once it was checked
    versions.holdings.remove_entry(dest, "v9")
    real_ensure = versions.holdings.ensure_parent
    victim = dest / "v8" / "markupsafe" / "_speedups.c"

    def writable(flag: bool) -> None:
        fd = os.open(dest / "v8", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if sv.is_btrfs(fd):
                sv.set_readonly(fd, not flag)
        finally:
            os.close(fd)

    def tamper(*args: object) -> Path:
        found = real_ensure(*args)  # type: ignore[arg-type]
        st = victim.stat()
        writable(True)
        with open(victim, "r+b") as f:
            f.write(b"/* changed */")
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        writable(False)
        return found

    monkeypatch.setattr(versions.holdings, "ensure_parent", tamper)
    rc, _, err = _update(server.url, dest, pub, capsys=capsys)
    assert rc != 0
    assert "does not have its content identity" in err
    assert not (dest / "v9").exists()


def test_progress_goes_to_stderr_only_when_asked(
    signed: tuple[Path, Path, Path], server: Nginx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, pub, _ = signed
    rc, out, err = _update(server.url, tmp_path / "a", pub, "--to", "v2", capsys=capsys)
    assert rc == 0
    assert err == ""  # not a terminal: quiet
    assert "plan: from nothing to v2: 1 hop, " in out
    rc, out, err = _update(server.url, tmp_path / "a", pub, "--progress", capsys=capsys)
    assert rc == 0
    assert "hop 1/" in err
    assert "B/s, 100%, ETA" in err  # bytes of the plan: rate, percentage, ETA
    assert "\r" not in err
    assert "v9 is in" in out


def test_a_wrong_key_given_once_is_not_remembered(
    signed: tuple[Path, Path, Path], server: Nginx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The root key is pinned only once an index verified with it: a wrong ``--key``
    (another repository's) is refused and leaves the right one (or none) pinned. It
    replaced the pinned key, so every later update without ``--key`` failed with exit 5."""
    _, pub, _ = signed
    wrong = tmp_path / "other"
    trust.save_key_pair(trust.generate_key(), f"{wrong}.pem", f"{wrong}.pub")
    dest = tmp_path / "d"
    assert _update(server.url, dest, pub, "--to", "v1", capsys=capsys)[0] == 0
    pinned = (dest / ".btrdelta" / "root.pub").read_bytes()
    rc, _, err = _update(server.url, dest, Path(f"{wrong}.pub"), "--to", "v2",
                         capsys=capsys)
    assert rc == 5
    assert "not signed by a trusted key" in err
    assert (dest / ".btrdelta" / "root.pub").read_bytes() == pinned
    rc, _, err = _update(server.url, dest, None, "--to", "v2", capsys=capsys)
    assert rc == 0, err
    # a fresh DEST, a wrong key on a dry run: nothing is pinned, the next run asks for one
    fresh = tmp_path / "fresh"
    assert _update(server.url, fresh, Path(f"{wrong}.pub"), "--dry-run",
                   capsys=capsys)[0] == 5
    rc, _, err = _update(server.url, fresh, None, "--dry-run", capsys=capsys)
    assert rc == 1
    assert "no root key: give --key ROOT_PUB" in err


def _entries(dest: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below ``dest`` (and itself): mode, size, mtime (ns)."""
    out = {}
    for top, dirs, files in os.walk(dest):
        for name in ["", *dirs, *files]:
            st = os.lstat(os.path.join(top, name))
            out[os.path.relpath(os.path.join(top, name), dest)] = (st.st_mode, st.st_size,
                                                                    st.st_mtime_ns)
    return out


def test_a_dry_run_writes_nothing(signed: tuple[Path, Path, Path], server: Nginx,
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`update --dry-run` plans and writes nothing: a DEST that does not exist is not made
    (no `.btrdelta`, no pinned key), one that holds a version keeps every entry, size and
    mtime (no lock file, trusted state, root or metadata cache, no clean-up), also with a
    key given (not pinned: the real run takes it again) and its metadata cache gone."""
    _, pub, _ = signed
    fresh = tmp_path / "fresh"
    rc, out, err = _update(server.url, fresh, pub, "--dry-run", capsys=capsys)
    assert rc == 0, err
    assert "plan: from nothing to v9: " in out
    assert not fresh.exists()
    dest = tmp_path / "dest"
    assert _update(server.url, dest, pub, "--to", "v1", capsys=capsys)[0] == 0
    shutil.rmtree(dest / ".btrdelta" / "meta")
    os.unlink(dest / ".btrdelta" / "lock")
    (dest / ".btrdelta-tmp-1-99999999").mkdir()  # a leftover a real run removes
    before = _entries(dest)
    time.sleep(0.01)
    rc, out, err = _update(server.url, dest, pub, "--to", "v8", "--dry-run", capsys=capsys)
    assert rc == 0, err
    assert "plan: from v1 to v8: " in out
    assert _entries(dest) == before
    rc, _, err = _update(server.url, dest, None, "--dry-run", capsys=capsys)
    assert rc == 0, err  # (the key pinned by the real run)


def test_repo_ls_over_http_and_timestamp_keys(
    signed: tuple[Path, Path, Path], server: Nginx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, pub, _ = signed
    capsys.readouterr()
    assert main(["repo", "ls", server.url, "--key", str(pub), "--json"]) == 0
    listing = checked("repo ls", json.loads(capsys.readouterr().out))
    assert [v["name"] for v in listing["versions"]] == [f"v{i}" for i in range(1, N + 1)]
    assert "verified" in listing["signed"]
    local = Repo(root).load()
    assert listing["versions"][8]["full_bytes"] == local.versions[8].full_bytes
    # the cron job cannot use a key the index does not list
    stranger = tmp_path / "k"
    trust.save_key_pair(trust.generate_key(), str(stranger) + ".pem", str(stranger) + ".pub")
    repo = _copy_repo(signed, tmp_path / "www")
    assert main(["repo", "sign", str(repo), "--timestamp-key", str(stranger) + ".pem"]) == 1
    assert "not one the current index lists" in capsys.readouterr().err


def test_a_version_a_power_cut_damaged_is_replaced_not_a_strangers(
    signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No received tree is synced before its rename (docs/repository.md): a power cut
    after it can leave DEST/V with lost data, and every later update refused V ("not
    touching it"), the device stuck. A V this DEST's updates made (its registry entry owns
    the directory) is now replaced, with one line; a directory a person put under a
    version's name is still refused untouched; --dry-run says so and changes nothing."""
    _, pub, _ = signed
    dest = tmp_path / "d"
    rc, _, err = _update(server.url, dest, pub, "--to", "v3", capsys=capsys)
    assert rc == 0, err
    # what a power cut after the rename can leave: names and sizes, the data gone
    victim = max((p for p in (dest / "v3").rglob("*") if p.is_file() and not p.is_symlink()),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.write(bytes(victim.stat().st_size))
    before = _entries(dest)
    rc, _, err = _update(server.url, dest, pub, "--to", "v3", "--dry-run", capsys=capsys)
    assert rc == 0, err
    assert "is not version 'v3' any more" in err, err
    assert "would replace it" in err, err
    assert _entries(dest) == before
    rc, _, err = _update(server.url, dest, pub, "--to", "v3", capsys=capsys)
    assert rc == 0, err
    assert err.count("replacing it") == 1, err
    assert tree_sum(dest / "v3") == tree_sum(releases[2])
    rc, _, err = _update(server.url, dest, pub, "--to", "v4", capsys=capsys)  # (swept)
    assert rc == 0, err
    assert not [n for n in os.listdir(dest) if "broken" in n]
    # someone else's directory under a version's name: refused, left as it is
    (dest / "v5").mkdir()
    (dest / "v5" / "mine").write_text("mine\n")
    rc, _, err = _update(server.url, dest, pub, "--to", "v5", capsys=capsys)
    assert rc == 1
    assert "not touching it" in err, err
    assert (dest / "v5" / "mine").read_text() == "mine\n"


def test_repo_ls_of_the_publishers_directory_with_key_verifies_it(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`repo ls REPO --key ROOT_PUB` of the publisher's own directory listed its catalog and
    ignored the key (newuser22): it now verifies the signed index as a client would, and
    refuses another key, or a repository not signed yet, with one line."""
    root, pub, _ = signed
    capsys.readouterr()
    assert main(["repo", "ls", str(root), "--key", str(pub), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert "verified" in listing["signed"]
    assert [v["name"] for v in listing["versions"]] == [f"v{i}" for i in range(1, N + 1)]
    stranger = tmp_path / "k"
    trust.save_key_pair(trust.generate_key(), str(stranger) + ".pem", str(stranger) + ".pub")
    assert main(["repo", "ls", str(root), "--key", str(stranger) + ".pub"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "not signed by a trusted key" in err, err
    www = _copy_repo(signed, tmp_path / "www")
    (www / "timestamp.json").unlink()  # `repo add` done, `repo sign` not yet
    assert main(["repo", "ls", str(www), "--key", str(pub)]) == 1
    err = capsys.readouterr().err
    assert "has none yet (btrdelta repo sign" in err, err
    assert main(["repo", "ls", str(www)]) == 0  # without --key: the catalog, as before


def test_no_timestamp_says_there_is_no_signed_repository(
    signed: tuple[Path, Path, Path], server: Nginx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A new user's first mistakes: `update` (or `repo ls`) of a repository not signed
    yet, or a wrong URL, said only 'HTTP 404' or 'No such file or directory'."""
    _, pub, _ = signed
    www = _copy_repo(signed, tmp_path / "www")
    (www / "timestamp.json").unlink()  # `repo add` done, `repo sign` not yet
    for url in (str(www), f"{server.url}/no/such/repo"):
        rc, _, err = _update(url, tmp_path / "d", pub, capsys=capsys)
        assert rc == 7
        assert err.count("\n") == 1, err
        assert "no signed repository here" in err, err
        assert "`btrdelta repo sign`" in err, err
    # (repo ls of the publisher's directory lists its catalog, signed or not)
    assert main(["repo", "ls", f"{server.url}/no/such/repo", "--key", str(pub)]) == 7
    assert "no signed repository here" in capsys.readouterr().err
    assert not (tmp_path / "d" / ".btrdelta" / "root.pub").exists()


def test_a_local_directory_or_file_url_is_a_mirror(
    signed: tuple[Path, Path, Path], releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every fetching path (index, deltas, the chunk ranges of a full) reads a plain path
    or a ``file://`` URL; a local mirror missing files gives way to the next."""
    _, pub, _ = signed
    www = _copy_repo(signed, tmp_path / "www")
    shutil.rmtree(www / Repo(www).meta.name)  # a mirror's copy: no publisher catalog
    url = (www.as_uri() + "/").replace("%20", " ")
    # from nothing: the plan is the full (chunk ranges read from the local packs)
    rc, out, err = _update(str(www), tmp_path / "a", pub, "--to", "v4", "--json",
                           capsys=capsys)
    assert rc == 0, err
    assert [s["kind"] for s in json.loads(out)["plan"]["steps"]] == ["full"]
    assert tree_sum(tmp_path / "a" / "v4") == tree_sum(releases[3])
    # then deltas from a file:// URL
    rc, out, err = _update(url, tmp_path / "a", None, "--json", capsys=capsys)
    assert rc == 0, err
    assert {s["kind"] for s in json.loads(out)["plan"]["steps"]} == {"delta"}
    assert tree_sum(tmp_path / "a" / "v9") == tree_sum(releases[8])
    # a local mirror without its packs (nor solid fulls): the full's chunks come from the
    # next mirror
    broken = tmp_path / "broken"
    shutil.copytree(www, broken)
    shutil.rmtree(broken / "packs")
    shutil.rmtree(broken / "solids")
    rc, out, err = _update(str(broken), tmp_path / "b", pub, "--mirror", url, "--json",
                           capsys=capsys)
    assert rc == 0, err
    assert [s["kind"] for s in json.loads(out)["plan"]["steps"]] == ["full"]
    assert tree_sum(tmp_path / "b" / "v9") == tree_sum(releases[8])
    # alone, it fails naming the pack (exit 7)
    rc, _, err = _update(str(broken), tmp_path / "c", pub, capsys=capsys)
    assert rc == 7
    assert "packs/" in err
    assert "No such file" in err
    assert not (tmp_path / "c" / "v9").exists()
    # repo ls of a mirror's copy by file:// URL, verified
    assert main(["repo", "ls", url, "--key", str(pub), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in listing["versions"]] == [f"v{i}" for i in range(1, N + 1)]
    assert "verified" in listing["signed"]


def test_a_root_key_that_did_not_sign_the_index_is_refused(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Before any rotation the root key is the one that signed the current index: another
    key (a publisher's slip) is refused, nothing written. It signed index 2, and every
    device that pinned the first key refused the repository from then on (exit 5)."""
    _, pub, ts = signed
    www = _copy_repo(signed, tmp_path / "www")
    stranger, stranger_pub = tmp_path / "k.pem", tmp_path / "k.pub"
    trust.save_key_pair(trust.generate_key(), str(stranger), str(stranger_pub))
    before = _snapshot(www)
    capsys.readouterr()
    assert main(["repo", "sign", str(www), "--key", str(stranger)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "did not sign index 1" in err, err
    # the file named as a file ("path 'www/index/1.json'" was the form of a stream's path)
    assert err.startswith(f"btrdelta repo sign: error: {www}/index/1.json: this root key"), err
    assert main(["repo", "sign", str(www), "--key", str(pub.with_suffix(".pem")),
                 "--previous-key", str(ts)]) == 1
    assert "--previous-key did not sign index 1" in capsys.readouterr().err
    assert _snapshot(www) == before
    assert main(["repo", "sign", str(www), "--key", str(pub.with_suffix(".pem"))]) == 0


def test_root_key_rotation_through_the_cli(
    signed: tuple[Path, Path, Path], releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``repo sign --key NEW --previous-key OLD``: a device that pinned OLD follows
    ``root/2.json`` to NEW; then OLD (or anyone) cannot extend the chain or sign indexes."""
    from btrdelta.repo.rootchain import make_root

    _, old_pub, _ = signed
    old_key = old_pub.with_suffix(".pem")
    www = _copy_repo(signed, tmp_path / "www")
    srv = Nginx(www, tmp_path / "nginx")
    try:
        rc, _, err = _update(srv.url, tmp_path / "dev", old_pub, "--to", "v3", capsys=capsys)
        assert rc == 0, err
        new_key, new_pub = tmp_path / "new.pem", tmp_path / "new.pub"
        trust.save_key_pair(trust.generate_key(), str(new_key), str(new_pub))
        assert main(["repo", "sign", str(www), "--key", str(new_key), "--previous-key",
                     str(old_key), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["root_version"] == 2
        assert (www / "root" / "2.json").exists()
        # the rotated-out key signs nothing more
        assert main(["repo", "sign", str(www), "--key", str(old_key)]) == 1
        assert "rotated out" in capsys.readouterr().err
        # the device, pinned to the old key, follows the chain (no --key given)
        rc, _, err = _update(srv.url, tmp_path / "dev", None, capsys=capsys)
        assert rc == 0, err
        assert tree_sum(tmp_path / "dev" / "v9") == tree_sum(releases[8])
        # a new device given the new key, and repo ls with the old one
        rc, _, err = _update(srv.url, tmp_path / "dev2", new_pub, "--to", "v2", capsys=capsys)
        assert rc == 0, err
        assert main(["repo", "ls", srv.url, "--key", str(old_pub), "--json"]) == 0
        assert "verified" in json.loads(capsys.readouterr().out)["signed"]
        # the old key (stolen) vouching for an attacker's root 3: refused, exit 5
        thief = trust.generate_key()
        (www / "root" / "3.json").write_bytes(
            make_root(3, [thief], [trust.load_private_key(str(old_key))]))
        before = _snapshot(tmp_path / "dev")
        shutil.rmtree(tmp_path / "dev" / "v9")
        before.pop("v9")
        for dest, key in ((tmp_path / "dev", None), (tmp_path / "dev3", old_pub)):
            rc, _, err = _update(srv.url, dest, key, capsys=capsys)
            assert rc == 5, err
            assert "root/3.json" in err
            assert err.count("\n") == 1
        assert _snapshot(tmp_path / "dev") == before
        assert not (tmp_path / "dev3" / "v9").exists()
        # a second, real rotation: both devices follow; one shipped with the newest key
        # skips root 2 (its key did not sign it) and trusts root 3
        (www / "root" / "3.json").unlink()
        newer_key, newer_pub = tmp_path / "newer.pem", tmp_path / "newer.pub"
        trust.save_key_pair(trust.generate_key(), str(newer_key), str(newer_pub))
        assert main(["repo", "sign", str(www), "--key", str(newer_key), "--previous-key",
                     str(new_key)]) == 0
        for dest, key in ((tmp_path / "dev", None), (tmp_path / "dev3", old_pub),
                          (tmp_path / "dev4", newer_pub)):
            rc, _, err = _update(srv.url, dest, key, capsys=capsys)
            assert rc == 0, err
            assert tree_sum(dest / "v9") == tree_sum(releases[8])
    finally:
        srv.stop()


@pytest.mark.btrfs
def test_btrfs_dest_gets_read_only_subvolumes(
    signed: tuple[Path, Path, Path], server: Nginx, releases: list[Path], btrfs_dest: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from btrdelta.fs import btrfs as sv
    from btrdelta.repo.model import stream_uuid
    from btrdelta.update import holdings

    _, pub, _ = signed
    dest = btrfs_dest
    rc, _, err = _update(server.url, dest, pub, "--to", "v4", capsys=capsys)
    assert rc == 0, err
    # a plain directory copy of v6: not received, yet a parent for the deltas from it
    shutil.copytree(releases[5], dest / "v6", symlinks=True)
    rc, out, err = _update(server.url, dest, pub, "--json", capsys=capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["plan"]["start"] == "v6"
    assert tree_sum(dest / "v9") == tree_sum(releases[8])
    assert sorted(os.listdir(dest)) == [".btrdelta", "v4", "v6", "v9"]
    for name, pos in (("v4", 4), ("v9", 9)):
        assert (dest / name).stat().st_ino == 256  # a subvolume
        with pytest.raises(OSError, match="Read-only"):
            (dest / name / "new-file").write_text("x")
        identity = Repo(signed[0]).load().versions[pos - 1].identity
        assert sv.find_subvolumes_by_uuid(dest, stream_uuid(identity))[0].name == name
    # v9 is held by its kept digests (no file read), until a write through a
    # descriptor opened while it was writable: then it is not v9 any more
    hashed: list[Path] = []
    real = holdings.verified_digests
    monkeypatch.setattr(holdings, "verified_digests",
                        lambda path: hashed.append(path) or real(path))
    rc, out, err = _update(server.url, dest, pub, "--json", capsys=capsys)
    assert rc == 0, err
    assert json.loads(out)["plan"]["steps"] == []
    assert hashed == [dest / "v6"]  # (a directory)
    victim = next(p for p in (dest / "v9").rglob("*.py") if p.stat().st_size > 10)
    fd = os.open(dest / "v9", os.O_RDONLY | os.O_DIRECTORY)
    try:
        sv.set_readonly(fd, False)
        wfd = os.open(victim, os.O_WRONLY)
        sv.set_readonly(fd, True)
    finally:
        os.close(fd)
    try:
        os.pwrite(wfd, b"#", 0)
        rc, _, err = _update(server.url, dest, pub, capsys=capsys)
    finally:
        os.close(wfd)
    assert rc == 1
    assert "is not version 'v9'" in err
    assert dest / "v9" in hashed


def test_the_update_path_makes_its_value_classes_without_dataclasses() -> None:
    """The modules an ``update`` imports (the command, the repository, the transport, the
    chunk store, what its thread imports ahead) make their value classes with
    ``btrdelta._value`` (no code compiled per class, the class made once), not
    ``@dataclass``: ~40 of them were ~140 M instructions of an update's start. Left:
    tree-sum's ``Entry`` (a field left out of its comparison, a memo in its ``__dict__``)."""
    code = """
import sys
import btrdelta.cli.update_cmd
from btrdelta.update import versions
versions._import_ahead().join()
print(sorted(f"{m}.{k}" for m, mod in list(sys.modules.items()) if m.startswith("btrdelta")
             for k, v in vars(mod).items()
             if isinstance(v, type) and v.__module__ == m and hasattr(v, "__dataclass_fields__")),
      len([m for m in sys.modules if m.startswith("btrdelta.")]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("] ")
    assert out[0] + "]" == "['btrdelta.tree.treesum.Entry']"
    assert int(out[1]) > 60  # (the update's modules were imported)


def test_a_hop_s_imports_are_made_ahead() -> None:
    """What receiving a delta hop imports (the expansion, the C appliers of streams and of
    hdiff patches, the walk) is imported by a thread that ``update`` starts before it
    plans: a fresh process spent ~55 ms on it inside its first hop. ``hdiffpatch`` is
    not: the C applier of hdiff patches stands for it."""
    code = """
import sys
from btrdelta.update import versions
wanted = ["btrdelta.delta.events", "btrdelta.update.receive", "btrdelta.delta._hpatch",
          "btrdelta.receive._fastapply", "btrdelta.tree._treewalk"]
assert not [m for m in wanted if m in sys.modules], [m for m in wanted if m in sys.modules]
versions._import_ahead().join()
print(" ".join(m for m in wanted if m not in sys.modules), "hdiffpatch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items()
                                          if not k.startswith("BTRDELTA_")})
    assert out.stdout.strip() == "False"


def test_a_mirror_that_synced_timestamp_json_first_is_named_once(
    signed: tuple[Path, Path, Path], releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A mirror that copied the new timestamp.json before the index it names (synced in the
    wrong order): alone, the update fails naming that index once, where it was looked for
    (the message said the directory twice, 'www/www/index/2.json', or the URL twice); with
    a good mirror after it, the update goes on there."""
    _root, pub, ts_key = signed
    good = _copy_repo(signed, tmp_path / "good")
    assert main(["repo", "sign", str(good), "--key", str(pub.with_suffix(".pem")),
                 "--timestamp-key", str(ts_key)]) == 0  # index version 2
    early = _copy_repo(signed, tmp_path / "early")
    shutil.copy2(good / "timestamp.json", early / "timestamp.json")
    assert not (early / "index" / "2.json").exists()
    srv = Nginx(early, tmp_path / "nginx")
    try:
        for url in (str(early), srv.url):
            rc, _, err = _update(url, tmp_path / "d", pub, capsys=capsys)
            assert rc == 7, err
            assert err.count("\n") == 1, err
            assert f": error: {url}/index/2.json: " in err, err
            assert err.count("index/2.json") == 1, err
        assert not (tmp_path / "d" / ".btrdelta" / "root.pub").exists()
        rc, _, err = _update(srv.url, tmp_path / "d", pub, "--to", "v2", "--mirror", str(good),
                             capsys=capsys)
        assert rc == 0, err
        assert tree_sum(tmp_path / "d" / "v2") == tree_sum(releases[1])
    finally:
        srv.stop()


def test_a_newer_timestamp_seen_is_never_gone_back_from(
    signed: tuple[Path, Path, Path], releases: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A mirror that synced the new timestamp.json first (its index missing), then a stale
    mirror with the old, still valid state: the newer timestamp verifies with the keys of
    the index the device trusts, so the stale one is a rollback, in this run and the next
    (TUF 1.0 §5.4.3, §5.4.5). The stale state was taken in the same run, and the
    newer timestamp forgotten."""
    _root, pub, ts_key = signed
    stale = _copy_repo(signed, tmp_path / "stale")
    dest = tmp_path / "d"
    rc, _, err = _update(str(stale), dest, pub, "--to", "v1", capsys=capsys)
    assert rc == 0, err
    good = _copy_repo(signed, tmp_path / "good")
    assert main(["repo", "sign", str(good), "--key", str(pub.with_suffix(".pem")),
                 "--timestamp-key", str(ts_key)]) == 0  # index version 2
    early = _copy_repo(signed, tmp_path / "early")
    shutil.copy2(good / "timestamp.json", early / "timestamp.json")
    before = _snapshot(dest)
    rc, _, err = _update(str(early), dest, None, "--mirror", str(stale), capsys=capsys)
    assert rc == 5, err
    assert "timestamp version 1 is older than version 2 already seen" in err, err
    assert err.count("\n") == 1, err
    rc, _, err = _update(str(stale), dest, None, capsys=capsys)  # the next run, alone
    assert rc == 5, err
    assert "older than version 2 already seen" in err, err
    assert _snapshot(dest) == before
    rc, _, err = _update(str(stale), dest, None, "--to", "v2", "--mirror", str(good),
                         capsys=capsys)
    assert rc == 0, err
    assert tree_sum(dest / "v2") == tree_sum(releases[1])
    # a timestamp nothing verifies (no index trusted yet: a first update) is not kept
    fresh = tmp_path / "fresh"
    rc, _, err = _update(str(early), fresh, pub, "--to", "v1", "--mirror", str(stale),
                         capsys=capsys)
    assert rc == 0, err


def test_a_first_update_that_fails_leaves_nothing_and_a_private_key_is_refused(
    signed: tuple[Path, Path, Path], releases: list[Path], server: Nginx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A first update refused before any index verified (a private key given, a wrong
    key, no repository at the URL) leaves DEST as it found it: absent, or without
    `.btrdelta/`. The private root key was taken (its public half pinned), and each
    failure left `DEST/.btrdelta/` (lock, metadata cache)."""
    _, pub, _ = signed
    repo = _copy_repo(signed, tmp_path / "www")
    dest = tmp_path / "new"
    for cmd in (["update", str(repo), str(dest)], ["repo", "ls", server.url]):
        capsys.readouterr()
        rc = main([*cmd, "--key", str(pub.with_suffix(".pem"))])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.count("\n") == 1, err
        assert "is a private key" in err, err
        assert not dest.exists()
    wrong = tmp_path / "other"
    trust.save_key_pair(trust.generate_key(), f"{wrong}.pem", f"{wrong}.pub")
    rc, _, err = _update(str(repo), dest, Path(f"{wrong}.pub"), capsys=capsys)
    assert rc == 5, err
    assert not dest.exists()
    dest.mkdir()
    for url, key, code in ((str(repo), Path(f"{wrong}.pub"), 5),
                           (str(tmp_path / "nothing"), pub, 7)):
        rc, _, err = _update(url, dest, key, capsys=capsys)
        assert rc == code, err
        assert os.listdir(dest) == []
    rc, _, err = _update(str(repo), dest, pub, "--to", "v1", capsys=capsys)
    assert rc == 0, err
    assert tree_sum(dest / "v1") == tree_sum(releases[0])
