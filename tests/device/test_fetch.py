"""``device install`` from a versions repository URL and from a chunk archive (.bdar), served
by nginx; oracles: tree-sum of the release trees, bytes from nginx's access log, btrfs-progs'
subvolume list."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta import device
from btrdelta.tree import tree_sum
from tests.jsondoc import checked
from tests.update.conftest import Nginx

from .conftest import BTRDELTA, Release, btrdelta, copy_tree
from .crash import crash_at
from .test_install import subvolumes

pytestmark = pytest.mark.btrfs

CLEAN = ["roots/a", "roots/b", "roots/factory"]


@pytest.fixture(scope="module")
def served(small_release: Release, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Nginx, Path]]:
    """nginx over a directory with a signed repository (versions ``old``, ``new``) in
    ``repo/``, the plain stream of NEW as a chunk archive ``new.bdar``, and the keys."""
    r = small_release
    www = tmp_path_factory.mktemp("www")
    btrdelta("key", "generate", "-o", www / "root")
    btrdelta("key", "generate", "-o", www / "other")
    btrdelta("repo", "init", www / "repo")
    btrdelta("repo", "add", www / "repo", "old", r.old)
    btrdelta("repo", "add", www / "repo", "new", r.new)
    btrdelta("repo", "sign", www / "repo", "--key", www / "root.key")
    btrdelta("send", r.new, "-o", www / "new.stream")
    btrdelta("image", "compress", "-i", www / "new.stream", "-o", www / "new.bdar",
             "--avg-chunk", "16K")
    srv = Nginx(www, tmp_path_factory.mktemp("nginx"))
    yield srv, www
    srv.stop()


def _versions(repo: Path) -> dict[str, int]:
    """Bytes of each version's full, from ``repo ls --json``."""
    doc = checked("repo ls", json.loads(btrdelta("repo", "ls", repo, "--json").stdout))
    return {v["name"]: v for v in doc["versions"]}  # type: ignore[no-any-return]


