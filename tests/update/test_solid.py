"""A first install from a repository's solid full (``repo/solid.py``): real MarkupSafe
releases published with ``repo add``, served by nginx, installed with ``btrdelta update``.
Oracles: tree-sum of the release trees, the bytes and paths nginx's access log shows."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.repo.fullindex import decode_full_index
from btrdelta.repo.html import _size
from btrdelta.repo.solid import Frame, Solid, cut_frames
from btrdelta.tree import tree_sum
from btrdelta.update.publish import Repo
from tests.conftest import Children
from tests.update.conftest import Nginx


def _publish(base: Path, trees: list[Path], *init: str, sign: bool = True) -> Path:
    """``base/repo`` with the trees as v1, v2, ... (signed with ``base/root.pem`` unless
    ``sign`` is false)."""
    root = base / "repo"
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "root.pem").exists():
        trust.save_key_pair(trust.generate_key(), str(base / "root.pem"),
                            str(base / "root.pub"))
    assert main(["repo", "init", str(root), "--avg-chunk", "4K", *init]) == 0
    for i, tree in enumerate(trees, 1):
        assert main(["repo", "add", "-q", str(root), f"v{i}", str(tree)]) == 0
    if sign:
        _sign(base)
    return root


def _sign(base: Path) -> None:
    assert main(["repo", "sign", "-q", str(base / "repo"), "--key", str(base / "root.pem")]) == 0


def _install(srv: Nginx, dest: Path, base: Path, capsys: pytest.CaptureFixture[str],
             *args: str) -> tuple[dict[str, object], list[str], int, str]:
    """An update of ``dest`` (``--json``): its report, the paths nginx served for it, the
    body bytes of its artifacts (full index, solid full, packs, deltas), standard error."""
    before = len(srv.requests())
    capsys.readouterr()
    rc = main(["update", srv.url, str(dest), "--json", "--key", str(base / "root.pub"), *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    served = srv.requests()[before:]
    paths = [uri.lstrip("/") for _status, _n, uri in served]
    artifacts = sum(n for _status, n, uri in served
                    if uri.startswith(("/fulls/", "/solids/", "/packs/", "/deltas/")))
    return report, paths, artifacts, err


def _install_from(root: Path, base: Path, capsys: pytest.CaptureFixture[str], *args: str
                  ) -> tuple[dict[str, object], list[str], int, str]:
    """:func:`_install` into ``base/dest`` from nginx serving ``root``."""
    srv = Nginx(root, base / "nginx")
    try:
        return _install(srv, base / "dest", base, capsys, *args)
    finally:
        srv.stop()


def test_a_first_install_downloads_the_solid_full_and_fewer_bytes(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From nothing, v3's full comes as its solid frames (no pack is read): fewer bytes
    than the chunked full of the same repository published without solid fulls
    (``--solid-level 0``), what the plan said, and the tree is the release's."""
    solid_root = _publish(tmp_path / "s", releases[:3])
    chunked_root = _publish(tmp_path / "c", releases[:3], "--solid-level", "0")
    assert not (chunked_root / "solids").exists()
    rec = Repo(solid_root).load().versions[2]
    assert rec.solid is not None
    sizes = {}
    for name, root in (("solid", solid_root), ("chunked", chunked_root)):
        srv = Nginx(root, tmp_path / f"nginx-{name}")
        try:
            dest = tmp_path / f"dest-{name}"
            report, paths, artifacts, _err = _install(srv, dest, tmp_path / name[0], capsys)
        finally:
            srv.stop()
        assert tree_sum(dest / "v3") == tree_sum(releases[2])
        plan = report["plan"]
        assert isinstance(plan, dict)
        assert [s["kind"] for s in plan["steps"]] == ["full"]
        got = [p for p in paths if p.startswith(("solids/", "packs/"))]
        if name == "solid":
            assert got == [rec.solid.path]  # one frame, one range
            # its full index and its one frame: what the plan said, and the publisher's
            # page (its v3 row: the first install)
            assert artifacts == plan["bytes"] == rec.full_length + rec.solid.length
            row = re.findall(r'<tr class="version">.*?</tr>',
                             (solid_root / "index.html").read_text())[2]
            assert f"<td class=n>{_size(plan['bytes'])}</td>" in row, row
        else:
            assert got
            assert all(p.startswith("packs/") for p in got)
        sizes[name] = artifacts
    assert sizes["solid"] < sizes["chunked"] * 0.95, sizes


