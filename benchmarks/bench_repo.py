"""Versions repository: eight real regex releases (a 2.5 MB native library each) published
with ``repo add``, served by nginx on loopback, updated with ``btrdelta update``.

Side by side in one run:

* for every start version (and an empty DEST) to the newest: bytes of the planned path
  (nginx's access log), the direct delta for that pair (``btrdelta send --parent`` then
  ``delta make``), the full (``full_bytes``), and ``zstd -19 --long=27`` of the incremental
  stream (userspace send, the kernel's format); hops;
* mirror storage: ours (packs + full indexes + deltas) vs storing every full on its own vs
  all-pairs deltas (+ the deduplicated fulls); deltas per release; ``repo add`` seconds per
  release (``--parallel 2``, each delta checked by applying it); how the fulls deduplicate
  (distinct chunks) against the kernel's fulls of the same trees as snapshots of one
  subvolume, also for a release with a file added first (:func:`bench_fulls`);
* ``update`` throughput in MB/s of expanded stream applied (full from nothing; the multi-hop
  path from the oldest: the median of :data:`PATH_ROUNDS` timings and, beside it, the first,
  which is all a single run gets, and one more with DEST's and the repository's files read
  from the disk, as after a reboot);
* scale: a synthetic 1,000-version index (full and delta sizes drawn from the real
  sequence): plan time and peak memory of a client (parse, verify the signature, plan),
  and the metadata bytes a client downloads (timestamp + index + the bins it needs).

Run: ``.venv/bin/python -m benchmarks repo``.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from btrdelta import trust
from btrdelta.chunk.chunker import ChunkerParams, chunk_digest, iter_chunks
from btrdelta.cli import main
from btrdelta.repo.catalog import Catalog, CatalogVersion, PackEntry, build_metadata
from btrdelta.repo.layout import delta_sources
from btrdelta.repo.model import BIN_SIZE, Index
from btrdelta.repo.plan import plan_update
from btrdelta.repo.signing import CONTEXT_INDEX, open_document, sign_document
from btrdelta.testing.wheels import REGEX, release_trees
from btrdelta.tree import tree_sum
from btrdelta.update.publish import Repo
from btrdelta.update.streams import write_release_stream
from tests.update.conftest import Nginx

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "btrdelta-bench"
#: timings of the multi-hop path (each from r1 again, DEST's r8 removed; the collector as
#: the command sets it): one timing was as noisy as sessions are different (session 20's
#: two runs: 122 and 81 MB/s)
PATH_ROUNDS = 7


def _quiet(argv: list[str]) -> int:
    """``btrdelta`` in this process, output discarded."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def _publish(trees: list[Path], work: Path) -> tuple[Path, Path, list[float]]:
    root = work / "repo"
    base = work / "keys"
    base.mkdir(parents=True)
    trust.save_key_pair(trust.generate_key(), str(base / "root.key"), str(base / "root.pub"))
    assert _quiet(["repo", "init", str(root)]) == 0
    times = []
    for i, tree in enumerate(trees, 1):
        t = time.monotonic()
        assert _quiet(["repo", "add", str(root), f"r{i}", str(tree), "--parallel", "2"]) == 0
        times.append(time.monotonic() - t)
    assert _quiet(["repo", "sign", str(root), "--key", str(base / "root.key")]) == 0
    return root, base / "root.pub", times


def _direct(old: Path, new: Path, work: Path) -> tuple[int, int]:
    """(direct delta bytes, zstd -19 --long of the incremental stream)."""
    stream, delta = work / "pair.stream", work / "pair.delta"
    assert _quiet(["send", "--proto", "2", "--parent", str(old), str(new), "-o",
                   str(stream)]) == 0
    assert _quiet(["delta", "make", "-f", str(stream), "--old", str(old), "-o",
                   str(delta)]) == 0
    z = subprocess.run(["zstd", "-19", "--long=27", "-c", "-q", str(stream)],
                       capture_output=True, check=True).stdout
    return delta.stat().st_size, len(z)


def _update(url: str, dest: Path, key: Path | None, *args: str) -> dict[str, object]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["update", url, str(dest), "--json", *args]
                  + (["--key", str(key)] if key else []))
    assert rc == 0
    out: dict[str, object] = json.loads(buf.getvalue())
    return out