def test_install_from_a_repository_takes_the_delta(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    r = small_release
    srv, www = served
    device.init(btrfs_dev, r.old, state=[])  # release "old", as the repository names it
    # the wrong root key: refused, nothing selected, nothing left behind
    proc = btrdelta("device", "install", btrfs_dev, f"{srv.url}/repo", "--key",
                    www / "other.pub", check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert device.status(btrfs_dev)["next_boot"] == "a"
    assert subvolumes(btrfs_dev) == CLEAN
    before = srv.served()
    out = btrdelta("device", "install", btrfs_dev, f"{srv.url}/repo", "--key",
                   www / "root.pub", "--json").stdout
    res = checked("device install", json.loads(out))
    assert (res["slot"], res["release"], res["tree_sum"]) == ("b", "new", r.new_sum)
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    assert tree_sum(btrfs_dev / "roots/a") == r.old_sum
    st = device.status(btrfs_dev)
    assert st["next_boot"] == "b"
    assert st["trial"]["slot"] == "b"
    # the planner held "old" (the running root): it fetched the delta, not the full
    info = _versions(www / "repo")["new"]
    fetched = srv.served() - before
    delta = min(d["bytes"] for d in info["deltas"])
    assert fetched < info["full_bytes"] / 2, (fetched, info)
    assert fetched < delta + 64 * 1024, (fetched, delta)
    # what it says it did: one hop, the bytes it downloaded (it said "1 records" and
    # called those bytes file data written)
    assert (res["hops"], res["records"], res["data_bytes"]) == (1, 0, 0)
    assert delta <= res["downloaded"] <= fetched
    # nothing left in the fetch area but the trusted index state
    assert subvolumes(btrfs_dev) == CLEAN
    assert sorted(p.name for p in (btrfs_dev / ".btrdelta/fetch").iterdir()) == [".btrdelta"]


def test_a_repository_install_reads_the_new_root_once(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The update checks the version it received against the signed index (reading the
    files its delta wrote); the staged root, a snapshot of it, is not hashed whole again
    (slot30: every file of it was read a second time) when every entry is as the update
    read it. Oracles: the tree-sum of the installed root (a walk of its own), and the
    digests kept for it, which the next install finds valid."""
    from btrdelta.tree import treesum
    from btrdelta.update import heldsums

    r = small_release
    srv, www = served
    device.init(btrfs_dev, r.old, state=[])
    read: list[str] = []
    real = treesum._file_digest

    def spy(path: bytes, *args: object) -> tuple[str, object]:
        read.append(os.fsdecode(path))
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(treesum, "_file_digest", spy)
    res = device.install(btrfs_dev, f"{srv.url}/repo", keys=[str(www / "root.pub")])
    monkeypatch.undo()
    assert (res.slot, res.release, res.tree_sum, res.hops) == ("b", "new", r.new_sum, 1)
    staged = str(btrfs_dev / "roots/.staged-b")
    assert [p for p in read if p.startswith(staged + "/")] == []
    assert 0 < len(read) < sum(len(f) for _, _, f in os.walk(r.new)), read  # (the delta's)
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    kept = heldsums.load(btrfs_dev / ".btrdelta", btrfs_dev / "roots/b", r.new_sum)
    assert kept is not None
    assert kept.identity == r.new_sum


def test_a_factory_base_from_a_stream_is_held_by_its_content_not_its_name(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path], tmp_path: Path,
) -> None:
    """The README's flow: `device init --factory rootfs-1.stream`, then installs from a
    repository whose versions have other names ("old", "new"). The running root is the
    repository's "old" by content (its tree-sum is that version's identity): the delta is
    fetched, not the full (main fetched the whole full: the planner held only versions by
    name)."""
    r = small_release
    srv, www = served
    factory = tmp_path / "factory-1"
    copy_tree(r.old, factory)
    btrdelta("send", factory, "-o", tmp_path / "factory-1.stream")
    btrdelta("device", "init", btrfs_dev, "--factory", tmp_path / "factory-1.stream")
    assert device.status(btrfs_dev)["roots"]["a"]["release"] == "factory-1"
    before = srv.served()
    res = checked("device install", json.loads(btrdelta(
        "device", "install", btrfs_dev, f"{srv.url}/repo", "--key", www / "root.pub",
        "--json").stdout))
    assert (res["slot"], res["release"], res["tree_sum"]) == ("b", "new", r.new_sum)
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    info = _versions(www / "repo")["new"]
    fetched = srv.served() - before
    delta = min(d["bytes"] for d in info["deltas"])
    assert fetched < delta + 64 * 1024, (fetched, delta, info["full_bytes"])
    assert res["hops"] == 1
    assert [s for s in subvolumes(btrfs_dev) if not s.startswith("state/")] == CLEAN


def test_install_from_a_repository_with_no_held_version_takes_the_full(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path], tmp_path: Path,
) -> None:
    srv, www = served
    other = tmp_path / "other"
    other.mkdir()
    (other / "file").write_text("not a release of the repository\n")
    device.init(btrfs_dev, other, state=[])
    res = device.install(btrfs_dev, f"{srv.url}/repo", keys=[str(www / "root.pub")],
                         to="old")
    assert (res.slot, res.release) == ("b", "old")
    assert tree_sum(btrfs_dev / "roots/b") == small_release.old_sum
    assert subvolumes(btrfs_dev) == CLEAN


def test_init_from_a_repository_then_install_with_the_pinned_key(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    r = small_release
    srv, www = served
    btrdelta("device", "init", btrfs_dev, "--factory", f"{srv.url}/repo", "--key",
             www / "root.pub", "--to", "old", "--state", "home:/home:bind")
    for root in ("factory", "a", "b"):
        assert tree_sum(btrfs_dev / "roots" / root) == r.old_sum
    assert device.status(btrfs_dev)["roots"]["a"]["release"] == "old"
    # the root key was pinned by init: the install needs no --key
    before = srv.served()
    res = device.install(btrfs_dev, f"{srv.url}/repo")
    assert (res.slot, res.release, res.tree_sum) == ("b", "new", r.new_sum)
    assert srv.served() - before < _versions(www / "repo")["new"]["full_bytes"] / 2
    assert subvolumes(btrfs_dev) == [*CLEAN, "state/home"]


def test_a_killed_repository_install_keeps_the_old_root_and_resumes(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path], tmp_path: Path,
) -> None:
    r = small_release
    srv, www = served
    device.init(btrfs_dev, r.old, state=[])
    slow = Nginx(www, tmp_path / "nginx", limit_rate="2k")  # the delta takes seconds
    try:
        proc = subprocess.Popen(
            [*BTRDELTA, "device", "install", str(btrfs_dev), f"{slow.url}/repo", "--key",
             str(www / "root.pub")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        downloads = btrfs_dev / ".btrdelta/fetch/.btrdelta/downloads"
        deadline = time.monotonic() + 60
        while not any(downloads.glob("*.part")):  # the delta is on its way
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cut = [n for _status, n, uri in slow.requests() if uri.startswith("/repo/deltas/")]
    finally:
        slow.stop()
    # cut mid-download: the old root runs on, nothing is selected
    assert tree_sum(btrfs_dev / "roots/a") == r.old_sum
    st = device.status(btrfs_dev)
    assert st["next_boot"] == "a"
    assert st["trial"] is None
    before = [n for _status, n, uri in srv.requests() if uri.startswith("/repo/deltas/")]
    res = device.install(btrfs_dev, f"{srv.url}/repo")
    assert (res.slot, res.tree_sum) == ("b", r.new_sum)
    rest = [n for _status, n, uri in srv.requests() if uri.startswith("/repo/deltas/")]
    length = min(d["bytes"] for d in _versions(www / "repo")["new"]["deltas"])
    # what the kill cost: at most the artifact it was downloading
    assert sum(cut) + sum(rest) - sum(before) <= 2 * length, (cut, rest, before, length)
    assert subvolumes(btrfs_dev) == CLEAN


@pytest.mark.parametrize("where", ["file", "url"])
def test_install_from_a_chunk_archive_reuses_the_running_root(
    where: str, btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
    tmp_path: Path,
) -> None:
    r = small_release
    srv, www = served
    device.init(btrfs_dev, r.old, state=[])
    before = srv.served()
    source = www / "new.bdar" if where == "file" else f"{srv.url}/new.bdar"
    res = checked("device install",
                  json.loads(btrdelta("device", "install", btrfs_dev, source, "--json").stdout))
    assert (res["slot"], res["tree_sum"]) == ("b", r.new_sum)
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    assert device.status(btrfs_dev)["next_boot"] == "b"
    assert subvolumes(btrfs_dev) == CLEAN
    assert sorted(p.name for p in (btrfs_dev / ".btrdelta/fetch").iterdir()) == []
    if where == "url":  # the chunks of the running root's stream were not downloaded
        fetched = srv.served() - before
        whole, seeded = (json.loads(btrdelta(
            "image", "clone", www / "new.bdar", tmp_path / "store/x", *seed, "--dry-run",
            "--json").stdout) for seed in ([], ["--seed", r.full]))
        assert fetched < whole["fetch_bytes"]
        # at most half of what the seed saves is fetched after all: a chunk or two of the
        # running root's stream can differ from the seed file's (16 KB more once under load
        # 8-9: 396,512 B against a seeded dry run of 380,305); the seed saves ~100 KB here
        need = seeded["fetch_bytes"] + seeded["index_bytes"]
        assert fetched <= need + (whole["fetch_bytes"] - seeded["fetch_bytes"]) / 2, (
            fetched, seeded, whole)


def test_an_archive_install_reports_its_download(btrfs_dev: Path, small_release: Release,
                                                 served: tuple[Nginx, Path]) -> None:
    """The chunks of a .bdar came in without a word (a root image: minutes), then only the
    receive showed progress; the download is reported as a repository's is: (0, bytes)."""
    r = small_release
    srv, www = served
    device.init(btrfs_dev, r.old, state=[])
    calls: list[tuple[int, int]] = []
    before = srv.served()
    device.install(btrfs_dev, f"{srv.url}/new.bdar",
                   on_progress=lambda records, n: calls.append((records, n)))
    received = next(i for i, (records, _) in enumerate(calls) if records)  # the receive's
    downloads = [n for _, n in calls[:received] if n]  # (the receive starts at (0, 0))
    assert downloads, calls
    assert downloads == sorted(downloads), repr(calls)
    assert srv.served() > before
    # the chunks' bytes as they arrive, up to the image's (uncompressed)
    assert 0 < downloads[-1] <= (www / "new.stream").stat().st_size


def test_an_archive_install_shows_its_fetch_then_its_receive(
        btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path]) -> None:
    """The CLI's progress: the fetch, then the receive, each counted from 0 under its own
    label (one display showed the chunks' bytes, then the receive's from 0 again: the
    figure went backwards on the same line)."""
    r = small_release
    srv, www = served
    device.init(btrfs_dev, r.old, state=[])
    proc = btrdelta("device", "install", btrfs_dev, f"{srv.url}/new.bdar", "--progress")
    lines = proc.stderr.splitlines()
    labels = [line.split(":")[0] for line in lines]
    assert labels == sorted(labels, key=["install fetch", "install receive"].index), lines
    assert (labels[0], labels[-1]) == ("install fetch", "install receive"), lines
    assert "records" in lines[-1]
    assert "records" not in lines[0]
    stream = (www / "new.stream").stat().st_size
    for line in (lines[0], lines[-1]):  # each counts its own bytes: within the stream's
        n, unit = line.split(": ")[1].split(",")[0].split()
        assert 0 < float(n) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[unit] <= stream, line


def test_an_archive_whose_image_is_not_a_stream_says_so(
        btrfs_dev: Path, small_release: Release, tmp_path: Path) -> None:
    """A .bdar of something that is not a send stream: the error's offset is the image's,
    not the archive file's (it said 'new.bdar: offset 0: bad magic')."""
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a stream\n" * 1000)
    bdar = tmp_path / "notes.bdar"
    btrdelta("image", "compress", "-i", text, "-o", bdar)
    device.init(btrfs_dev, small_release.old, state=[])
    proc = btrdelta("device", "install", btrfs_dev, bdar, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"{bdar} (the archive's image): offset 0: bad magic" in proc.stderr
    assert device.status(btrfs_dev)["next_boot"] == "a"
    assert subvolumes(btrfs_dev) == CLEAN


def test_a_damaged_archive_selects_nothing(btrfs_dev: Path, small_release: Release,
                                           served: tuple[Nginx, Path], tmp_path: Path) -> None:
    _, www = served
    bad = tmp_path / "bad.bdar"
    data = bytearray((www / "new.bdar").read_bytes())
    # a byte of every 4 KiB of the chunk data (docs/formats/chunk-archive.md: [160, index
    # offset)): one flipped in the middle hit a chunk the device held already on Debian 13's
    # packages, which no install reads
    for at in range(160, int.from_bytes(data[64:72], "little"), 4096):
        data[at] ^= 0x40
    bad.write_bytes(bytes(data))
    device.init(btrfs_dev, small_release.old, state=[])
    proc = btrdelta("device", "install", btrfs_dev, bad, check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1
    st = device.status(btrfs_dev)
    assert st["next_boot"] == "a"
    assert st["trial"] is None
    assert tree_sum(btrfs_dev / "roots/a") == small_release.old_sum
    assert subvolumes(btrfs_dev) == CLEAN


def test_a_base_that_does_not_verify_fails_alone_and_comes_whole_from_a_repository(
    btrfs_dev: Path, small_release: Release, tmp_path: Path,
) -> None:
    from btrdelta.fs import btrfs as sv

    # two releases that differ in dpkg's status, which the delta patches
    old, new, repo = tmp_path / "old", tmp_path / "new", tmp_path / "www/repo"
    copy_tree(small_release.old, old)
    copy_tree(small_release.old, new)
    status = (new / "var/lib/dpkg/status").read_text()
    mid = status.index("\n\n", len(status) // 2) + 2  # a stanza in the middle: a patch
    (new / "var/lib/dpkg/status").write_text(
        status[:mid] + "Package: btrdelta-test\nStatus: install ok installed\n\n" + status[mid:])
    new_sum = tree_sum(new)
    btrdelta("key", "generate", "-o", tmp_path / "root")
    btrdelta("repo", "init", repo, "--avg-chunk", "4K")
    btrdelta("repo", "add", repo, "old", old)
    btrdelta("repo", "add", repo, "new", new)
    btrdelta("repo", "sign", repo, "--key", tmp_path / "root.key")
    btrdelta("send", "--parent", old, new, "-o", tmp_path / "update.stream")
    btrdelta("delta", "make", "-f", tmp_path / "update.stream", "--old", old, "-o",
             tmp_path / "update.delta")
    device.init(btrfs_dev, old, state=[])
    # the file is damaged (one byte, same size) in every root the delta could start from
    for root in ("a", "factory"):
        status_file = btrfs_dev / "roots" / root / "var/lib/dpkg/status"
        fd = os.open(btrfs_dev / "roots" / root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sv.set_readonly(fd, False)
            data = bytearray(status_file.read_bytes())
            data[-200] ^= 0x20  # inside the range the patch rewrites
            status_file.write_bytes(bytes(data))
            sv.set_readonly(fd, True)
        finally:
            os.close(fd)
    damaged_sum = tree_sum(btrfs_dev / "roots/a")
    # the delta alone: no other source for the file, the install fails cleanly
    proc = btrdelta("device", "install", btrfs_dev, tmp_path / "update.delta", check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "var/lib/dpkg/status" in proc.stderr
    st = device.status(btrfs_dev)
    assert st["next_boot"] == "a"
    assert st["trial"] is None
    assert tree_sum(btrfs_dev / "roots/a") == damaged_sum
    assert subvolumes(btrfs_dev) == CLEAN
    # the repository: the running root is not "old" any more (its tree-sum differs), the
    # full comes with the running root's chunks as seeds, so only the file's chunks travel
    srv = Nginx(tmp_path / "www", tmp_path / "nginx")
    try:
        res = device.install(btrfs_dev, f"{srv.url}/repo", keys=[str(tmp_path / "root.pub")])
        fetched = srv.served()
    finally:
        srv.stop()
    assert (res.slot, res.release, res.tree_sum) == ("b", "new", new_sum)
    assert tree_sum(btrfs_dev / "roots/b") == new_sum
    full = _versions(repo)["new"]["full_bytes"]
    print(f"damaged base: {fetched} bytes served, the full is {full}")
    assert fetched < full / 4, (fetched, full)


def test_init_from_a_file_url_and_a_failed_init_leaves_nothing(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    """A repository in a directory (a USB stick) is a `file://` URL, as `update` takes
    it: it was refused ("--to and --mirror are for a repository URL"). And an init that
    fails (a private key given, a tree with --to) leaves no roots/ or state/ behind: each
    left them, and every re-run was refused as "an unfinished init" until --force."""
    _srv, www = served
    url = f"file://{www / 'repo'}"
    for key, code in ((www / "root.key", 2), (www / "other.pub", 5)):
        proc = btrdelta("device", "init", btrfs_dev, "--factory", url, "--key", key,
                        "--to", "old", check=False)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert not (btrfs_dev / "roots").exists()
        assert not (btrfs_dev / "state").exists()
    proc = btrdelta("device", "init", btrfs_dev, "--factory", small_release.old, "--to", "old",
                    check=False)
    assert proc.returncode == 1, proc.stderr
    assert "file:// for a directory" in proc.stderr
    assert subvolumes(btrfs_dev) == []
    btrdelta("device", "init", btrfs_dev, "--factory", url, "--key", www / "root.pub",
             "--to", "old")
    for root in ("factory", "a", "b"):
        assert tree_sum(btrfs_dev / "roots" / root) == small_release.old_sum


_ARTIFACTS = ("/repo/deltas/", "/repo/fulls/", "/repo/packs/", "/repo/solids/")


def _artifact_bytes(srv: Nginx) -> int:
    """Bytes nginx served of deltas, fulls, packs and solid fulls (not the signed
    metadata), once nginx is idle (:meth:`Nginx.requests`: its log line comes after the
    response)."""
    return sum(n for _status, n, uri in srv.requests() if uri.startswith(_ARTIFACTS))


def _uuid(subvolume: Path) -> str:
    """The subvolume's own UUID, as btrfs-progs shows it."""
    out = subprocess.run(["btrfs", "subvolume", "show", str(subvolume)], capture_output=True,
                         text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines()
                if line.strip().startswith("UUID:"))


def test_installing_a_version_the_slot_holds_downloads_nothing(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    """`device install --to V` run again: slot b holds V on trial. No artifact is fetched,
    b is not rebuilt (the same subvolume), and it is the next boot again with the tries
    asked for.
    A slot whose content was changed behind the state file's back is rebuilt."""
    r = small_release
    srv, www = served
    url = f"{srv.url}/repo"
    device.init(btrfs_dev, r.old, state=[])
    btrdelta("device", "install", btrfs_dev, url, "--key", www / "root.pub", "--to", "new")
    first = _uuid(btrfs_dev / "roots/b")
    assert device.status(btrfs_dev)["trial"]["tries_left"] == 3
    before = _artifact_bytes(srv)
    proc = btrdelta("device", "install", btrfs_dev, url, "--to", "new", "--tries", "2")
    assert "slot b already holds new" in proc.stdout, proc.stdout
    assert _artifact_bytes(srv) == before
    assert _uuid(btrfs_dev / "roots/b") == first  # not rebuilt
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    st = device.status(btrfs_dev)
    assert (st["next_boot"], st["trial"]["slot"], st["trial"]["tries_left"]) == ("b", "b", 2)
    assert st["roots"]["b"]["release"] == "new"
    assert subvolumes(btrfs_dev) == CLEAN
    assert sorted(p.name for p in (btrfs_dev / ".btrdelta/fetch").iterdir()) == [".btrdelta"]
    # --json says it kept the slot
    res = checked("device install", json.loads(btrdelta(
        "device", "install", btrfs_dev, url, "--to", "new", "--json").stdout))
    assert (res["slot"], res["release"], res["kept"], res["hops"]) == ("b", "new", True, 0)
    assert _artifact_bytes(srv) == before
    # a slot changed behind the state file's back (made writable, a file appended to,
    # read-only again): its content is not the version, it is rebuilt
    b = btrfs_dev / "roots/b"
    subprocess.run(["btrfs", "property", "set", "-f", str(b), "ro", "false"], check=True)
    victim = next(p for p in sorted(b.rglob("*")) if p.is_file() and not p.is_symlink())
    with open(victim, "ab") as f:
        f.write(b"tampered\n")
    subprocess.run(["btrfs", "property", "set", str(b), "ro", "true"], check=True)
    assert tree_sum(b) != r.new_sum
    res = checked("device install", json.loads(btrdelta(
        "device", "install", btrfs_dev, url, "--to", "new", "--json").stdout))
    assert (res["slot"], res["kept"], res["hops"]) == ("b", False, 1)
    assert _artifact_bytes(srv) > before
    assert tree_sum(b) == r.new_sum
    assert _uuid(b) != first
    assert subvolumes(btrfs_dev) == CLEAN


def test_a_slot_marked_bad_that_holds_the_version_is_rebuilt(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    """Slot b holds "new" and was marked bad (its boot failed): `install --to new` again
    rebuilds it from the repository (it made a new trial of the same subvolume: its
    digests prove its content, not that its blocks still read). Oracles: the subvolume's
    UUID (btrfs subvolume show), the bytes nginx served, the tree-sum."""
    r = small_release
    srv, www = served
    url = f"{srv.url}/repo"
    device.init(btrfs_dev, r.old, state=[])
    btrdelta("device", "install", btrfs_dev, url, "--key", www / "root.pub", "--to", "new")
    first = _uuid(btrfs_dev / "roots/b")
    btrdelta("device", "mark-bad", btrfs_dev, "--slot", "b")
    assert device.status(btrfs_dev)["roots"]["b"]["verdict"] == "bad"
    before = _artifact_bytes(srv)
    res = checked("device install", json.loads(btrdelta(
        "device", "install", btrfs_dev, url, "--to", "new", "--json").stdout))
    assert (res["slot"], res["release"], res["kept"], res["hops"]) == ("b", "new", False, 1)
    assert _artifact_bytes(srv) > before
    assert _uuid(btrfs_dev / "roots/b") != first
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    st = device.status(btrfs_dev)
    assert (st["next_boot"], st["trial"]["slot"], st["roots"]["b"]["verdict"]) == \
        ("b", "b", "new")
    assert subvolumes(btrfs_dev) == CLEAN


def test_a_reinstall_after_a_kill_past_the_commit_point_downloads_nothing(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    r = small_release
    srv, www = served
    url = f"{srv.url}/repo"
    device.init(btrfs_dev, r.old, state=[])
    # killed as it tells the boot hook: the trial of b is committed
    crash_at("btrdelta.device.install.install", btrfs_dev, "btrdelta.device.install:call_hook",
             source=url, keys=[str(www / "root.pub")], to="new")
    assert device.status(btrfs_dev)["trial"]["slot"] == "b"
    before = _artifact_bytes(srv)
    proc = btrdelta("device", "install", btrfs_dev, url, "--to", "new")
    assert "slot b already holds new" in proc.stdout, proc.stdout
    assert _artifact_bytes(srv) == before
    assert tree_sum(btrfs_dev / "roots/b") == r.new_sum
    st = device.status(btrfs_dev)
    assert (st["next_boot"], st["trial"]["slot"]) == ("b", "b")
    assert subvolumes(btrfs_dev) == CLEAN


def test_a_downgrade_to_the_factory_version_snapshots_the_factory_root(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path], tmp_path: Path,
) -> None:
    """Factory "old", slot b "new" made the default, slot a some other tree: `install --to
    old` takes the factory root as it is (no full downloaded) and rebuilds a from it."""
    r = small_release
    srv, www = served
    url = f"{srv.url}/repo"
    device.init(btrfs_dev, r.old, state=[])
    btrdelta("device", "install", btrfs_dev, url, "--key", www / "root.pub", "--to", "new")
    btrdelta("device", "mark-good", btrfs_dev, "--slot", "b")
    other = tmp_path / "other"
    copy_tree(r.new, other)
    (other / "local-change").write_text("not a release of the repository\n")
    btrdelta("device", "install", btrfs_dev, other, "--booted", "b")
    assert tree_sum(btrfs_dev / "roots/a") == tree_sum(other)
    before = _artifact_bytes(srv)
    out = btrdelta("device", "install", btrfs_dev, url, "--to", "old", "--booted", "b",
                   "--json").stdout
    assert _artifact_bytes(srv) == before
    res = checked("device install", json.loads(out))
    assert (res["slot"], res["release"], res["kept"], res["hops"]) == ("a", "old", False, 0)
    assert tree_sum(btrfs_dev / "roots/a") == r.old_sum
    assert device.status(btrfs_dev)["next_boot"] == "a"
    assert subvolumes(btrfs_dev) == CLEAN


def test_a_first_install_that_finds_the_version_held_pins_the_key(
    btrfs_dev: Path, small_release: Release, served: tuple[Nginx, Path],
) -> None:
    """A device made from the tree of "new" (every root holds it): the first install from
    the repository, `--to new --key`, finds slot b holding it and fetches no artifact; the
    key it verified with is pinned, so the next install needs no --key."""
    r = small_release
    srv, www = served
    url = f"{srv.url}/repo"
    device.init(btrfs_dev, r.new, state=[])
    before = _artifact_bytes(srv)
    proc = btrdelta("device", "install", btrfs_dev, url, "--key", www / "root.pub", "--to",
                    "new")
    assert "slot b already holds new" in proc.stdout, proc.stdout
    assert _artifact_bytes(srv) == before
    res = device.install(btrfs_dev, url, to="old")
    assert (res.slot, res.release, res.kept) == ("b", "old", False)
    assert tree_sum(btrfs_dev / "roots/b") == r.old_sum
    assert subvolumes(btrfs_dev) == CLEAN
