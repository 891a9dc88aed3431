"""Power cuts in a virtual machine while it downloads (``make vmtest``; skipped by ``make test``).

The host serves files with ``btrdelta serve`` on its loopback; the guest reaches it over
qemu's user network (``http://10.0.2.2:PORT``) and writes to a btrfs disk mounted at
``/run/vda``; qemu is killed (SIGKILL) at a random moment of the command. The host then
mounts the disk and checks what the cut left, and runs the command again to its end:

* ``image clone`` of a chunked ext4 image of Debian bookworm (after ``apt-get upgrade``)
  over HTTP into a chunk store that holds the image before the upgrade, and onto an output
  file: every chunk file under its name hashes to its name, the old image still verifies,
  the new image (description, output) is absent or complete, and the re-run completes to
  a bit-perfect image;
* ``update`` of a repository of eight regex releases (3 MB trees) from the oldest to the
  newest, a multi-hop path, DEST on btrfs: the old version intact (tree-sum), every version
  under a final name (``DEST/V``, ``DEST/.btrdelta-hop-V``) complete, and the re-run lands
  the newest version, checked by its tree-sum;
* ``replicate --listen`` in the guest receiving an incremental of the same Debian parts
  from a sender on the host (``--rate-limit 4M``, through a forwarded port), its
  directory holding the old tree: the old tree intact, every visible subvolume a whole
  tree (old or new), and the sender's re-run straight to the disk completes the new tree;
* ``replicate`` in the guest sending a subvolume (the same Debian parts, updated in place
  from the old tree to the new) to ``replicate --listen`` on the host, its sendshot store
  on the guest's disk: the store still lists its records (``cursors.json`` whole), the
  receiver holds whole trees only, and the re-run of the sender from the cut disk lands
  the new tree.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.chunk.chunker import chunk_digest
from btrdelta.chunk.store import ChunkStore
from btrdelta.testing.vm import VmKit, VmResult
from btrdelta.testing.wheels import REGEX, release_trees
from btrdelta.tree import tree_sum
from tests.chunk.images import make_ext4

from .conftest import BTRDELTA, btrdelta
from .test_powercut import CACHE, ENABLED, FIGURES, RUNS, SEED, Span, _write_figures, mounted

pytestmark = [pytest.mark.btrfs, pytest.mark.timeout(5400),
              pytest.mark.skipif(not ENABLED, reason="power-cut VM test: make vmtest")]
AT = "/run/vda"  # where the guest mounts its disk
GUEST_HOST = "10.0.2.2"  # the host's loopback, seen from qemu's user network
#: what the images hold of each Debian tree (~70 MB: a clone takes ~27 s under TCG)
IMAGE_PARTS = ("etc", "usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "var/lib/dpkg")


@pytest.fixture(scope="module")
def kit() -> VmKit:
    print(f"vmtest seed {SEED}", flush=True)
    return VmKit.prepare(CACHE)


@dataclass(frozen=True)
class Served:
    root: Path
    port: int

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"


@pytest.fixture(scope="module")
def www() -> Iterator[Served]:
    """``btrdelta serve`` of ``CACHE/www`` on a free loopback port."""
    root = CACHE / "www"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    proc = subprocess.Popen([*BTRDELTA, "serve", "-q", "--port", "0", str(root)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
        m = re.search(r":(\d+)/", line)
        assert m, line
        yield Served(root, int(m[1]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def blank(name: str, size: int) -> Path:
    image = CACHE / f"{name}.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    return image


def fresh(base: Path, name: str) -> Path:
    image = CACHE / f"{name}.img"
    image.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", str(base), str(image)], check=True)
    return image


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cut_point(rng: random.Random, i: int, span: Span) -> float:
    """Cut ``i``: anywhere in the command (odd ``i``), or from ``span.mark`` (when the command
    began writing or receiving, seen in the uninterrupted run) to its end: Python's start
    over 9p under TCG takes half the command or more."""
    if i % 2 or span.mark is None:
        return rng.uniform(0.0, span.length)
    return rng.uniform(min(span.mark, span.length), span.length)


# -- image clone ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Images:
    old: Path  # ext4 image of the old Debian tree
    new: Path
    new_sha: str
    base: Path  # btrfs disk: STORE holding image "old"


@pytest.fixture(scope="module")
def images(www: Served, release_trees: tuple[Path, Path]) -> Images:
    old_tree, new_tree = release_trees
    work = CACHE / "images"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name, tree in (("old", old_tree), ("new", new_tree)):
        for part in IMAGE_PARTS:
            (work / name / part).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(tree / part), str(work / name / part)], check=True)
        make_ext4(work / name, work / f"{name}.img", "128M")
        btrdelta("image", "compress", "-q", "-i", work / f"{name}.img",
                 "-o", www.root / f"{name}.bdar")
    base = blank("clone-base", 2 << 30)
    with mounted(base) as mnt:
        btrdelta("image", "clone", "-q", www.root / "old.bdar", mnt / "store/old")
    return Images(work / "old.img", work / "new.img", sha256(work / "new.img"), base)


def _check_clone_cut(mnt: Path, img: Images) -> tuple[int, str]:
    """What a cut clone left: (chunk files under their names, state of the new image)."""
    store = ChunkStore(mnt / "store")
    named = 0
    for digest, path in store.iter_chunks():
        assert chunk_digest(Path(path).read_bytes()) == digest, f"damaged chunk {path}"
        named += 1
    assert btrdelta("image", "verify", "-q", mnt / "store/old", check=False).returncode == 0
    has_desc = (mnt / "store/new").exists()
    if has_desc:  # complete: every chunk present and whole
        ver = btrdelta("image", "verify", "-q", mnt / "store/new", check=False)
        assert ver.returncode == 0, ver.stderr
    has_out = (mnt / "new.img").exists()
    if has_out:
        assert sha256(mnt / "new.img") == img.new_sha
    return named, ("description" if has_desc else "-") + ", " + ("output" if has_out else "-")


def test_power_cut_during_image_clone(kit: VmKit, www: Served, images: Images) -> None:
    url = f"{www.url(GUEST_HOST)}/new.bdar"
    command = f"image clone --progress {url} {AT}/store/new --output {AT}/new.img"
    image = fresh(images.base, "clone")
    ran = kit.run(image, "run", command, net=True, mount=AT)
    assert ran.done_rc() == 0, "\n".join(ran.lines[-30:])
    # a progress bar reaches the console as one line when its phase ends: the store's check
    # ends where the fetch begins
    marks = [t for t in map(ran.when, ("clone check", "clone fetch", "clone output"))
             if t is not None]
    span = Span(ran, min(marks, default=None))
    with mounted(image) as mnt:
        full, state = _check_clone_cut(mnt, images)
        assert state == "description, output"
    rng = random.Random(SEED + 2)
    outcomes: Counter[str] = Counter()
    for i in range(RUNS):
        delay = cut_point(rng, i, span)
        image = fresh(images.base, "clone")
        cut = kit.run(image, "run", command, net=True, mount=AT, kill_after=delay)
        span.ran(cut)
        if not cut.killed:
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        with mounted(image) as mnt:
            named, state = _check_clone_cut(mnt, images)
            rerun = btrdelta("image", "clone", "--json", f"{www.url()}/new.bdar",
                             mnt / "store/new", "--output", mnt / "new.img", check=False)
            assert rerun.returncode == 0, (i, delay, rerun.stderr)
            again = json.loads(rerun.stdout)
            assert _check_clone_cut(mnt, images)[1] == "description, output"
        what = f"{'cut' if cut.killed else 'finished'}: {state}"
        outcomes[what] += 1
        print(f"clone run {i + 1}/{RUNS}: power cut {delay:.1f} s after start: {what}; "
              f"{named}/{full} chunk files, re-run fetched {again.get('fetched')} chunks",
              flush=True)
    FIGURES["image clone"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted clone in the VM: {span}, check, fetch and output ending at "
        f"{', '.join(f'{t:.1f}' for t in marks)} s ({kit.accel}); "
        f"seed {SEED + 2}"]
    _write_figures()


# -- update ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Repo:
    versions: list[str]
    sums: dict[str, str]
    base: Path  # btrfs disk: DEST holding the first version, the root key pinned


@pytest.fixture(scope="module")
def repo(www: Served) -> Repo:
    trees = release_trees(*REGEX, Path.home() / ".cache" / "btrdelta-bench")
    if trees is None:
        pytest.fail("make vmtest: pip download of the regex wheels failed")
    versions = list(REGEX[1])
    root = www.root / "app"
    keys = CACHE / "keys"
    shutil.rmtree(keys, ignore_errors=True)
    keys.mkdir(parents=True)
    trust.save_key_pair(trust.generate_key(), str(keys / "root.pem"), str(keys / "root.pub"))
    btrdelta("repo", "init", root)
    for ver, tree in zip(versions, trees, strict=True):
        btrdelta("repo", "add", root, ver, tree)
    btrdelta("repo", "sign", root, "--key", keys / "root.pem", "--timestamp-key",
             keys / "root.pem", "--expires", "7d")
    base = blank("update-base", 1 << 30)
    with mounted(base) as mnt:
        btrdelta("update", "-q", root, mnt / "dest", "--to", versions[0],
                 "--key", keys / "root.pub")
    return Repo(versions, {v: tree_sum(t) for v, t in zip(versions, trees, strict=True)}, base)


def _check_update_cut(dest: Path, repo: Repo) -> list[str]:
    """What a cut update left: the versions under final names, each checked whole."""
    assert tree_sum(dest / repo.versions[0]) == repo.sums[repo.versions[0]]
    landed = []
    for entry in sorted(dest.iterdir()):
        ver = entry.name.removeprefix(".btrdelta-hop-")
        if ver in repo.sums:
            assert tree_sum(entry) == repo.sums[ver], f"{entry.name}: not version {ver}"
            landed.append(entry.name)
    return landed


def test_power_cut_during_multi_hop_update(kit: VmKit, www: Served, repo: Repo) -> None:
    newest = repo.versions[-1]
    command = f"update --progress {www.url(GUEST_HOST)}/app {AT}/dest"
    image = fresh(repo.base, "update")
    ran = kit.run(image, "run", command, net=True, mount=AT)
    assert ran.done_rc() == 0, "\n".join(ran.lines[-30:])
    assert ran.started is not None
    plan = next((m[0] for m in map(re.compile(r"plan: from [^\r]*").search, ran.lines) if m),
                "")
    hops = [t - ran.started for line, t in zip(ran.lines, ran.times or [], strict=False)
            if "update: hop" in line]
    with mounted(image) as mnt:
        landed = _check_update_cut(mnt / "dest", repo)
        assert landed == [repo.versions[0], newest], landed  # intermediates removed
    span = Span(ran, min(hops, default=None))
    m = re.search(r"(\d+) hops", plan)
    assert m, "\n".join(ran.lines[-40:])
    assert int(m[1]) >= 2, plan
    rng = random.Random(SEED + 3)
    outcomes: Counter[str] = Counter()
    for i in range(RUNS):
        delay = cut_point(rng, i, span)
        image = fresh(repo.base, "update")
        cut = kit.run(image, "run", command, net=True, mount=AT, kill_after=delay)
        span.ran(cut)
        if not cut.killed:
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        with mounted(image) as mnt:
            landed = _check_update_cut(mnt / "dest", repo)
            rerun = btrdelta("update", "-q", f"{www.url()}/app", mnt / "dest", check=False)
            assert rerun.returncode == 0, (i, delay, rerun.stderr)
            assert newest in _check_update_cut(mnt / "dest", repo)
            left = sorted(p.name for p in (mnt / "dest").iterdir()
                          if p.name.startswith(".btrdelta-tmp"))
        what = f"{'cut' if cut.killed else 'finished'}: {len(landed) - 1} landed"
        outcomes[what] += 1
        print(f"update run {i + 1}/{RUNS}: power cut {delay:.1f} s after start: {what} "
              f"({', '.join(n for n in landed if n != repo.versions[0]) or 'none'}); "
              f"temporary left after the re-run: "
              f"{left or 'none'}", flush=True)
    FIGURES["update"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted update in the VM: {span} ({kit.accel}); {plan}; "
        f"seed {SEED + 3}"]
    _write_figures()


# -- replicate: the receiving side ----------------------------------------------------------
@dataclass(frozen=True)
class Replication:
    src: Path  # the sender's directory, now the new tree
    keys: Path
    store: Path  # the sender's sendshot store after the first replication
    sums: dict[str, str]  # "old", "new"
    base: Path  # btrfs disk: bk/ holding the old tree, received from the sender


def _replicate(rep: Replication, store: Path, dest: str, *extra: str) -> list[str]:
    return [*BTRDELTA, "replicate", str(rep.src), dest, "--store", str(store), "--json",
            *extra]


@pytest.fixture(scope="module")
def replication(images: Images) -> Replication:
    work = CACHE / "replicate"
    shutil.rmtree(work, ignore_errors=True)
    (work / "keys").mkdir(parents=True)
    for name in ("server", "client"):
        btrdelta("key", "generate", "-o", work / "keys" / name)
    src = work / "src"
    subprocess.run(["cp", "-a", str(images.old.with_suffix("")), str(src)], check=True)
    rep = Replication(src, work / "keys", work / "store0",
                      {"old": tree_sum(src), "new": tree_sum(images.new.with_suffix(""))},
                      blank("replicate-base", 1 << 30))
    with mounted(rep.base) as mnt:
        (mnt / "bk").mkdir()
        subprocess.run(_replicate(rep, rep.store, str(mnt / "bk")), check=True,
                       capture_output=True)
    shutil.rmtree(src)
    subprocess.run(["cp", "-a", str(images.new.with_suffix("")), str(src)], check=True)
    return rep


def _check_replica_cut(bk: Path, rep: Replication) -> list[str]:
    """What a cut left in the receiver's directory: the old tree intact, every visible
    subvolume a whole tree; returns which (``old``, ``new``)."""
    seen = []
    by_sum = {v: k for k, v in rep.sums.items()}
    for entry in sorted(p for p in bk.iterdir() if not p.name.startswith(".")):
        got = tree_sum(entry)
        assert got in by_sum, f"{entry.name}: neither the old nor the new tree"
        seen.append(by_sum[got])
    assert "old" in seen, seen
    return seen


def _replicate_into_vm(kit: VmKit, rep: Replication, image: Path, store: Path,
                       delay: float | None) -> tuple[VmResult, subprocess.Popen[str] | None,
                                                     str, str]:
    """Boot the receiver (``replicate --listen`` in the VM) and, once it listens, start the
    sender on the host through a forwarded port; returns both ends' outcome (no sender:
    the power went before the receiver listened)."""
    port = _free_port()
    command = (f"replicate --listen 0.0.0.0:7447 {AT}/bk --once --timeout 10 --key "
               f"{rep.keys}/server.key --allow {rep.keys}/client.pub")
    senders: list[subprocess.Popen[str]] = []

    def on_line(line: str) -> None:
        if "listening on" in line and not senders:
            senders.append(subprocess.Popen(
                _replicate(rep, store, f"tcp://127.0.0.1:{port}", "--key",
                           str(rep.keys / "client.key"), "--peer", str(rep.keys / "server.pub"),
                           "--rate-limit", "4M", "--timeout", "60"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    try:
        cut = kit.run(image, "run", command, net=True, mount=AT, forward=(port, 7447),
                      on_line=on_line, kill_after=delay)
    except BaseException:  # Ctrl-C: no sender left behind
        for sender in senders:
            sender.kill()
            sender.communicate()
        raise
    if not senders:
        assert cut.killed, "\n".join(cut.lines[-30:])
        return cut, None, "", ""
    out, err = senders[0].communicate(timeout=120)  # qemu's end of it closed with qemu
    return cut, senders[0], out, err


def test_power_cut_on_the_receiving_side_of_replicate(kit: VmKit, replication: Replication
                                                      ) -> None:
    rep = replication
    rng = random.Random(SEED + 4)
    outcomes: Counter[str] = Counter()
    span: Span | None = None
    store = CACHE / "replicate" / "store"
    for i in range(RUNS + 1):  # the first one uninterrupted: its length sets the range
        delay = None if span is None else cut_point(rng, i, span)
        image = fresh(rep.base, "replicate")
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(rep.store, store, symlinks=True)
        cut, sender, out, err = _replicate_into_vm(kit, rep, image, store, delay)
        if delay is None or not cut.killed:
            assert cut.done_rc() == 0, (i, delay, err, "\n".join(cut.lines[-40:]))
            assert sender is not None, (i, delay)
            assert sender.returncode == 0, (i, delay, err)
        if delay is None:
            assert cut.started is not None
            span = Span(cut, cut.when("listening on"))
            sent = json.loads(out)
        elif span is not None:
            span.ran(cut)
        with mounted(image) as mnt:
            seen = _check_replica_cut(mnt / "bk", rep)
            if delay is None:
                assert seen == ["old", "new"], seen
                continue
            rerun = subprocess.run(_replicate(rep, store, str(mnt / "bk")), capture_output=True,
                                   text=True, check=False)
            assert rerun.returncode == 0, (i, delay, rerun.stderr)
            again = json.loads(rerun.stdout)
            # the new tree once: a cut after the receiver named it is adopted (the sender
            # had not heard) or found (it had), and the re-run of the unchanged directory
            # is already-current (session 14 found it twice: every re-run of a plain
            # directory added its tree again)
            after = _check_replica_cut(mnt / "bk", rep)
            assert after == ["old", "new"], (after, again)
            left = sorted(p.name for p in (mnt / "bk").iterdir()
                          if p.name.startswith(".btrdelta-tmp"))
        what = f"{'cut' if cut.killed else 'finished'}: {'+'.join(seen)}, then {'+'.join(after)}"
        outcomes[what] += 1
        print(f"replicate run {i}/{RUNS}: power cut {delay:.1f} s after start: {what}; "
              f"sender exit {sender and sender.returncode}; re-run: {again.get('outcome')} "
              f"{again.get('kind')}, "
              f"{again.get('size')} bytes; temporary left after it: {left or 'none'}",
              flush=True)
    FIGURES["replicate"] = [f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted replication in the VM: {span}, listening from "
        f"{span and span.mark} s "
        f"({kit.accel}), "
        f"{sent.get('kind')} of {sent.get('size')} bytes at 4 MB/s; seed {SEED + 4}"]
    _write_figures()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- replicate: the sending side (its sendshot store) ---------------------------------------
@dataclass(frozen=True)
class Sending:
    keys: Path
    sums: dict[str, str]  # "old", "new"
    dest: Path  # the receiver's directory on the host, holding the old tree
    base: Path  # btrfs disk: subvolume data (now the new tree), its sendshot store ss


@pytest.fixture(scope="module")
def sending(images: Images, replication: Replication) -> Sending:
    work = CACHE / "sending"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    snd = Sending(replication.keys, replication.sums, work / "dest0",
                  blank("sending-base", 1 << 30))
    snd.dest.mkdir()
    old, new = images.old.with_suffix(""), images.new.with_suffix("")
    with mounted(snd.base) as mnt:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "data")], check=True,
                       capture_output=True)
        subprocess.run(["cp", "-a", f"{old}/.", str(mnt / "data")], check=True)
        subprocess.run([*BTRDELTA, "replicate", str(mnt / "data"), str(snd.dest), "--store",
                        str(mnt / "ss")], check=True, capture_output=True)
        subprocess.run(["rsync", "-aHAX", "--delete", f"{new}/", f"{mnt / 'data'}/"],
                       check=True)
        assert tree_sum(mnt / "data") == snd.sums["new"]
    return snd


def _check_sender_cut(mnt: Path, dest: Path, snd: Sending) -> list[str]:
    """What a cut sender left: its store readable, the receiver's trees whole."""
    listed = btrdelta("sendshot", "--store", mnt / "ss", "--json", "list", check=False)
    assert listed.returncode == 0, listed.stderr
    if (mnt / "ss/cursors.json").exists():
        json.loads((mnt / "ss/cursors.json").read_text())
    assert tree_sum(mnt / "data") == snd.sums["new"]
    by_sum = {v: k for k, v in snd.sums.items()}
    seen = [by_sum.get(tree_sum(p), p.name) for p in sorted(dest.iterdir())
            if not p.name.startswith(".")]
    assert "old" in seen, seen
    assert set(seen) <= {"old", "new"}, seen
    return seen