def bench_paths(trees: list[Path], root: Path, pub: Path, srv: Nginx, work: Path
                ) -> list[str]:
    cat = Repo(root).load()
    n = len(trees)
    lines = ["start -> newest: planned (hops) | direct delta | planned/direct | full | "
             "zstd -19 --long incremental"]
    ratios = []
    for start in range(0, n):
        dest = work / f"d{start}"
        if start:
            _update(srv.url, dest, pub, "--to", f"r{start}")
        before = srv.served()
        rep = _update(srv.url, dest, pub)
        served = srv.served() - before - int(rep["metadata_bytes"])  # type: ignore[call-overload]
        plan = rep["plan"]
        hops = plan["hops"]  # type: ignore[index]
        full = cat.versions[n - 1].full_bytes
        assert tree_sum(dest / f"r{n}") == tree_sum(trees[-1])
        if start:
            direct, zst = _direct(trees[start - 1], trees[-1], work)
            ratios.append(served / direct)
            lines.append(f"r{start} -> r{n}: {_kib(served)} ({hops}) | {_kib(direct)} | "
                         f"{served / direct:.2f} | {_kib(full)} | {_kib(zst)}")
        else:
            lines.append(f"empty -> r{n}: {_kib(served)} ({hops}) | - | - | {_kib(full)} | -")
        shutil.rmtree(dest)
    lines.append(f"planned/direct: max {max(ratios):.2f}, median "
                 f"{statistics.median(ratios):.2f} (goal <= 1.2)")
    return lines


def bench_storage(trees: list[Path], root: Path, times: list[float], work: Path) -> list[str]:
    cat = Repo(root).load()
    packs = sum(p.length for p in cat.packs)
    fidx = sum(v.full_length for v in cat.versions)
    solids = sum(v.solid.length for v in cat.versions if v.solid is not None)
    deltas = sum(n for v in cat.versions for _h, n in v.deltas.values())
    count = sum(len(v.deltas) for v in cat.versions)
    fulls_alone = sum(v.full_bytes for v in cat.versions)
    all_pairs = 0
    for w in range(2, len(trees) + 1):
        for u in range(1, w):
            all_pairs += _direct(trees[u - 1], trees[w - 1], work)[0]
    ours = packs + fidx + solids + deltas
    return [
        f"storage: ours {_kib(ours)} (packs {_kib(packs)}, full indexes {_kib(fidx)}, "
        f"solid fulls {_kib(solids)}, {count} deltas {_kib(deltas)}); every full alone "
        f"{_kib(fulls_alone)} "
        f"({ours / fulls_alone:.2f}x); all-pairs deltas + dedup fulls "
        f"{_kib(all_pairs + packs + fidx)} ({ours / (all_pairs + packs + fidx):.2f}x)",
        f"deltas per release: {count / len(cat.versions):.2f} (goal <= 2.2)",
        "repo add seconds per release (--parallel 2, deltas checked): "
        + ", ".join(f"{t:.1f}" for t in times) + f"; median {statistics.median(times):.1f}",
    ]


def _stored(streams: Iterator[bytes], params: ChunkerParams) -> list[tuple[int, int, int, int]]:
    """Each stream's (chunks, new chunks, new chunk bytes, bytes), a chunk being new unless
    an earlier stream had it (what a chunk store keeps, uncompressed)."""
    seen: set[bytes] = set()
    out = []
    for data in streams:
        n = new = new_bytes = 0
        for _off, chunk in iter_chunks(data, params):
            n += 1
            digest = chunk_digest(chunk)
            if digest not in seen:
                seen.add(digest)
                new += 1
                new_bytes += len(chunk)
        out.append((n, new, new_bytes, len(data)))
    return out


def _our_fulls(trees: list[Path]) -> Iterator[bytes]:
    """``repo add``'s full of each tree (its userspace send, normalized)."""
    for tree in trees:
        buf = bytearray()
        write_release_stream(buf.extend, tree, "r", tree_sum(tree))
        yield bytes(buf)


