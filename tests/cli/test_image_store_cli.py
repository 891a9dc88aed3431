"""The chunk store under races and crashes, through the CLI: gc during a clone, kill -9 in
the middle of a clone, and chunk files left empty, short or with a flipped bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.chunk.store import ChunkStore
from btrdelta.transport.server import StaticRequestHandler, StaticServer
from tests.chunk.images import ImagePair
from tests.conftest import Children


class _SlowHandler(StaticRequestHandler):
    """Each chunk request waits (a slow link): a clone stays busy fetching for a while."""

    def _serve(self, *, body: bool) -> None:
        if "," in (self.headers.get("Range") or ""):
            time.sleep(2.5)
        super()._serve(body=body)


@pytest.fixture
def slow_server(image_pair: ImagePair, tmp_path: Path) -> Iterator[str]:
    www = tmp_path / "www"
    www.mkdir()
    os.link(image_pair.arc2, www / "v2.bdar")
    server = StaticServer(www, handler=_SlowHandler)
    with server.running():
        yield f"{server.url}/v2.bdar"


def _btrdelta(*args: str) -> list[str]:
    return [sys.executable, "-m", "btrdelta", *args]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_btrdelta(*args), capture_output=True, text=True, timeout=120,
                          check=False)


def _chunk_files(store: Path) -> set[Path]:
    return {p for p in (store / "chunks").rglob("*") if p.is_file()}


def _clone_in_background(children: Children, url: str, store: Path,
                         seed: Path) -> subprocess.Popen[str]:
    """A clone of v2 that stored v1's chunks (from the seed) and is now fetching the rest."""
    proc = children.start(_btrdelta("image", "clone", "--json", url, f"{store}/v2",
                                    "--seed", str(seed)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(_chunk_files(store)) < 100:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the clone stored nothing"
        time.sleep(0.05)
    assert not (store / "v2").exists()  # no description yet: these chunks are unnamed
    return proc


def test_gc_during_a_clone_is_refused_or_waits(
    slow_server: str, image_pair: ImagePair, tmp_path: Path, children: Children
) -> None:
    store = tmp_path / "store"
    clone = _clone_in_background(children, slow_server, store, image_pair.img1)
    before = _chunk_files(store)
    gc = _run("image", "gc", str(store))
    assert gc.returncode == 1
    assert "busy" in gc.stderr
    assert gc.stderr.count("\n") == 1
    assert _chunk_files(store) >= before  # nothing the clone wrote was removed
    waiting = children.start(_btrdelta("image", "gc", "--wait", "100", "--json", str(store)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = clone.communicate(timeout=120)
    assert clone.returncode == 0, err
    gc_out, gc_err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, gc_err
    report = json.loads(gc_out)
    assert report["removed"] == 0  # it ran after the description was written
    assert report["kept"] == json.loads(out)["chunks"]
    assert _run("image", "verify", f"{store}/v2").returncode == 0


def test_kill_9_in_the_middle_of_a_clone_then_clone_again(
    slow_server: str, image_pair: ImagePair, tmp_path: Path, children: Children
) -> None:
    store = tmp_path / "store"
    clone = _clone_in_background(children, slow_server, store, image_pair.img1)
    os.kill(clone.pid, signal.SIGKILL)
    clone.communicate(timeout=30)
    assert clone.returncode == -signal.SIGKILL
    assert not (store / "v2").exists()
    kept = len(_chunk_files(store))
    # every chunk file the killed clone left is whole (written aside, fsynced, then named)
    report = ChunkStore(store).check({bytes.fromhex(p.name): p.stat().st_size
                                      for p in _chunk_files(store)})
    assert not report.damaged
    assert len(report.ok) == kept
    again = _run("image", "clone", "--json", slow_server, f"{store}/v2",
                 "--output", str(tmp_path / "v2.img"))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["from_store"] == kept  # resumed, not refetched
    assert (tmp_path / "v2.img").read_bytes() == image_pair.img2.read_bytes()
    assert _run("image", "verify", f"{store}/v2").returncode == 0
    gc = _run("image", "gc", "--json", str(store))
    assert json.loads(gc.stdout)["removed"] == 0
    leftovers = {p.name for p in store.iterdir()} - {"chunks", "v2", ".lock", ".sources"}
    assert not leftovers


def _damage(store: Path, name: str) -> dict[str, str]:
    """Empty, truncate and bit-flip three chunk files of image ``name``: hex id -> kind."""
    _, index = ChunkStore(store).read_description(name)
    kinds = {}
    for digest, kind in zip(index.digests[:3], ("empty", "short", "content"), strict=True):
        path = Path(ChunkStore(store).chunk_path(digest))
        data = bytearray(path.read_bytes())
        path.chmod(0o644)
        if kind == "empty":
            data = bytearray()
        elif kind == "short":
            del data[len(data) // 2 :]
        else:
            data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
        kinds[digest.hex()] = kind
    return kinds


def test_damaged_chunk_files_are_found_dropped_and_fetched_again(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    assert _run("image", "clone", str(image_pair.arc1), f"{store}/v1").returncode == 0
    kinds = _damage(store, "v1")
    verify = _run("image", "verify", "--json", f"{store}/v1")
    assert verify.returncode == 5
    assert json.loads(verify.stdout)["damaged"] == kinds
    assert "3 damaged" in verify.stderr
    assert "--repair" in verify.stderr
    # verify --repair drops them and fetches them from where v1 was cloned from
    repair = _run("image", "verify", "--repair", f"{store}/v1")
    assert repair.returncode == 0, repair.stderr
    assert "3 chunk(s) repaired from" in repair.stdout
    # a new clone finds them too
    _damage(store, "v1")
    again = _run("image", "clone", "--json", str(image_pair.arc1), f"{store}/v1")
    assert json.loads(again.stdout)["damaged"] == 3
    assert json.loads(again.stdout)["fetched"] == 3
    # and gc removes them
    _damage(store, "v1")
    gc = _run("image", "gc", "--json", str(store))
    assert json.loads(gc.stdout)["damaged"] == 3
    missing = _run("image", "verify", f"{store}/v1")
    assert missing.returncode == 6
    assert "3 chunk(s) missing" in missing.stderr
    assert _run("image", "verify", "--repair", f"{store}/v1").returncode == 0
    out = tmp_path / "v1.img"
    assert _run("image", "clone", str(image_pair.arc1), f"{store}/v1", "--output",
                str(out)).returncode == 0
    assert out.read_bytes() == image_pair.img1.read_bytes()


def test_repair_says_what_it_needs_and_from_where(image_pair: ImagePair, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert _run("image", "clone", str(image_pair.arc1), f"{store}/v1").returncode == 0
    (store / ".sources" / "v1").unlink()  # e.g. cloned by an older version
    kinds = _damage(store, "v1")
    repair = _run("image", "verify", "--repair", "--json", f"{store}/v1")
    assert repair.returncode == 6
    assert "give --source ARCHIVE" in repair.stderr
    report = json.loads(repair.stdout)
    assert report["source"] is None
    assert sorted(report["missing"]) == sorted(kinds)
    # the running system (a seed) and the archive, named by hand
    fixed = _run("image", "verify", "--repair", "--json", "--source", str(image_pair.arc1),
                 "--seed", str(image_pair.img1), f"{store}/v1")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["repaired"] == 3


def test_clone_into_a_place_that_does_not_exist_is_one_line(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    """A mistyped STORE (its directory missing), a STORE that is a file, an --output in a
    missing directory: one line, exit 1, before anything is fetched, nothing made."""
    arc = str(image_pair.arc2)
    (tmp_path / "a-file").write_text("not a store\n")
    cases = [
        ([arc, f"{tmp_path}/mnt/usb/images/v2"], "does not exist"),
        ([arc, f"{tmp_path}/a-file/v2"], "chunk store is not a directory"),
        ([arc, f"{tmp_path}/a-file/images/v2"], "is not a directory"),
        ([arc, "--output", f"{tmp_path}/mnt/usb/v2.img"], "does not exist"),
        ([arc, f"{tmp_path}/store/v2", "--output", f"{tmp_path}/mnt/v2.img"], "does not exist"),
    ]
    for args, what in cases:
        r = _run("image", "clone", *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("btrdelta image clone: ")
        assert what in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # a new store inside an existing directory is still made by the first clone
    r = _run("image", "clone", arc, f"{tmp_path}/store/v2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "store" / "v2").is_file()


def test_verify_and_gc_show_their_progress(image_pair: ImagePair, tmp_path: Path) -> None:
    """`image verify` and `image gc` read every chunk of a store (minutes for a large one):
    with --progress (or on a terminal) they say how far they are, as `clone` does."""
    store = tmp_path / "store"
    assert _run("image", "clone", "-q", str(image_pair.arc1), f"{store}/v1").returncode == 0
    chunks = len(_chunk_files(store))
    verify = _run("image", "verify", "--progress", f"{store}/v1")
    assert verify.returncode == 0, verify.stderr
    assert f"verify check: {chunks} chunks of {chunks}, 100%" in verify.stderr
    gc = _run("image", "gc", "--progress", str(store))
    assert gc.returncode == 0, gc.stderr
    assert f"gc check: {chunks} chunks of {chunks}, 100%" in gc.stderr
    for quiet in (_run("image", "verify", f"{store}/v1"), _run("image", "gc", str(store))):
        assert quiet.stderr == ""  # not a terminal, no --progress: nothing


def test_every_phase_of_a_clone_to_an_output_ends_at_100_percent(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    """The output and verify phases' last lines said 96-99 % (their last report was the
    start of their last block or 64th chunk), as if the clone stopped short."""
    out = tmp_path / "v2.img"
    clone = _run("image", "clone", "--progress", str(image_pair.arc2), "--output", str(out),
                 "--seed", str(image_pair.img1))
    assert clone.returncode == 0, clone.stderr
    last: dict[str, str] = {}
    for line in clone.stderr.splitlines():
        if line.startswith("clone "):
            last[line.split(":")[0]] = line
    assert {"clone output", "clone fetch", "clone verify"} <= set(last), clone.stderr
    for phase, line in last.items():
        assert ", 100%, " in line, (phase, line)
    assert out.read_bytes() == image_pair.img2.read_bytes()