def _corrupt_middle(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_a_bad_solid_file_on_the_mirror_costs_its_chunks_instead(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """A mirror whose solid file is corrupt, cut short or absent: one warning line naming
    the file (and the frame, where it was read), the frame's chunks from the packs, the
    release installed all the same (every chunk checked against its id)."""
    root = _publish(tmp_path, releases[:1])
    rec = Repo(root).load().versions[0]
    assert rec.solid is not None
    bad = tmp_path / "bad"
    shutil.copytree(root, bad, ignore=shutil.ignore_patterns(".btrdelta"))
    solid = bad / rec.solid.path
    if damage == "corrupt":
        _corrupt_middle(solid)
    elif damage == "truncated":
        with open(solid, "r+b") as f:
            f.truncate(solid.stat().st_size // 2)
    else:
        solid.unlink()
    _report, paths, _artifacts, err = _install_from(bad, tmp_path, capsys)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert rec.solid.path in lines[0]
    assert "its chunks come from the packs instead" in lines[0]
    if damage == "corrupt":
        assert "frame 0 " in lines[0], err
    assert any(p.startswith("packs/") for p in paths)
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


def test_a_frame_is_retried_on_the_next_mirror(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first mirror's solid file is corrupt, the second's is good: the frame comes from
    the second, no pack is read anywhere."""
    root = _publish(tmp_path, releases[:1])
    rec = Repo(root).load().versions[0]
    assert rec.solid is not None
    bad = tmp_path / "bad"
    shutil.copytree(root, bad, ignore=shutil.ignore_patterns(".btrdelta"))
    _corrupt_middle(bad / rec.solid.path)
    _report, paths, _artifacts, err = _install_from(bad, tmp_path, capsys, "--mirror",
                                                    str(root))
    assert f"the next mirror, {root}, served it" in err, err
    assert "packs instead" not in err
    assert not any(p.startswith("packs/") for p in paths)
    assert rec.solid.path in paths
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


@pytest.mark.parametrize("mirror", ["nginx", "directory"])
def test_a_solid_file_no_mirror_has_is_one_line_not_one_per_frame(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], mirror: str
) -> None:
    """A mirror copied without ``solids/`` (an rsync filter of the directories it knew):
    the first frame's 404 (no such file, from a directory) sends the chunks of every
    frame to the packs in one warning line; the file is not asked again for each frame
    (one line and one request a frame). Oracles: nginx's log, tree-sum."""
    root = _publish(tmp_path, releases[:1], sign=False)
    solid = _two_frames(root, tmp_path, parts=4)[0]
    assert len(solid.frames) >= 3
    (root / solid.path).unlink()
    if mirror == "nginx":
        _report, paths, _artifacts, err = _install_from(root, tmp_path, capsys)
        assert paths.count(solid.path) == 1, paths
    else:
        capsys.readouterr()
        assert main(["update", str(root), str(tmp_path / "dest"),
                     "--key", str(tmp_path / "root.pub")]) == 0
        err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert solid.path in lines[0], err
    assert "its chunks come from the packs instead (and those of the " \
           f"{len(solid.frames) - 1} frames after it: no mirror has the file)" in lines[0], err
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


def _stream_and_sizes(root: Path, position: int) -> tuple[bytes, list[int]]:
    """The release's plain stream (from its solid full) and its chunk sizes in order."""
    v = Repo(root).load().versions[position - 1]
    assert v.solid is not None
    stream = b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(
        (root / v.solid.path).read_bytes()[f.offset : f.offset + f.length])
        for f in v.solid.frames)
    idx = decode_full_index((root / f"fulls/{v.full_id}.fidx").read_bytes(), source="x").index
    return stream, [idx.raw_sizes[e] for e in idx.order]


def _forge(root: Path, position: int, frames: list[bytes], counts: list[int]) -> Solid:
    """Publish ``frames`` (each one zstd frame of ``counts`` chunks) as the version's solid
    full in the catalog: what ``repo sign`` then signs."""
    repo = Repo(root)
    cat = repo.load()
    blob = b"".join(frames)
    made, offset, first = [], 0, 0
    for data, count in zip(frames, counts, strict=True):
        made.append(Frame(offset, len(data), first, count))
        offset += len(data)
        first += count
    solid = Solid.make(blake3.blake3(blob).hexdigest(), made)
    (root / solid.path).write_bytes(blob)
    cat.versions[position - 1].solid = solid
    repo.save(cat)
    return solid


@pytest.mark.parametrize("forgery", ["short", "flipped"])
def test_a_signed_solid_that_does_not_decompress_to_the_release_is_not_installed(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], forgery: str
) -> None:
    """A solid full signed by the index whose frame decompresses to fewer bytes than its
    chunks, or to the right size with one byte changed: one warning line naming the file
    and the frame, nothing of it stored, the chunks from the packs."""
    root = _publish(tmp_path, releases[:1], sign=False)
    stream, sizes = _stream_and_sizes(root, 1)
    changed = bytearray(stream)
    if forgery == "short":
        del changed[-1]
    else:
        changed[len(changed) // 2] ^= 1
    solid = _forge(root, 1, [zstandard.ZstdCompressor(level=3).compress(bytes(changed))],
                   [len(sizes)])
    _sign(tmp_path)
    _report, paths, _artifacts, err = _install_from(root, tmp_path, capsys)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert solid.path in lines[0], err
    if forgery == "short":
        assert f"frame 0 ([0, {solid.length})): says {len(stream) - 1} bytes, its chunks " \
               f"are {len(stream)}" in lines[0], err
    else:
        assert "frame 0: chunk " in lines[0], err
        assert "does not match its id" in lines[0], err
    assert solid.path in paths
    assert any(p.startswith("packs/") for p in paths)
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


def test_only_the_frame_that_fails_costs_its_chunks(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A solid full of two frames (cut at a chunk boundary near the middle), the second
    corrupt on the mirror: the first frame's chunks are not fetched from the packs, the
    second's are (fewer pack bytes than the chunked full's)."""
    root = _publish(tmp_path, releases[:1], sign=False)
    solid = _two_frames(root, tmp_path)[0]
    _corrupt_middle(root / solid.path, solid.frames[1].offset + solid.frames[1].length // 2)
    v = Repo(root).load().versions[0]
    srv = Nginx(root, tmp_path / "nginx")
    try:
        before = len(srv.requests())
        _report, _paths, _artifacts, err = _install(srv, tmp_path / "dest", tmp_path, capsys)
        packs = sum(n for _s, n, uri in srv.requests()[before:] if uri.startswith("/packs/"))
    finally:
        srv.stop()
    assert "frame 1 " in err, err
    assert "frame 0" not in err, err
    assert 0 < packs < v.full_bytes - v.full_length
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


def test_repo_gc_keeps_the_solid_fulls_and_removes_a_stray_one(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _publish(tmp_path, releases[:2])
    kept = sorted(p.name for p in (root / "solids").iterdir())
    assert len(kept) == 2
    stray = root / "solids" / f"{'0' * 64}.zst"
    stray.write_bytes(b"x")
    capsys.readouterr()
    assert main(["repo", "gc", str(root), "--json"]) == 0
    assert "solids/" + stray.name in json.loads(capsys.readouterr().out)["removed"]
    assert sorted(p.name for p in (root / "solids").iterdir()) == kept


def test_a_device_holding_another_release_takes_the_cheaper_of_frame_and_chunks(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DEST holds v3 and wants v1 (no delta goes back): the full of v1 is priced and
    fetched given v3's chunks. The chunks v1 lacks cost fewer bytes as ranges of the packs
    than its solid frame, so no frame is read; the plan says what nginx then serves."""
    root = _publish(tmp_path, releases[:3])
    v1 = Repo(root).load().versions[0]
    assert v1.solid is not None
    srv = Nginx(root, tmp_path / "nginx")
    try:
        dest = tmp_path / "dest"
        _install(srv, dest, tmp_path, capsys, "--to", "v3")
        report, paths, artifacts, _err = _install(srv, dest, tmp_path, capsys, "--to", "v1")
    finally:
        srv.stop()
    assert report["held"] == ["v3"]
    assert not any(p.startswith("solids/") for p in paths)
    assert any(p.startswith("packs/") for p in paths)
    plan = report["plan"]
    assert isinstance(plan, dict)
    assert plan["bytes"] < v1.full_length + v1.solid.length
    # (the full index was fetched to plan: metadata; nginx's multipart framing on top)
    assert plan["bytes"] - v1.full_length <= artifacts <= plan["bytes"] * 1.02 + 1024
    assert tree_sum(dest / "v1") == tree_sum(releases[0])


def _two_frames(root: Path, base: Path, parts: int = 2) -> tuple[Solid, bytes, list[int]]:
    """v1's solid full made again as two frames (cut at a chunk boundary near the middle;
    or about ``parts`` frames) and signed; its stream and chunk sizes."""
    stream, sizes = _stream_and_sizes(root, 1)
    cuts = cut_frames(sizes, len(stream) // parts)
    assert len(cuts) == parts if parts == 2 else len(cuts) >= parts - 1
    frames, pos = [], 0
    for first, count in cuts:
        n = sum(sizes[first : first + count])
        frames.append(zstandard.ZstdCompressor(level=19).compress(stream[pos : pos + n]))
        pos += n
    solid = _forge(root, 1, frames, [c for _f, c in cuts])
    _sign(base)
    return solid, stream, sizes


def test_a_first_install_cut_short_resumes_at_the_frame_it_had_not_stored(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run cut after its first frame left that frame's chunks in DEST's chunk store: the
    next run downloads the second frame only (or its chunks, were they cheaper), and its
    plan's "to download" says so."""
    from btrdelta.chunk.chunker import chunk_digest
    from btrdelta.chunk.store import ChunkStore

    root = _publish(tmp_path, releases[:1], sign=False)
    solid, stream, sizes = _two_frames(root, tmp_path)
    store = ChunkStore(tmp_path / "dest" / ".btrdelta" / "chunks")  # what the cut run kept
    pos = 0
    for n in sizes[: solid.frames[0].count]:
        store.put(chunk_digest(stream[pos : pos + n]), stream[pos : pos + n])
        pos += n
    store.sync()
    report, paths, artifacts, _err = _install_from(root, tmp_path, capsys)
    fetched = [p for p in paths if p.startswith(("solids/", "packs/"))]
    assert fetched, paths
    full = Repo(root).load().versions[0].full_length
    assert report["to_download"] == artifacts - full <= solid.frames[1].length
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


def test_a_frame_is_cut_into_its_chunks_and_a_bad_one_named_in_one_line() -> None:
    """``frame_chunks`` on frames made here (the device's decoder, without a mirror): the
    chunks of a good frame, in pieces of the decoder's input; a frame cut short, one with
    bytes after it, one whose header says another size, and bytes that are no frame are
    refused naming the file and the frame (the chunks before the damage delivered)."""
    from btrdelta.errors import StreamFormatError
    from btrdelta.update.fullfetch import frame_chunks

    rng = random.Random(32)
    sizes = [70_000, 300_000, 5, 200_000]
    chunks = [rng.randbytes(n // 2) * 2 + rng.randbytes(n % 2) for n in sizes]
    blob = zstandard.ZstdCompressor(level=19).compress(b"".join(chunks))
    frame = Frame(1000, len(blob), 7, len(sizes))
    assert list(frame_chunks(blob, frame, 2, sizes, source="solids/s.zst")) == chunks

    def refused(data: bytes, sizes: list[int] = sizes) -> str:
        with pytest.raises(StreamFormatError) as info:
            list(frame_chunks(data, frame, 2, sizes, source="solids/s.zst"))
        text = str(info.value)
        assert "\n" not in text
        assert "solids/s.zst" in text
        assert f"frame 2 ([1000, {1000 + len(blob)}))" in text
        return text

    assert "is cut short" in refused(blob[: len(blob) - 10])
    assert "with bytes after it" in refused(blob + b"\0" * 3)
    assert "with bytes after it" in refused(blob + blob)
    assert "says 570005 bytes, its chunks are 570004" in refused(blob, [*sizes[:-1], 199_999])
    assert "not a zstd frame" in refused(b"\0" * 64)


@pytest.mark.parametrize("damage", ["none", "frame", "cut"])
def test_a_server_without_range_streams_the_solid_file_once(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """``python3 -m http.server`` answers a Range request with the whole file: the frames
    after the one asked are taken as the file streams past, so a first install reads the
    solid file once, not once per frame from its start (4 frames read it 2.5 times over,
    and a 126 MB release of 4 frames received 328 MB). Oracles: the server's own log of
    GET requests of the solid file, the bytes received against the plan, tree-sum. A
    damaged frame met on the way is asked again in its own turn, then its chunks come
    from the packs (one warning naming it), the others' do not. A server that drops the
    connection within frame 1 (``--retries 0``): frame 0, stored, is not said to fail (it
    was, and asked of the next mirror), each frame after it is."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = _publish(tmp_path, releases[:1], sign=False)
    solid = _two_frames(root, tmp_path, parts=4)[0]
    assert len(solid.frames) >= 3
    middle = solid.frames[1].offset + solid.frames[1].length // 2
    if damage == "frame":
        _corrupt_middle(root / solid.path, middle)
    gets: list[str] = []

    class Logged(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            if self.command == "GET":
                gets.append(self.path)

        def copyfile(self, source: Any, outputfile: Any) -> None:
            if damage == "cut" and self.path == "/" + solid.path:
                outputfile.write(source.read(middle))  # (then the connection closes)
                self.close_connection = True
                return
            super().copyfile(source, outputfile)

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Logged, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        capsys.readouterr()
        dest = tmp_path / "dest"
        assert main(["update", f"http://127.0.0.1:{server.server_address[1]}", str(dest),
                     "--json", "--key", str(tmp_path / "root.pub"), "--retries", "0"]) == 0
        out, err = capsys.readouterr()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    report = json.loads(out)
    assert tree_sum(dest / "v1") == tree_sum(releases[0])
    warned = [line for line in err.splitlines() if "packs instead" in line]
    if damage == "cut":
        assert len(warned) == len(solid.frames) - 1, err
        # (each frame: a ranged request answered whole and cut off, then the stream)
        assert gets.count("/" + solid.path) == 2 * len(solid.frames), gets
        return
    if damage == "frame":
        assert len(warned) == 1, err
        assert re.search(r"frame 1\b", warned[0]), err
        assert not re.search(r"frame [02]\b", err), err
        # the pass of frame 0, then frame 1's own; the packs for its chunks
        assert gets.count("/" + solid.path) == 4, gets
        assert any(p.startswith("/packs/") for p in gets), gets
        return
    assert err.count("ignores Range requests") == 1, err
    # the ranged request answered whole (cut off), then one read of the whole file
    assert gets.count("/" + solid.path) == 2, gets
    assert not any(p.startswith("/packs/") for p in gets), gets
    plan = report["plan"]["bytes"]
    assert plan == Repo(root).load().versions[0].full_length + solid.length
    # (what the cut-off first answer brought: at most the whole file once more)
    assert report["received"] - report["metadata_bytes"] <= plan + solid.length, report


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_while_the_solid_full_is_compressed_stops_at_once(
    tmp_path: Path, signame: str, children: Children
) -> None:
    """Ctrl-C (or SIGTERM) of ``repo add`` while its solid full's frames are compressed:
    exit 130 (143) at once, one line, no solid full published. It waited for every frame
    submitted to its thread pool (~10 s of CPU each at level 19 for 32 MiB of random
    bytes; a Debian release: 103 s at load 11)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(9):  # random: the slowest frames (34 MiB of stream: two frames)
        (tree / f"f{i}").write_bytes(os.urandom(4 << 20))
    root = tmp_path / "repo"
    assert main(["repo", "init", "-q", str(root)]) == 0
    proc = children.start(
        [sys.executable, "-m", "btrdelta", "repo", "add", "--progress", str(root), "v1",
         str(tree)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    lines = []
    while not (line := proc.stderr.readline()).endswith(")\n") or "solid full" not in line:
        assert line, lines
        lines.append(line)
    time.sleep(1)  # (its first frame is being compressed)
    proc.send_signal(getattr(signal, signame))
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert err == "btrdelta repo add: interrupted\n"
    assert took < 4, took
    assert not (root / "solids").exists()
    assert not list((root / ".btrdelta" / "tmp").iterdir())