def _send_from_vm(kit: VmKit, snd: Sending, image: Path, dest: Path,
                  delay: float | None) -> VmResult:
    """The sender in the VM, the receiver (``replicate --listen --once``) on the host."""
    port = _free_port()
    listener = subprocess.Popen(
        [*BTRDELTA, "replicate", "--listen", f"127.0.0.1:{port}", str(dest), "--once",
         "--timeout", "120", "--key", str(snd.keys / "server.key"), "--allow",
         str(snd.keys / "client.pub")], stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stderr is not None
        assert "listening on" in listener.stderr.readline()
        command = (f"replicate {AT}/data tcp://{GUEST_HOST}:{port} --store {AT}/ss --key "
                   f"{snd.keys}/client.key --peer {snd.keys}/server.pub --rate-limit 4M "
                   "--timeout 120")
        cut = kit.run(image, "run", command, net=True, mount=AT, kill_after=delay)
        try:  # a conversation the power cut ends with qemu's end of the connection; the
            # sender may never have connected, or never finished (a TCG guest hashing the
            # tree for minutes under load): then the receiver is stopped (SIGTERM)
            listener.wait(timeout=5 if cut.killed else 120)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if listener.poll() is None:
            listener.terminate()
        listener.communicate(timeout=30)
    return cut


def test_power_cut_on_the_sending_side_of_replicate(kit: VmKit, sending: Sending) -> None:
    snd = sending
    rng = random.Random(SEED + 5)
    outcomes: Counter[str] = Counter()
    span: Span | None = None
    dest = CACHE / "sending" / "dest"
    for i in range(RUNS + 1):  # the first one uninterrupted: its length sets the range
        # (the sender prints no line as it starts sending, its progress bar is one console
        # line: half the cuts in the second half of the command, where it sends and records)
        delay = None if span is None else cut_point(rng, i, span)
        image = fresh(snd.base, "sending")
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["cp", "-a", str(snd.dest), str(dest)], check=True)
        cut = _send_from_vm(kit, snd, image, dest, delay)
        if span is not None:
            span.ran(cut)
        if delay is None or not cut.killed:
            assert cut.done_rc() == 0, (i, delay, "\n".join(cut.lines[-40:]))
        with mounted(image) as mnt:
            seen = _check_sender_cut(mnt, dest, snd)
            if delay is None:
                assert cut.started is not None
                span = Span(cut, (cut.seconds - cut.started) / 2)
                assert seen == ["old", "new"], seen
                continue
            rerun = btrdelta("replicate", mnt / "data", dest, "--store", mnt / "ss", "--json",
                             check=False)
            assert rerun.returncode == 0, (i, delay, rerun.stderr)
            again = json.loads(rerun.stdout)
            assert _check_sender_cut(mnt, dest, snd)[-1] == "new"
            records = len(json.loads(btrdelta("sendshot", "--store", mnt / "ss", "--json",
                                              "list").stdout))
        what = f"{'cut' if cut.killed else 'finished'}: receiver {'+'.join(seen)}"
        outcomes[what] += 1
        print(f"sending run {i}/{RUNS}: power cut {delay:.1f} s after start: {what}; "
              f"re-run: {again.get('kind')}, {again.get('size')} bytes; {records} records",
              flush=True)
    FIGURES["replicate, sending side"] = [
        f"{n} x {what}" for what, n in sorted(outcomes.items())] + [
        f"uninterrupted replication from the VM: {span} ({kit.accel}); seed {SEED + 5}"]
    _write_figures()