def _kernel_fulls(trees: list[Path], mnt: Path, tag: str) -> Iterator[bytes]:
    """The kernel's fulls (``--proto 2``) of read-only snapshots of one subvolume, each tree
    copied into it in turn with ``rsync -a --delete`` (unchanged files keep their inodes)."""
    sub = mnt / tag
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(sub)], check=True)
    for i, tree in enumerate(trees):
        subprocess.run(["rsync", "-a", "--delete", f"{tree}/", f"{sub}/"], check=True)
        snap = mnt / f"{tag}-{i}"
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(sub), str(snap)],
                       check=True)
        yield subprocess.run(["btrfs", "send", "-q", "--proto", "2", str(snap)], check=True,
                             capture_output=True).stdout


def _edited(tree: Path, work: Path) -> list[Path]:
    """``tree`` and a rebuilt copy of it with a file added first in the walk and its
    ``numpy/f2py/tests`` removed (a small release of a rebuilt tree)."""
    a, b = work / "edit-a", work / "edit-b"
    for t in (a, b):
        shutil.copytree(tree, t, symlinks=True)
    (b / "0-VERSION").write_text("1.26.3-1\n")
    shutil.rmtree(b / "numpy" / "f2py" / "tests")
    return [a, b]


def bench_fulls(trees: list[Path], params: ChunkerParams, work: Path) -> list[str]:
    """How the fulls ``repo add`` stores deduplicate across releases, against the kernel's
    fulls of the same trees as snapshots of one subvolume: the regex releases, and numpy
    1.26.3 then a rebuilt copy with a file added first and a directory removed (inode
    numbers in walk order changed most of that second full's chunks: session 14)."""
    from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs

    def mib(n: float) -> str:
        return f"{n / 2**20:.1f} MiB"

    if shutil.which("rsync") is None:
        return ["fulls stored: rsync not installed (the kernel's side copies releases with it)"]
    numpy = release_trees("numpy", ("1.26.3",), CACHE)
    edited = _edited(numpy[0], work) if numpy is not None else []
    try:
        with loop_fs("btrfs", size="1G") as mnt:
            kernel = [_stored(_kernel_fulls(t, mnt, tag), params)
                      for t, tag in ((trees, "regex"), (edited, "numpy"))]
    except BtrfsUnavailable as exc:
        return [f"fulls stored: btrfs unavailable for the kernel's fulls: {exc}"]
    ours = [_stored(_our_fulls(t), params) for t in (trees, edited)]
    lines = []
    for name, side in (("ours", ours[0]), ("the kernel's", kernel[0])):
        new, total = sum(s[2] for s in side), sum(s[3] for s in side)
        lines.append(f"{name} {mib(new)} of {mib(total)} ({new / total:.2f}x)")
    out = ["fulls stored (distinct chunks, uncompressed) over every full's bytes, regex: "
           + "; ".join(lines) + " (the kernel's: snapshots of one subvolume, each release "
           "rsync'd in)"]
    if edited:
        (_n, _new, _b, _t), (n1, new1, b1, _t1) = ours[1]
        (_kn, _knew, _kb, _kt), (kn1, knew1, kb1, _kt1) = kernel[1]
        out.append(f"numpy 1.26.3, then rebuilt with a file added first and f2py/tests "
                   f"removed: new chunks of the second full: ours {new1} of {n1} ({mib(b1)}), "
                   f"the kernel's {knew1} of {kn1} ({mib(kb1)})")
    return out


def _expanded(delta: Path) -> int:
    from btrdelta.delta.expand import open_delta
    from btrdelta.delta.format import DeltaEnd

    with open(delta, "rb") as f:
        for item in open_delta(f):
            if isinstance(item, DeltaEnd):
                return int(item.size)
    return 0


