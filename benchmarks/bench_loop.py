"""Warm rounds: ``btrdelta replicate LIVE DEST --every`` and a warm send against the kernel's
``btrfs send -p`` per round (issue 15: sendshot rounds at <= 2x the kernel's).

A one-shot ``btrdelta send --from-sendshot`` or ``replicate`` process pays its interpreter
and imports every round (~25 ms of a ~45 ms small round); a loop pays them once. Workloads
(``BTRDELTA_BENCH_WORKLOADS``, comma-separated, default both), ``ROUNDS`` rounds each
(``BTRDELTA_BENCH_ROUNDS``, default 12), on a loop-mounted btrfs:

* ``tiny``: the real root of ``benchmarks/sendshot_tiny_rounds.sh`` (``realroot-new`` under
  ``$BTRDELTA_BENCH_CACHE``, else ``benchmarks/.cache``; the Debian ``/usr`` of
  ``benchmarks.trees.real_pair()`` when it is not built): each round appends a line to
  ``etc/motd`` (or a file of its own), touches one file and rewrites one 4 KiB block of the
  largest file;
* ``in-place``: ``benchmarks sendshot``'s in-place changes (appends, overwrites, renames,
  hard links, truncations, deletions, xattrs, punched holes) to the Debian ``/usr``.

Each round, after the change, side by side (the order alternated round by round):

* kernel ``snapshot``: ``btrfs subvolume snapshot -r LIVE SNAP`` (its workflow's, a
  transaction commit); ``send -p``: ``btrfs send -p PREV SNAP -f /dev/null``;
  ``send -p | receive``: ``btrfs send -p PREV SNAP | btrfs receive KDEST`` (a shell
  pipeline), and the ``sync -f KDEST`` after it timed apart (our receiver writes DEST out
  before it answers COMMITTED);
* ours, warm ``send``: :func:`btrdelta.send.sendshot.send_with_sendshots` of SNAP against
  the latest sendshot of a store of its own, recording the next, into ``/dev/null``, in
  this process (imported and run once before, the store's object kept with its last chain
  decoded, ``keep_decoded``: what a loop's send side costs; like for like with ``send
  -p``);
* ours, one-shot ``send``: the ``btrdelta send SNAP --from-sendshot latest --record -o
  /dev/null`` process of ``benchmarks/sendshot_tiny_rounds.sh`` (a store of its own): what
  each round costs without a loop (the interpreter and imports, the base read);
* ours, a ``replicate --every`` round: the loop (a process started once, stopped with
  SIGSTOP as soon as it printed a round's JSON line and let go on with SIGCONT once the
  change is made) replicates LIVE to a DEST on the same filesystem: its ``seconds`` (the
  session's snapshot of LIVE, the forked receiver, the stream, the receiver's write-out of
  DEST, the commit, the snapshot's deletion) against the kernel's snapshot + ``send -p |
  receive`` (+ ``sync -f``).

The received subvolumes of the first and last rounds are compared with tree-sum. Medians
over the rounds, their ratios, the load.

Run: ``.venv/bin/python -m benchmarks loop`` (root, loop devices).
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from benchmarks.bench_sendshot import BTRDELTA, WORKDIR, _in_place
from benchmarks.trees import real_pair
from btrdelta.send.sendshot import send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh
from btrdelta.tree.treesum import tree_sum

ROUNDS = int(os.environ.get("BTRDELTA_BENCH_ROUNDS", "12"))
CACHE = Path(os.environ.get("BTRDELTA_BENCH_CACHE") or Path(__file__).parent / ".cache")


def _wall(cmd: list[str] | str) -> float:
    t = time.monotonic()
    subprocess.run(cmd, check=True, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def _tiny(live: Path, rng: random.Random) -> Callable[[int], None]:
    root = CACHE / "realroot-new"
    if root.is_dir():
        sh("cp", "-a", f"{root}/.", str(live))
    else:  # (not built: the Debian /usr)
        _name, _old, new = real_pair()
        sh("cp", "-a", "--reflink=never", f"{new}/usr", str(live / "usr"))
    motd = live / "etc" / "motd" if (live / "etc").is_dir() else live / "motd"
    files = sorted(p for p in (live / "usr" / "lib").rglob("*")
                   if p.is_file() and not p.is_symlink())
    big = max(files, key=lambda p: p.stat().st_size)
    touched = live / "usr" / "bin" / "ls" if (live / "usr/bin/ls").exists() else files[0]

    def change(i: int) -> None:
        with open(motd, "a") as f:
            f.write(f"round {i}\n")
        os.utime(touched)
        with open(big, "r+b") as f:
            f.seek(4096 * i)
            f.write(rng.randbytes(4096))

    return change


class _Loop:
    """The ``replicate --every`` process, kept in step with the changes."""

    def __init__(self, live: Path, dest: Path, store: Path) -> None:
        self.proc = subprocess.Popen(
            [*BTRDELTA, "replicate", "--json", "--every", "2s", "--store", str(store),
             str(live), str(dest)], stdout=subprocess.PIPE, text=True)

    def round(self, want: str = "committed") -> dict[str, Any]:
        """Let it go on, read its next round, stop it (asleep: a round takes less than the
        interval)."""
        os.kill(self.proc.pid, signal.SIGCONT)
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        os.kill(self.proc.pid, signal.SIGSTOP)
        if not line:
            raise RuntimeError("the replicate loop exited")
        got: dict[str, Any] = json.loads(line)
        if got["outcome"] != want:
            raise RuntimeError(f"a loop round: {got}")
        return got

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return next(int(ln.split()[1]) for ln in status.splitlines()
                    if ln.startswith("VmRSS:")) << 10

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # (taken as it goes on: between rounds)
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.wait(timeout=60)


def _warm_send(snap: Path, store: SendshotStore, first: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of a send of ``snap`` in this process into /dev/null."""
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    with open(os.devnull, "wb", buffering=0) as null:
        send_with_sendshots(null.write, snap, store=store, snapshot=False, version=2,
                            from_sendshot=None if first else "latest", record=True,
                            durable=False)
    wall, r1 = time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def _ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def _workload(name: str, setup: Callable[[Path, random.Random], Callable[[int], None]],
              out: Callable[[str], None]) -> None:
    rng = random.Random(32)
    with loop_fs("btrfs", size="10G", workdir=WORKDIR) as mnt:
        live, kdest, rdest = mnt / "live", mnt / "kdest", mnt / "rdest"
        sh("btrfs", "-q", "subvolume", "create", str(live))
        change = setup(live, rng)
        kdest.mkdir()
        rdest.mkdir()
        sh("sync")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(live), str(mnt / "s0"))
        sh("sh", "-c", f"btrfs -q send {mnt}/s0 | btrfs -q receive {kdest}")
        store = SendshotStore(mnt / "store-warm")
        store.keep_decoded()  # (as the loop's)
        _warm_send(mnt / "s0", store, True)
        once = [*BTRDELTA, "send", "--record", "--store", str(mnt / "store-once"), "-o",
                "/dev/null"]
        sh(*once, str(mnt / "s0"))
        # the full replication by a one-shot run (a round longer than the interval would
        # be followed by the next at once); the loop's first round finds it current
        full = json.loads(sh(*BTRDELTA, "replicate", "--json", "--store",
                             str(mnt / "store-loop"), str(live), str(rdest)))
        ok = tree_sum(rdest / full["name"]) == tree_sum(mnt / "s0")
        loop = _Loop(live, rdest, mnt / "store-loop")
        got = loop.round("refused")
        t: dict[str, list[float]] = {k: [] for k in
                                     ("snap", "k", "kr", "sync", "w", "wcpu", "once",
                                               "loop", "lcpu")}
        for i in range(1, ROUNDS + 1):
            change(i)
            sh("sync")
            snap, prev = mnt / f"s{i}", mnt / f"s{i - 1}"

            def kernel(snap: Path = snap, prev: Path = prev) -> None:
                t["snap"].append(_wall(["btrfs", "-q", "subvolume", "snapshot", "-r",
                                        str(live), str(snap)]))
                t["k"].append(_wall(["btrfs", "-q", "send", "-p", str(prev), str(snap),
                                     "-f", "/dev/null"]))
                t["kr"].append(_wall(f"btrfs -q send -p {prev} {snap} | "
                                     f"btrfs -q receive {kdest}"))
                t["sync"].append(_wall(["sync", "-f", str(kdest)]))
                w, c = _warm_send(snap, store, False)
                t["w"].append(w)
                t["wcpu"].append(c)
                t["once"].append(_wall([*once, "--from-sendshot", "latest", str(snap)]))

            if i % 2:
                kernel()
            got = loop.round()
            if not i % 2:
                kernel()
            t["loop"].append(got["seconds"])
            t["lcpu"].append(got["cpu_seconds"])
            sh("btrfs", "-q", "subvolume", "delete", str(prev))
        ok = ok and tree_sum(rdest / got["name"]) == tree_sum(mnt / f"s{ROUNDS}") == \
            tree_sum(kdest / f"s{ROUNDS}")
        rss = loop.rss()
        loop.stop()
        load = os.getloadavg()[0]
        files = sum(len(fs) + len(ds) for _r, ds, fs in os.walk(live))
        k, kr = _ms(t["k"]), _ms(t["kr"])
        krs = _ms([a + b for a, b in zip(t["kr"], t["sync"], strict=True)])
        snap_ms = _ms(t["snap"])
        w, lp = _ms(t["w"]), _ms(t["loop"])
        out(f"{name} ({files} inodes, medians of {ROUNDS} rounds, load {load:.1f}): kernel "
            f"snapshot {snap_ms:.1f} ms, send -p {k:.1f} ms, send -p | receive {kr:.1f} ms "
            f"(+ sync -f {krs:.1f} ms)")
        one = _ms(t["once"])
        out(f"{name} send side: warm send {w:.1f} ms (CPU {_ms(t['wcpu']):.1f} ms) vs send "
            f"-p {k:.1f} ms: {w / k:.2f}x; a one-shot send process {one:.1f} ms: "
            f"{one / k:.2f}x")
        kw, kws = snap_ms + kr, snap_ms + krs
        out(f"{name} replicate --every round: {lp:.1f} ms (its CPU {_ms(t['lcpu']):.1f} ms, "
            f"the forked receiver's not counted) vs snapshot + send -p | receive {kw:.1f} "
            f"ms: {lp / kw:.2f}x (with sync -f {kws:.1f} ms: {lp / kws:.2f}x); loop RSS "
            f"{rss / 2**20:.0f} MB after {ROUNDS + 1} rounds; tree-sum "
            f"{'equal' if ok else 'DIFFERENT'}")


def run() -> list[str]:
    """Run the benchmark; return (and print) the result lines."""
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    str(Path(__file__).parents[1] / "src")], stdout=subprocess.DEVNULL,
                   check=False)
    workloads = {"tiny": _tiny, "in-place": _in_place}
    chosen = os.environ.get("BTRDELTA_BENCH_WORKLOADS")
    for name in chosen.split(",") if chosen else workloads:
        _workload(name, workloads[name], out)
    return lines
