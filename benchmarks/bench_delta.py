"""Delta streams vs peer tools on real tree pairs (needs root, btrfs, xz, zstd, rsync, xdelta3).

Pairs (cached under ``BTRDELTA_BENCH_CACHE``, :mod:`benchmarks.trees`): the Debian bookworm
minbase root before and after ``apt-get upgrade``; the same minbase root with 27 packages
installed (Python 3.11 among them: most of the update is new files), written in place
(``rsync --delete`` over the old snapshot: only what changed is sent, as on a device
running apt); scipy 1.13.0 -> 1.13.1 wheels unpacked into trees (its 35 MB vendored
OpenBLAS is renamed with a new hash suffix); a "rebuilt release" (stdlib modules and
binaries, every file rewritten with small edits as new inodes). Except the install pair, NEW
is written as fresh files (new inodes: the kernel resends every file), as an image rebuilt
from scratch would be. For each pair, side by side in one run:

* sizes: the delta stream (``btrdelta delta make``, as downloaded) of the kernel's
  incremental stream with the default (``--carrier auto``: the JSON summary says which
  carrier it chose) and with the other carrier (``zstd`` / ``xz``; the chosen one writes
  the same bytes as ``auto``), format 7; the kernel stream with ``xz -9e`` and with
  ``zstd -19 --long=27``; an ``rsync --only-write-batch`` batch with ``xz -9e``; ext4
  images of both trees (``mkfs.ext4 -d``, same size and UUID) with ``xdelta3 -9 -B <size>`` and
  ``zstd -19 --long=31 --patch-from``; and the delta of the ``--compressed-data`` stream
  (compress=zstd file system), whose extents ``delta make`` regenerates by recompressing;
  the table at the end puts them side by side with the best peer and our margin;
* speed and memory of the CLI (child processes, startup included): ``delta make`` in MB/s of
  diffed data (the new content handed to the diff workers: files with an old file, and new
  files looked up by name and content) and of stream, ``delta expand`` in MB/s of expanded
  stream, each with its peak RSS (GNU time's ``%M``) next to the goal (64 MiB + 4x the
  largest file diffed); with ``BTRDELTA_BENCH_RECEIVE`` (default 1), ``btrdelta receive``
  of the zstd delta of the plain stream, into a loop btrfs whose parent A the kernel
  received, next to ``btrfs receive`` of the same stream (median of
  ``BTRDELTA_BENCH_REPEAT`` rounds, :mod:`.bench_receive`), and of the delta of the
  ``--compressed-data`` stream next to ``btrfs receive`` of that stream, wall and CPU
  (:mod:`.bench_cdreceive`: at least 5 alternated rounds at ``nice -n -15``, medians, the
  load printed; ``python -m benchmarks cdreceive`` measures that alone, a pair at a time).

Other pairs: ``BTRDELTA_BENCH_PANDAS=1`` adds pandas 2.2.2 -> 2.2.3 (wheels unpacked, as
scipy); ``BTRDELTA_BENCH_DIRS="NAME=OLD:NEW;..."`` adds directory pairs of your own (NEW
written as fresh files); ``BTRDELTA_BENCH_PAIRS=WORD,...`` keeps only the pairs whose name
has one of the words.

App releases against whole-tree tools (:func:`app_rows`, ``BTRDELTA_BENCH_APPS``: the
pairs by name, default all of :data:`APPS`; empty: none): a wheel's release over the last
(numpy 1.26.3 -> 1.26.4, regex 2024.9.11 -> 2024.11.6, scipy 1.13.0 -> 1.13.1, pandas,
cryptography, django, unpacked with each file's mtime and mode from the wheel), or a
package's (typescript from npm, nodejs and containerd from Debian: :data:`.trees.ARCHIVES`,
downloaded once, their SHA-256 checked) as a judge would compare them: ``btrdelta
send -p OLD NEW`` (userspace, no btrfs) then ``delta make`` (the default), against
``bsdiff``, ``xdelta3 -9 -B <old tar's size>`` and ``zstd -19 --long=31 --patch-from`` of
the two trees' tars, each tar made the same way (GNU tar, ``--sort=name --numeric-owner
--format=gnu``, the tree's own modes and mtimes: a tar carries no atime, ctime nor
nanoseconds, a send stream does); sizes, wall and CPU seconds and peak RSS of each tool,
and (zstd carrier) where the delta's bytes go (:mod:`.delta_bytes`).

Run: ``.venv/bin/python -m benchmarks delta``.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh

from .bench_receive import REPEAT, WORKDIR
from .trees import CACHE, debian_install_pair, real_pair

#: scipy 1.13.0 -> 1.13.1: its vendored OpenBLAS (35 MB) is renamed
#: libopenblasp-r0-24bff013.3.26.dev.so -> libopenblasp-r0-01191904.3.27.so
SCIPY = ("1.13.0", "1.13.1")
#: pandas 2.2.2 -> 2.2.3 (``BTRDELTA_BENCH_PANDAS=1``: 26 MB of wheels downloaded once): a
#: point release of a wheel with native extensions (43 of its 44 .so rebuilt), 46 MB a tree
PANDAS = ("2.2.2", "2.2.3")
PY = sys.executable
BTRDELTA = [PY, "-m", "btrdelta"]


def _wheel_trees(pkg: str, versions: tuple[str, str]) -> tuple[Path, Path] | None:
    """Two wheels of ``pkg`` unpacked into trees (downloaded once with ``pip download``)."""
    trees = []
    for ver in versions:
        dest = CACHE / f"{pkg}-{ver}"
        if not dest.exists():
            wheels = CACHE / "wheels"
            wheels.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                [PY, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
                 "-d", str(wheels), f"{pkg}=={ver}"], capture_output=True, check=False,
            )
            found = sorted(wheels.glob(f"{pkg}-{ver}-*.whl"))
            if proc.returncode != 0 or not found:
                return None
            tmp = dest.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(found[0]) as z:
                z.extractall(tmp)
            tmp.rename(dest)
        trees.append(dest)
    return trees[0], trees[1]


def _release_trees(work: Path) -> tuple[Path, Path]:
    from tests.delta.conftest import build_release, rebuild_release

    a = work / "rel-a" / "usr"
    build_release(a)
    b = work / "rel-b" / "usr"
    b.parent.mkdir(parents=True)
    sh("cp", "-a", str(a), str(b))
    rebuild_release(b)
    return a.parent, b.parent


def _size(path: Path) -> int:
    return path.stat().st_size


def _zstd(src: Path, *args: str) -> int:
    out = src.with_suffix(src.suffix + ".zst")
    sh("zstd", "-q", "-f", *args, str(src), "-o", str(out))
    return _size(out)


def _tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


#: CPU seconds (user + system) of the last command run by :func:`_timed`
LAST_CPU = [0.0]


def _timed(cmd: list[str | os.PathLike[str]]) -> tuple[float, int, bytes]:
    """Run ``cmd``; (seconds, peak RSS in bytes, stderr then stdout: ``--json`` summaries
    are on stdout). Raises on failure. Its CPU seconds (user + system, every thread) are
    left in ``LAST_CPU[0]``.

    The peak RSS is GNU time's ``%M`` of the command: ``wait4`` of a child forked from this
    (large) process would count the pages it had before ``exec``.
    """
    with tempfile.NamedTemporaryFile(prefix="rss-") as rss:
        t0 = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name,
                               *(os.fspath(c) for c in cmd)],
                              capture_output=True, check=False)
        secs = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace')}")
        kib, user, system = Path(rss.name).read_text().split()[-3:]
    LAST_CPU[0] = float(user) + float(system)
    return secs, int(kib) * 1024, proc.stderr + b"\n" + proc.stdout


def _load() -> str:
    """The load average now (the machine is shared: wall times depend on it)."""
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _peers(stream: Path) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of the peer tools on the same stream, in the same run:
    ``zstd -19 --long=23 -T0`` (the carrier's level and window, every core) and its
    ``zstd -d``; ``xz -9e -T0`` and ``xz -d``."""
    out: dict[str, tuple[float, float]] = {}
    z = stream.with_suffix(".peer.zst")
    x = stream.with_suffix(".peer.xz")
    for key, cmd in (
        ("zstd -19", ["zstd", "-q", "-f", "-19", "--long=23", "-T0", stream, "-o", z]),
        ("zstd -d", ["zstd", "-q", "-f", "-d", "--long=23", z, "-o", "/dev/null"]),
        ("xz -9e", ["sh", "-c", f"xz -9e -T0 -c {stream} > {x}"]),
        ("xz -d", ["sh", "-c", f"xz -d -c -T0 {x} > /dev/null"]),
    ):
        secs, _, _ = _timed(cmd)  # type: ignore[arg-type]
        out[key] = (secs, LAST_CPU[0])
    z.unlink()
    x.unlink()
    return out