def bench_throughput(trees: list[Path], root: Path, pub: Path, srv: Nginx, work: Path
                     ) -> list[str]:
    cat = Repo(root).load()
    n = len(trees)
    dest = work / "tp"
    t = time.monotonic()
    _update(srv.url, dest, pub, "--to", f"r{n}")
    full_secs = time.monotonic() - t
    stream = cat.versions[n - 1].stream_size
    shutil.rmtree(dest / f"r{n}")
    _update(srv.url, dest, pub, "--to", "r1")
    plan = _update(srv.url, dest, None, "--dry-run")["plan"]
    expanded = 0
    positions = {v.name: i + 1 for i, v in enumerate(cat.versions)}
    for step in plan["steps"]:  # type: ignore[index]
        h, _len = cat.versions[positions[step["to"]] - 1].deltas[positions[step["from"]]]
        expanded += _expanded(root / "deltas" / f"{h}.delta")
    walls, cpus = [], []
    for _ in range(PATH_ROUNDS):
        with _as_the_command():
            t, c = time.monotonic(), time.process_time()
            _update(srv.url, dest, None)
            walls.append(time.monotonic() - t)
            cpus.append(time.process_time() - c)
        shutil.rmtree(dest / f"r{n}")
    cold = _cold_update(srv.url, dest, root)
    shutil.rmtree(dest / f"r{n}")
    path_secs = statistics.median(walls)

    def rate(secs: float) -> str:
        return f"{secs * 1000:.1f} ms = {expanded / secs / 1e6:.1f} MB/s"

    return [f"update throughput (wall, planning and tree-sum checks included): full "
            f"{stream / full_secs / 1e6:.1f} MB/s ({stream >> 10} KiB stream in "
            f"{full_secs:.2f} s); r1 -> r{n} {len(plan['steps'])} hops "  # type: ignore[index]
            f"{expanded / path_secs / 1e6:.1f} MB/s of expanded stream ({expanded >> 10} KiB "
            f"in {path_secs * 1000:.1f} ms, median of {PATH_ROUNDS}; first (the one a "
            f"single run gets) {rate(walls[0])}; fastest {rate(min(walls))}; slowest "
            f"{rate(max(walls))}; CPU {statistics.median(cpus) * 1000:.1f} ms) (goal >= "
            f"100 MB/s)",
            f"update throughput, r1 -> r{n} with the page cache of DEST's and the "
            f"repository's files dropped first (read from the disk again): {rate(cold)}"]


def _drop_cached(*trees: Path) -> None:
    """Drop the page cache of every file below ``trees`` (written to the disk first), as
    after a reboot: ``POSIX_FADV_DONTNEED`` per file, not ``drop_caches`` (which would
    empty every other process's cache too)."""
    os.sync()
    for tree in trees:
        for top, _dirs, files in os.walk(tree):
            for name in files:
                try:
                    fd = os.open(os.path.join(top, name), os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _cold_update(url: str, dest: Path, root: Path) -> float:
    """Seconds of one update r1 -> newest whose inputs are read from the disk: DEST (the
    held r1, the state) and the repository nginx serves dropped from the page cache."""
    _drop_cached(dest, root)
    with _as_the_command():
        t = time.monotonic()
        _update(url, dest, None)
        return time.monotonic() - t


@contextlib.contextmanager
def _timers() -> Iterator[dict[str, float]]:
    """Seconds spent in the parent's copy (directory backend), its snapshot (btrfs) and
    the identity checks of received versions (incremental or full), while in the block."""
    from btrdelta.receive import subvolumes
    from btrdelta.tree.incremental import Changes
    from btrdelta.update import streams

    spent: dict[str, float] = {}
    targets = [(subvolumes, "copy_tree", "copy"), (subvolumes, "create_snapshot", "snapshot"),
               (streams, "verified_digests", "verify"), (Changes, "tree_sum", "verify")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _key in targets]

    def timed(func: Any, key: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = time.monotonic()
            try:
                return func(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.monotonic() - t
        return run

    for (obj, name, key), (_o, _n, func) in zip(targets, saved, strict=True):
        setattr(obj, name, timed(func, key))
    try:
        yield spent
    finally:
        for obj, name, func in saved:
            setattr(obj, name, func)


@contextlib.contextmanager
def _as_the_command() -> Iterator[None]:
    """The cycle collector as a ``btrdelta update`` process has it (:func:`btrdelta.cli.entry`:
    what exists before the command is frozen, the youngest generation collected every
    ``_GC_YOUNG`` allocations), not as this process left it: with Python's default (700)
    a numpy hop made ~9 collections here, and the older generations held everything the
    benchmark made before (publishing, the other rounds), which the command does not."""
    from btrdelta.cli import _GC_YOUNG

    saved = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


def _timed_update(url: str, dest: Path, key: Path | None, to: str) -> dict[str, float]:
    """Seconds per phase of one update (events timed): receive = apply -> done (the
    parent's copy or snapshot, applying, the identity check, committing), and inside it
    the copy, the snapshot and the identity check (:func:`_timers`); cpu = the process's
    CPU seconds (every thread) over the receive phases."""
    from btrdelta.update.versions import update

    marks: list[tuple[str, float, float]] = []
    with _timers() as spent, _as_the_command():
        update(url, dest, to=to, key=str(key) if key else None,
               on_event=lambda ev: marks.append((str(ev["event"]), time.monotonic(),
                                                 time.process_time())))
    out: dict[str, float] = {"receive": 0.0, "copy": 0.0, "snapshot": 0.0, "verify": 0.0,
                             "cpu": 0.0}
    out.update(spent)
    for (kind, t, c), (_next, t2, c2) in itertools.pairwise(marks):
        if kind == "apply":
            out["receive"] += t2 - t
            out["cpu"] += c2 - c
    out["wall"] = marks[-1][1] - marks[0][1]
    return out


def _settle(mnt: Path) -> None:
    """Before a timed receive (either side): the subvolumes deleted so far cleaned (as
    ``btrfs subvolume sync`` waits, polling every 50 ms instead of its second: the cleaner
    drops a deleted subvolume's tree in the background, in the transactions that follow,
    and the receive's commits would carry it) and writeback done (``sync``)."""
    from btrdelta.fs.btrfs import wait_subvolumes_gone

    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert wait_subvolumes_gone(fd)
    finally:
        os.close(fd)
    os.sync()


#: CPU seconds (user + system) of each ``btrfs receive`` :func:`_peer_receive` ran
_PEER_CPU: list[float] = []


def _peer_receive(dest: Path, delta: Path, work: Path) -> float:
    """Seconds of ``btrfs receive`` of the delta's expanded stream (the kernel's format)
    into ``dest``'s filesystem, the parent being the version received there."""
    stream = work / "hop.stream"
    if not stream.exists():
        assert _quiet(["delta", "expand", str(delta), "--old", str(dest / "r1"), "-o",
                       str(stream)]) == 0
    peer = dest.parent / "peer"
    peer.mkdir()
    _settle(dest.parent)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    subprocess.run(["btrfs", "receive", "-q", "-f", str(stream), str(peer)], check=True,
                   capture_output=True)
    took = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    _PEER_CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    for sub in peer.iterdir():
        subprocess.run(["btrfs", "-q", "subvolume", "delete", str(sub)], check=True)
    peer.rmdir()
    return took


#: alternated rounds of (a delta hop, ``btrfs receive`` of its expanded stream) on btrfs
ROUNDS = 11


def _hop(url: str, dest: Path) -> dict[str, float]:
    """One timed delta hop r1 -> r2 (r2 removed first, then :func:`_settle`)."""
    subprocess.run(["btrfs", "-q", "subvolume", "delete", str(dest / "r2")], check=True)
    _settle(dest.parent)
    return _timed_update(url, dest, None, "r2")


def _rounds(url: str, dest: Path, peer: Callable[[], float], expanded: int) -> str:
    """:data:`ROUNDS` rounds, each a delta hop r1 -> r2 and ``btrfs receive`` of the same
    expanded stream, in alternating order (which goes first changes what is in the caches
    and the disk's queue), each side after :func:`_settle`: medians (one run is noise on
    a shared machine), the hop's CPU (every thread of this process), the load average
    before and after."""
    load = [os.getloadavg()[0]]
    hops: list[dict[str, float]] = []
    kernel: list[float] = []
    _PEER_CPU.clear()
    for i in range(ROUNDS):
        if i % 2:
            kernel.append(peer())
        hops.append(_hop(url, dest))
        if not i % 2:
            kernel.append(peer())
    load.append(os.getloadavg()[0])

    def med(key: str) -> float:
        return statistics.median(h[key] for h in hops)

    return (f"{ROUNDS} rounds in alternating order (load {load[0]:.1f} -> {load[1]:.1f}): "
            f"delta hop median {med('receive'):.3f} s = {expanded / med('receive') / 1e6:.0f} MB/s "
            f"(min {min(h['receive'] for h in hops):.3f}; "
            f"CPU {med('cpu'):.3f} s; snapshot {med('snapshot'):.3f} s, identity check "
            f"{med('verify'):.3f} s), btrfs receive median {statistics.median(kernel):.3f} s "
            f"= {expanded / statistics.median(kernel) / 1e6:.0f} MB/s (min {min(kernel):.3f}; "
            f"CPU {statistics.median(_PEER_CPU):.3f} s); "
            f"hop/btrfs receive "
            f"{statistics.median(kernel) / med('receive'):.2f}x")


def _apply_line(pair: str, kind: str, url: str, dest: Path, pub: Path, cat: Catalog,
                expanded: int, peer: Callable[[], float] | None = None) -> str:
    full = _timed_update(url, dest, pub, "r1")
    os.sync()  # the full's writeback is its own cost, not the hop's
    hop = _timed_update(url, dest, None, "r2")
    size = cat.versions[0].stream_size
    full_rate = size / full["receive"] / 1e6
    hop_rate = expanded / hop["receive"] / 1e6
    parent = (f"parent copied in {hop['copy']:.3f} s" if hop["copy"]
              else f"parent snapshotted in {hop['snapshot']:.3f} s")
    line = (f"apply rate, {pair}, DEST on {kind}: full {full_rate:.0f} MB/s "
            f"of stream received ({size >> 20} MiB in {full['receive']:.2f} s, the identity "
            f"check ({full['verify']:.2f} s) included; wall {full['wall']:.2f} s); delta hop "
            f"{hop_rate:.0f} MB/s of expanded stream ({expanded / 2**20:.1f} MiB in "
            f"{hop['receive']:.3f} s: {parent}, incremental identity check "
            f"{hop['verify']:.3f} s; wall {hop['wall']:.2f} s) (goal >= 100 MB/s)")
    if peer is not None:
        took = peer()
        line += (f"; btrfs receive of the same expanded stream {took:.3f} s = "
                 f"{expanded / took / 1e6:.0f} MB/s (hop/btrfs receive "
                 f"{took / hop['receive']:.2f}x); " + _rounds(url, dest, peer, expanded))
    return line


def _apply_pair(pair: str, trees: list[Path], work: Path, image: str) -> list[str]:
    from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs

    root, pub, times = _publish(trees, work)
    cat = Repo(root).load()
    h, _n = cat.versions[1].deltas[1]
    delta = root / "deltas" / f"{h}.delta"
    expanded = _expanded(delta)
    srv = Nginx(root, work / "nginx")
    out = [f"repo add of {pair}: {times[0]:.1f} s / {times[1]:.1f} s"]
    try:
        out.append(_apply_line(pair, "a directory (ext4)", srv.url, work / "dest", pub, cat,
                               expanded))
        try:
            with loop_fs("btrfs", size=image) as mnt:
                dest = mnt / "dest"
                out.append(_apply_line(pair, "btrfs", srv.url, dest, pub, cat, expanded,
                                       lambda: _peer_receive(dest, delta, work)))
        except BtrfsUnavailable as exc:
            out.append(f"btrfs unavailable: {exc}")
    finally:
        srv.stop()
    return out


def bench_apply(work: Path) -> list[str]:
    """Apply rate on larger release pairs: numpy 1.26.3 -> 1.26.4 (~60 MB trees, a 3.5 MiB
    hop: fixed costs per hop dominate) and scipy 1.13.0 -> 1.13.1 (~120 MB trees, a 45 MiB
    hop), into a directory (a delta hop copies the parent tree first: no snapshots there)
    and into btrfs (the parent is snapshotted, as btrfs receive does)."""
    from benchmarks.trees import CACHE as TREE_CACHE

    out = []
    for pkg, versions, cache, image in (("numpy", ("1.26.3", "1.26.4"), CACHE, "1G"),
                                        ("scipy", ("1.13.0", "1.13.1"), TREE_CACHE, "2G")):
        trees = release_trees(pkg, versions, cache)
        if trees is None:
            out.append(f"{pkg} wheels unavailable: apply rate not measured")
            continue
        out += _apply_pair(f"{pkg} {versions[0]} -> {versions[1]}", trees, work / pkg, image)
    return out


def bench_scale(root: Path, work: Path) -> list[str]:
    real = Repo(root).load()
    fulls = [v.full_bytes for v in real.versions]
    sizes = [n for v in real.versions for _h, n in v.deltas.values()]
    rng = random.Random(1000)
    cat = Catalog(ChunkerParams.from_avg(65536), 12)
    base = 160
    for p in range(1, 1001):
        pid = rng.randbytes(32).hex()
        cat.packs.append(PackEntry(pid, base, 500_000))
        base += 500_000
        cat.versions.append(CatalogVersion(
            f"2025.{p // 100}.{p % 100}", rng.randbytes(32).hex(), 3_000_000,
            rng.randbytes(32).hex(), 2_000, rng.choice(fulls), [pid],
            {a: (rng.randbytes(32).hex(), rng.choice(sizes)) for a in delta_sources(p)}))
    key = trust.generate_key()
    index, bins = build_metadata(cat, version=1, expires=int(time.time()) + 86400,
                                 timestamp_keys=(trust.public_key_text(key),))
    data = sign_document(index.encode(), [key], CONTEXT_INDEX)
    bin_len = [len(b) for _ref, b in bins]
    times, peaks, downloads = [], [], []
    for k in range(20):
        held = rng.randrange(1, 1000)
        gc.collect()  # this process's heap (publishing, nginx logs) is not a client's
        t = time.perf_counter()
        idx = Index.decode(open_document(data, "i", [key.public_key()], CONTEXT_INDEX), "i")
        plan = plan_update(idx, {held}, 1000)
        times.append(time.perf_counter() - t)
        if k < 3:  # memory in runs of their own (tracemalloc slows Python several times)
            tracemalloc.start()
            idx = Index.decode(open_document(data, "i", [key.public_key()], CONTEXT_INDEX),
                               "i")
            plan_update(idx, {held}, 1000)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        need = {held, 1000, *(s.target for s in plan.steps)}
        bins_needed = {idx.bin_of(p).first for p in need}
        downloads.append(len(data) + 700 + sum(bin_len[(f - 1) // BIN_SIZE] for f in bins_needed))
    return [
        f"scale, 1,000 versions: index {len(data) / 1024:.1f} KiB, bins "
        f"{statistics.mean(bin_len) / 1024:.1f} KiB each; client plan (parse + verify + "
        f"plan) median {statistics.median(times) * 1000:.1f} ms, max "
        f"{max(times) * 1000:.1f} ms (goal < 100 ms), peak {max(peaks) / 2**20:.1f} MiB "
        f"(goal < 64 MiB); metadata a client downloads (timestamp + index + bins it needs) "
        f"median {statistics.median(downloads) / 1024:.1f} KiB, max "
        f"{max(downloads) / 1024:.1f} KiB (goal < 100 KiB)",
    ]


def run() -> list[str]:
    """Run the benchmark; returns lines of results."""
    trees = release_trees(*REGEX, CACHE)
    if trees is None:
        return ["regex wheels unavailable (pip download failed): skipped"]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    out = [f"load average at start: {load}; {len(trees)} regex releases "
           f"({REGEX[1][0]} .. {REGEX[1][-1]}), trees of ~3 MB"]
    with tempfile.TemporaryDirectory(prefix="bench-repo-") as tmp_s:
        work = Path(tmp_s)
        root, pub, times = _publish(trees, work)
        srv = Nginx(root, work / "nginx")
        try:
            out += bench_paths(trees, root, pub, srv, work)
            out += bench_throughput(trees, root, pub, srv, work)
        finally:
            srv.stop()
        out += bench_storage(trees, root, times, work)
        out += bench_fulls(trees, Repo(root).load().params, work)
        out += bench_scale(root, work)
        out += bench_apply(work)
    return out


if __name__ == "__main__":  # python -m benchmarks.bench_repo
    for line in run():
        print(line)