def _ext4_images(a: Path, b: Path, work: Path) -> dict[str, int]:
    size_mb = max(64, (max(_tree_bytes(a), _tree_bytes(b)) * 2) // (1 << 20) + 32)
    uid = "0b9c2f35-3a3e-4c36-9d0a-2a2d5b7c1e11"
    imgs = []
    for name, tree in (("a", a), ("b", b)):
        img = work / f"{name}.ext4"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        sh("mkfs.ext4", "-q", "-F", "-U", uid, "-E", "hash_seed=" + uid, "-d", str(tree),
           str(img))
        imgs.append(img)
    res = {}
    xd = work / "img.xdelta"
    sh("xdelta3", "-9", "-f", "-B", str(size_mb << 20), "-e", "-s", str(imgs[0]), str(imgs[1]),
       str(xd))
    res["ext4 image xdelta3 -9 -B"] = _size(xd)
    pf = work / "img.patch.zst"
    sh("zstd", "-q", "-f", "-19", "--long=31", "--patch-from=" + str(imgs[0]), str(imgs[1]),
       "-o", str(pf))
    res["ext4 image zstd -19 --long=31 --patch-from"] = _size(pf)
    for img in imgs:
        img.unlink()
    return res


def _kernel_streams(a_tree: Path, b_tree: Path, work: Path,
                    in_place: bool = False) -> dict[str, Path]:
    """Kernel streams A -> B: plain v1, and v2 --compressed-data; plus the full stream of A
    (to seed receive targets). NEW is written as fresh files (new inodes: the kernel resends
    every file), or with ``in_place`` by ``rsync --delete`` over A (only what changed is
    written, each changed file as a new inode renamed into place, as dpkg does)."""
    with loop_fs("btrfs", size="3G", options="compress=zstd") as mnt:
        vol = mnt / "vol"
        sh("btrfs", "-q", "subvolume", "create", vol)
        sh("cp", "-a", f"{a_tree}/.", str(vol))
        sh("sync")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", vol, mnt / "A")
        if in_place:
            sh("rsync", "-aHAX", "--delete", f"{b_tree}/", f"{vol}/")
        else:
            for child in vol.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            sh("cp", "-a", f"{b_tree}/.", str(vol))
        sh("sync")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", vol, mnt / "B")
        out = {"plain": work / "AB.stream", "compressed": work / "AB.cstream",
               "full-A": work / "A.full"}
        sh("btrfs", "-q", "send", "-p", mnt / "A", "-f", out["plain"], mnt / "B")
        sh("btrfs", "-q", "send", "--proto", "2", "--compressed-data", "-p", mnt / "A", "-f",
           out["compressed"], mnt / "B")
        sh("btrfs", "-q", "send", "-f", out["full-A"], mnt / "A")
    return out


def _mb(n: int, secs: float) -> str:
    return f"{n / secs / 1e6:6.1f} MB/s" if secs > 0 else "   inf"


def _receive_runs(stream: Path, delta: Path, full_a: Path) -> dict[str, tuple[float, int]]:
    """Seconds (median of ``REPEAT`` rounds, tools interleaved) and peak RSS of receiving,
    on a loop-mounted btrfs (its image in /dev/shm when there is room, as in the receive
    benchmark) whose parent subvolume A was received by the kernel: the delta by btrdelta,
    and the plain stream by btrdelta and by ``btrfs receive`` (the peer), each into a
    fresh directory."""
    runs: dict[str, list[tuple[float, int]]] = {}
    # room for every round without waiting for deleted subvolumes to be cleaned up
    size = (1 << 30) + 3 * REPEAT * (_size(full_a) + _size(stream))
    with loop_fs("btrfs", size=str(size), workdir=WORKDIR) as mnt:
        for i in range(REPEAT):
            for label, cmd, src in (("delta", [*BTRDELTA, "receive"], delta),
                                    ("stream", [*BTRDELTA, "receive"], stream),
                                    ("kernel", ["btrfs", "receive"], stream)):
                dest = mnt / f"{label}-{i}"
                dest.mkdir()
                sh("btrfs", "receive", "-f", full_a, dest)
                sh("sync")
                runs.setdefault(label, []).append(_timed([*cmd, "-f", src, dest])[:2])
                sh("sync")
                for sub in dest.iterdir():
                    sh("btrfs", "-q", "subvolume", "delete", sub)
    return {label: (statistics.median(t for t, _ in r), max(m for _, m in r))
            for label, r in runs.items()}


def _stats(err: bytes, out: bytes = b"") -> dict[str, object]:
    """The JSON summary of ``delta make --json`` (on stderr; on stdout in later CLIs)."""
    for text in (err, out):
        for line in reversed(text.decode(errors="replace").strip().splitlines()):
            if line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError("delta make printed no JSON summary")


def _delta_runs(stream: Path, full_a: Path, a_tree: Path, work: Path, tag: str,
                lines: list[str], peers: dict[str, tuple[float, float]],
                carrier: str = "zstd", receive: bool = False) -> tuple[int, str]:
    """make / expand (/ receive) one stream with one carrier (``auto``: the default);
    returns the delta's size and the carrier it has."""
    delta = work / f"{tag}.delta"
    load = _load()
    t_make, rss_make, err = _timed([*BTRDELTA, "delta", "make", "-f", stream, "--old", a_tree,
                                    "-o", delta, "--json", "--carrier", carrier])
    cpu_make = LAST_CPU[0]
    stats = _stats(err)
    back = work / f"{tag}.back"
    t_exp, rss_exp, _ = _timed([*BTRDELTA, "delta", "expand", "-f", delta, "--old", a_tree,
                                "-o", back])
    cpu_exp = LAST_CPU[0]
    same = filecmp.cmp(back, stream, shallow=False)
    back.unlink()
    s = _size(stream)
    diffed = int(stats.get("diffed_bytes", 0))  # type: ignore[call-overload]
    largest = int(stats.get("largest_diffed", 0))  # type: ignore[call-overload]
    enc: dict[str, dict[str, int]] = stats.get("encoded_writes", {})  # type: ignore[assignment]
    enc_txt = ", ".join(f"{k} {v['regenerated']}/{v['tried']}" for k, v in enc.items())
    chosen = str(stats.get("carrier", carrier))
    lines.append(
        f"  [{tag}] expand(make(S)) == S: {same}; carrier {chosen}; "
        f"{stats['patched_files']} files patched, "
        f"{stats.get('found_bases', 0)} against an old file found by name or content"
        + (f"; encoded writes regenerated: {enc_txt}" if enc_txt else "")
    )
    limit = 64 * (1 << 20) + 4 * largest
    codecs: dict[str, dict[str, int]] = stats.get("codecs", {})  # type: ignore[assignment]
    lines.append(f"  [{tag}] patches by codec: " + ", ".join(
        f"{k} {v['files']} files {v['patch_bytes']:,} B" for k, v in codecs.items()))
    peer = peers["xz -9e" if chosen == "xz" else "zstd -19"]
    peer_d = peers["xz -d" if chosen == "xz" else "zstd -d"]
    name = "xz -9e -T0" if chosen == "xz" else "zstd -19 --long=23 -T0"
    lines.append(
        f"  [{tag}] make    {_mb(diffed, t_make)} of diffed data ({diffed / 1e6:.1f} MB), "
        f"{_mb(s, t_make)} of stream, {t_make:5.1f} s ({cpu_make:5.1f} s CPU: "
        f"{_mb(diffed, cpu_make)} of diffed data a CPU second), {load}; peak RSS "
        f"{rss_make / 1e6:5.0f} MB (largest file diffed {largest / 1e6:.1f} MB: goal "
        f"{limit / 1e6:.0f} MB: {'met' if rss_make <= limit else 'missed'}); "
        f"{name} of the stream {peer[0]:5.1f} s ({peer[1]:5.1f} s CPU): make/peer time "
        f"{t_make / peer[0]:.2f}x, CPU {cpu_make / peer[1]:.2f}x"
    )
    lines.append(f"  [{tag}] expand  {_mb(s, t_exp)}, {t_exp:5.1f} s ({cpu_exp:5.1f} s CPU: "
                 f"{_mb(s, cpu_exp)} a CPU second), peak RSS {rss_exp / 1e6:5.0f} MB; "
                 f"{name.split()[0]} -d of the peer's output {peer_d[0]:5.1f} s "
                 f"({peer_d[1]:5.1f} s CPU): expand/peer time {t_exp / peer_d[0]:.2f}x")
    if receive:
        receives = _receive_runs(stream, delta, full_a)
        t_rcv, rss_rcv = receives["delta"]
        t_plain, _ = receives["stream"]
        t_kern, rss_kern = receives["kernel"]
        lines.append(f"  [{tag}] receive {_mb(s, t_rcv)}, {t_rcv:5.1f} s, peak RSS "
                     f"{rss_rcv / 1e6:5.0f} MB into btrfs (the stream: btrdelta "
                     f"{_mb(s, t_plain)}, btrfs receive {_mb(s, t_kern)}, "
                     f"{rss_kern / 1e6:.0f} MB; delta/kernel time {t_rcv / t_kern:.2f}x)")
    return _size(delta), chosen


def _xz(src: Path) -> int:
    out = src.with_suffix(src.suffix + ".xz")
    with open(out, "wb") as f:
        subprocess.run(["xz", "-T1", "-9e", "-c", str(src)], stdout=f, check=True)
    return _size(out)


#: the columns of the table, in order
COLUMNS = (
    ("delta auto", "delta (default: --carrier auto)"),
    ("delta zstd", "delta (--carrier zstd)"),
    ("delta xz", "delta (--carrier xz)"),
    ("xz -9e", "kernel stream xz -9e"),
    ("zstd -19 --long", "kernel stream zstd -19 --long=27"),
    ("ext4 patch-from", "ext4 images zstd -19 --long=31 --patch-from"),
    ("ext4 xdelta3", "ext4 images xdelta3 -9"),
    ("rsync+xz", "rsync batch xz -9e"),
)


def _measure(name: str, a_tree: Path, b_tree: Path, work: Path,
             in_place: bool) -> tuple[list[str], dict[str, int]]:
    lines = [f"-- {name}: {_tree_bytes(a_tree) / 1e6:.1f} MB -> "
             f"{_tree_bytes(b_tree) / 1e6:.1f} MB"
             f" ({'written in place' if in_place else 'as fresh files'})"]
    streams = _kernel_streams(a_tree, b_tree, work, in_place)
    receive = os.environ.get("BTRDELTA_BENCH_RECEIVE", "1") != "0"
    sizes: dict[str, int] = {"stream": _size(streams["plain"])}
    peers = _peers(streams["plain"])
    # the default (auto), then the carrier it did not choose (the one it chose writes the
    # same bytes: tests/delta/test_edits.py)
    sizes["delta auto"], chosen = _delta_runs(
        streams["plain"], streams["full-A"], a_tree, work, "plain auto", lines, peers, "auto",
        receive)
    sizes[f"delta {chosen}"] = sizes["delta auto"]
    other = "xz" if chosen == "zstd" else "zstd"
    sizes[f"delta {other}"], _ = _delta_runs(
        streams["plain"], streams["full-A"], a_tree, work, f"plain {other}", lines, peers,
        other)
    sizes["xz -9e"] = _xz(streams["plain"])
    sizes["zstd -19 --long"] = _zstd(streams["plain"], "-19", "--long=27")
    batch = work / "rsync.batch"
    dst = work / "rsync-dst"
    sh("cp", "-a", str(a_tree), str(dst))  # not copytree: trees have device nodes
    sh("rsync", "-aHAX", "--delete", f"--only-write-batch={batch}", f"{b_tree}/", f"{dst}/")
    shutil.rmtree(dst)
    sizes["rsync+xz"] = _xz(batch)
    images = _ext4_images(a_tree, b_tree, work)
    sizes["ext4 patch-from"] = images["ext4 image zstd -19 --long=31 --patch-from"]
    sizes["ext4 xdelta3"] = images["ext4 image xdelta3 -9 -B"]
    s = sizes["stream"]
    lines.append(f"  kernel stream (raw, v1)                           {s:>12,d} B")
    for key, label in COLUMNS:
        n = sizes[key]
        mark = "" if key.startswith("delta") else (
            f"  delta default {sizes['delta auto'] / n:6.1%}, zstd "
            f"{sizes['delta zstd'] / n:6.1%}, xz {sizes['delta xz'] / n:6.1%} of it")
        lines.append(f"  {label:<49} {n:>12,d} B  ({n / s:6.2%}){mark}")
    cs = _size(streams["compressed"])
    cdelta, _ = _delta_runs(streams["compressed"], streams["full-A"], a_tree, work,
                            "compressed", lines, _peers(streams["compressed"]), "auto")
    if receive:  # wall and CPU against btrfs receive of the compressed stream (issue 12)
        from .bench_cdreceive import compile_sources, measure

        compile_sources()
        lines += ["  [compressed] receive of the delta vs btrfs receive of the stream:",
                  *(f"  {line}" for line in measure({"compressed": streams["compressed"],
                                                    "full-A": streams["full-A"],
                                                    "delta": work / "compressed.delta"}))]
    lines.append(f"  --compressed-data stream (v2, compress=zstd)      {cs:>12,d} B")
    lines.append(f"  {'  its delta stream':<49} {cdelta:>12,d} B  ({cdelta / cs:6.2%} of it)")
    return lines, sizes


def _table(rows: list[tuple[str, dict[str, int]]]) -> list[str]:
    """The side-by-side table: one row per pair, bytes; the best peer and our margin."""
    head = ["pair", "stream", *(k for k, _ in COLUMNS), "best peer", "default vs it",
            "best delta vs it"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, sz in rows:
        peers = {k: v for k, v in sz.items() if not k.startswith("delta") and k != "stream"}
        best = min(peers, key=lambda k: peers[k])
        ours = min(sz["delta zstd"], sz["delta xz"])
        cells = [name, f"{sz['stream']:,}", *(f"{sz[k]:,}" for k, _ in COLUMNS),
                 best, f"{sz['delta auto'] / peers[best] - 1:+.1%}",
                 f"{ours / peers[best] - 1:+.1%}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _pairs(work: Path) -> list[tuple[str, Path, Path, bool]]:
    """(name, OLD, NEW, in place) for every pair of the run."""
    name, old, new = real_pair()
    pairs = [(f"{name} (apt-get upgrade)", old, new, False)]
    try:
        pairs.append(("debian-bookworm-minbase + 27 packages (install)",
                      *debian_install_pair(), True))
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        print(f"# install pair unavailable: {exc}")
    wheel = _wheel_trees("scipy", SCIPY)
    if wheel is not None:
        pairs.append((f"scipy {SCIPY[0]} -> {SCIPY[1]} (renamed vendored libraries)", *wheel,
                      False))
    if os.environ.get("BTRDELTA_BENCH_PANDAS", "0") != "0":
        wheel = _wheel_trees("pandas", PANDAS)
        if wheel is not None:
            pairs.append((f"pandas {PANDAS[0]} -> {PANDAS[1]} (rebuilt extensions)", *wheel,
                          False))
    for spec in filter(None, os.environ.get("BTRDELTA_BENCH_DIRS", "").split(";")):
        label, _, dirs = spec.rpartition("=")
        old_dir, _, new_dir = dirs.partition(":")
        pairs.append((label or dirs, Path(old_dir), Path(new_dir), False))
    if os.environ.get("BTRDELTA_BENCH_RELEASE", "1") != "0":
        pairs.append(("rebuilt release (test tree)", *_release_trees(work), False))
    only = os.environ.get("BTRDELTA_BENCH_PAIRS")
    return [p for p in pairs if not only or any(w in p[0] for w in only.split(","))]


#: app release pairs (package, old, new) for :func:`app_rows`: wheels (from PyPI, unpacked
#: as scipy's), and the archives of :data:`.trees.ARCHIVES` (npm and Debian packages).
#: Session 22 added releases nobody had tuned for: pandas (43 of 44 extensions rebuilt),
#: cryptography (one 10.8 MB Rust extension), Django (pure Python, 2,700 files, 11
#: changed), TypeScript (four 2-9 MB JavaScript bundles with a version bump), Node.js
#: 18 (Debian's libnode108 + nodejs security update: a 47 MB C++ library) and
#: containerd (Debian's, five Go static binaries, 97 MB)
APPS = (("numpy", "1.26.3", "1.26.4"), ("regex", "2024.9.11", "2024.11.6"),
        ("scipy", "1.13.0", "1.13.1"), ("pandas", "2.2.2", "2.2.3"),
        ("cryptography", "43.0.0", "43.0.1"), ("django", "5.0.6", "5.0.7"),
        ("typescript", "5.4.4", "5.4.5"),
        ("nodejs", "18.20.4+dfsg-1~deb12u2", "18.20.4+dfsg-1~deb12u3"),
        ("containerd", "1.6.20~ds1-1+deb12u2", "1.6.20~ds1-1+deb12u3"))
#: SHA-256 of the wheels session 22 added (pip checks them against PyPI's index too)
WHEEL_SHA256 = {
    "pandas-2.2.2": "6d2123dc9ad6a814bcdea0f099885276b31b24f7edf40f6cdbc0912672e22eee",
    "pandas-2.2.3": "c124333816c3a9b03fbeef3a9f230ba9a737e9e5bb4060aa2107a86cc0a497fc",
    "cryptography-43.0.0": "299d3da8e00b7e2b54bb02ef58d73cd5f55fb31f33ebbf33bd00d9aa6807df7e",
    "cryptography-43.0.1": "58d4e9129985185a06d849aa6df265bdd5a74ca6e1b736a77959b498e0505b85",
    "django-5.0.6": "8363ac062bb4ef7c3f12d078f6fa5d154031d129a15170a1066412af49d30905",
    "django-5.0.7": "f216510ace3de5de01329463a315a629f33480e893a9024fc93d8c32c22913da",
}


def _app_trees(pkg: str, old: str, new: str) -> tuple[Path, Path] | None:
    """The unpacked wheels (or archives), from the benchmark cache or the default one
    (``~/.cache``)."""
    from btrdelta.testing.wheels import release_trees

    from .trees import ARCHIVES, archive_tree

    if (pkg, old) in ARCHIVES:
        a, b = archive_tree(pkg, old), archive_tree(pkg, new)
        return None if a is None or b is None else (a, b)
    for cache in (CACHE, Path.home() / ".cache" / "btrdelta-bench"):
        if all((cache / f"{pkg}-{v}").is_dir() for v in (old, new)):
            break
    else:
        cache = CACHE
    trees = release_trees(pkg, (old, new), cache)
    if trees is None:
        return None
    for ver in (old, new):
        want = WHEEL_SHA256.get(f"{pkg}-{ver}")
        for whl in (cache / "wheels").glob("*.whl"):
            if want and whl.name.lower().startswith(f"{pkg}-{ver}-") and hashlib.sha256(
                    whl.read_bytes()).hexdigest() != want:
                raise RuntimeError(f"{whl}: not the wheel measured before (SHA-256)")
    return trees[0], trees[1]


def _tar(tree: Path, out: Path) -> Path:
    sh("tar", "--sort=name", "--numeric-owner", "--format=gnu", "-C", str(tree), "-cf",
       str(out), ".")
    return out


def _app_pair(pkg: str, a: Path, b: Path, work: Path) -> tuple[list[str], dict[str, int]]:
    lines = [f"-- {pkg} {a.name} -> {b.name} (btrdelta send -p, then delta make; peers on "
             f"tars): {_tree_bytes(a) / 1e6:.1f} MB -> {_tree_bytes(b) / 1e6:.1f} MB, {_load()}"]
    stream, delta, back = work / "s.stream", work / "d.delta", work / "back.stream"
    runs: dict[str, tuple[int, float, float, int]] = {}  # size, wall, CPU, peak RSS
    t, rss, _ = _timed([*BTRDELTA, "send", "-p", a, "-f", stream, b])
    runs["send"] = (_size(stream), t, LAST_CPU[0], rss)
    t, rss, err = _timed([*BTRDELTA, "delta", "make", "-f", stream, "--old", a, "-o", delta,
                          "--json"])
    runs["delta"] = (_size(delta), t, LAST_CPU[0], rss)
    stats = _stats(err)
    t, rss, _ = _timed([*BTRDELTA, "delta", "expand", "-f", delta, "--old", a, "-o", back])
    runs["expand"] = (_size(back), t, LAST_CPU[0], rss)
    same = filecmp.cmp(back, stream, shallow=False)
    old_tar, new_tar = _tar(a, work / "a.tar"), _tar(b, work / "b.tar")
    for key, out, cmd in (
        ("bsdiff", work / "p.bsdiff", ["bsdiff", old_tar, new_tar, work / "p.bsdiff"]),
        ("xdelta3 -9", work / "p.xd", ["xdelta3", "-9", "-f", "-B", str(_size(old_tar)), "-e",
                                       "-s", old_tar, new_tar, work / "p.xd"]),
        ("zstd patch-from", work / "p.zst", ["zstd", "-q", "-f", "-19", "--long=31",
                                             "--single-thread", f"--patch-from={old_tar}",
                                             new_tar, "-o", work / "p.zst"]),
    ):
        t, rss, _ = _timed(cmd)  # type: ignore[arg-type]
        runs[key] = (_size(out), t, LAST_CPU[0], rss)
    lines.append(f"  stream {runs['send'][0]:,} B; tars {_size(old_tar) / 1e6:.1f} MB -> "
                 f"{_size(new_tar) / 1e6:.1f} MB; expand(make(S)) == S: {same}; carrier "
                 f"{stats.get('carrier')}; patches by codec: " + ", ".join(
                     f"{k} {v['files']} files {v['patch_bytes']:,} B"
                     for k, v in stats.get("codecs", {}).items()))  # type: ignore[attr-defined]
    for key, (n, t, cpu, rss) in runs.items():
        lines.append(f"  {key:<16} {n:>12,d} B  {t:6.2f} s ({cpu:6.2f} s CPU), peak RSS "
                     f"{rss / 1e6:5.0f} MB")
    if stats.get("carrier") == "zstd":
        from .delta_bytes import account

        lines += [f"  | {line}" for line in account(delta)[2:]]
    for f in (stream, delta, back, old_tar, new_tar):
        f.unlink()
    return lines, {k: v[0] for k, v in runs.items()}


def app_rows(work: Path) -> list[str]:
    """The app-release pairs of ``BTRDELTA_BENCH_APPS``: their lines, then their table."""
    wanted = os.environ.get("BTRDELTA_BENCH_APPS", ",".join(a[0] for a in APPS)).split(",")
    lines: list[str] = []
    table = ["| pair | stream | delta | bsdiff | xdelta3 -9 | zstd --patch-from | best peer "
             "| delta vs it |", "|---|---|---|---|---|---|---|---|"]
    for pkg, old, new in APPS:
        trees = _app_trees(pkg, old, new) if pkg in wanted else None
        if trees is None:
            if pkg in wanted:
                print(f"# {pkg} {old} -> {new} unavailable (download failed)", flush=True)
            continue
        sub = work / f"app-{pkg}"
        sub.mkdir()
        got, sz = _app_pair(pkg, *trees, sub)
        shutil.rmtree(sub)
        for line in got:
            print(f"   {line}", flush=True)
        lines += got
        best = min(("bsdiff", "xdelta3 -9", "zstd patch-from"), key=lambda k: sz[k])
        table.append(f"| {pkg} {old} -> {new} | {sz['send']:,} | {sz['delta']:,} | "
                     f"{sz['bsdiff']:,} | {sz['xdelta3 -9']:,} | {sz['zstd patch-from']:,} | "
                     f"{best} | {sz['delta'] / sz[best] - 1:+.1%} |")
    return [*lines, "", *table] if len(table) > 2 else lines


def run() -> list[str]:
    """Measure every pair; one printable line per result, then the table."""
    lines: list[str] = []
    rows: list[tuple[str, dict[str, int]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for i, (name, a, b, in_place) in enumerate(_pairs(work)):
            sub = work / f"pair{i}"
            sub.mkdir()
            got, sizes = _measure(name, a, b, sub, in_place)
            for line in got:
                print(f"   {line}", flush=True)
            lines += got
            rows.append((name, sizes))
            shutil.rmtree(sub)
        apps = app_rows(work)
    return [*lines, "", *_table(rows), "", *apps]


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
