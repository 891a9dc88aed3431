"""Upstream's fsstress against the kernel, every engine (fstests btrfs/007's workload).

For each seed, fsstress (:mod:`btrdelta.testing.fsstress`; one process, ``-s SEED``) runs
in a subvolume on a loop btrfs mounted ``compress-force=zstd`` (the first seed also on
:data:`VARIANTS`: no compression, lzo without inline extents, zlib, hole items); halfway
through, snapshot A is taken and ``btrdelta send --record`` records the live subvolume;
after its last operation, snapshot B and ``send --from-sendshot``. Then every check of
tests/randwork (:func:`check_snapshots`): dump == ``btrfs receive --dump``, our receive of
the kernel's v1 and v2 ``--compressed-data`` streams into btrfs, ext4 and tmpfs ==
``btrfs receive``'s, delta make + expand == the stream, the delta received, our send of A -> B
received by the kernel, the sendshot streams.

fsstress is not part of btrdelta: ``BTRDELTA_FSSTRESS`` names the program (fstests'
``ltp/fsstress``; else ``fsstress`` on PATH or ``/var/tmp/btrdelta-fsstress/fsstress``).
``make fsstress`` runs ``BTRDELTA_FSSTRESS_SEEDS`` seeds (default 40) from
``BTRDELTA_FSSTRESS_FROM`` (default 1) of ``BTRDELTA_FSSTRESS_OPS`` operations (default
2000); without ``BTRDELTA_FSSTRESS_SEEDS`` the tests are skipped. A failure names its
seed (the same seed replays the same operations).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.testing.fsstress import (
    MIXES,
    FsstressUnavailable,
    find_fsstress,
    quote,
    run_fsstress,
)
from btrdelta.testing.loopfs import run
from btrdelta.testing.scenarios import kernel_receive
from btrdelta.testing.scenarios import send as kernel_send
from tests.conftest import progs_dump
from tests.randwork.test_randwork import (
    Mounts,
    _fresh,
    _mounts,
    _our_dump,
    _our_receive,
    _same,
    check_snapshots,
    root_mtime_drifts,
)

_N = int(os.environ.get("BTRDELTA_FSSTRESS_SEEDS", "0") or 0)
_FROM = int(os.environ.get("BTRDELTA_FSSTRESS_FROM", "1") or 1)
OPS = int(os.environ.get("BTRDELTA_FSSTRESS_OPS", "2000") or 2000)
SEEDS = list(range(_FROM, _FROM + _N))

pytestmark = [pytest.mark.btrfs, pytest.mark.slow,
              pytest.mark.skipif(not _N, reason="fsstress: make fsstress")]


@contextmanager
def _with_tmpfs(m: Mounts) -> Iterator[Mounts]:
    """``m`` with a plain directory on a fresh tmpfs too (unmounted on exit)."""
    mnt = Path(tempfile.mkdtemp(prefix="btrdelta-tmpfs-"))
    try:
        run("mount", "-t", "tmpfs", "-o", "size=4G", "tmpfs", mnt)
        try:
            yield replace(m, tmpfs=mnt)
        finally:
            run("umount", mnt)
    finally:
        mnt.rmdir()


def _program() -> Path:
    try:
        return find_fsstress()
    except FsstressUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {exc}")
        pytest.skip(str(exc))


def fsstress_seed(seed: int, m: Mounts, tmp: Path, ops: int = OPS,
                  mix: str = "default") -> list[str]:
    """fsstress with ``seed`` and ``mix`` on ``m.src``, then every check; the problems."""
    program = _program()
    top = _fresh(m.src, f"s{seed}")
    vol, a, b = top / "vol", top / "A", top / "B"
    run("btrfs", "-q", "subvolume", "create", vol)
    store = tmp / "store"
    ss_a, ss_b = tmp / "ss.A", tmp / "ss.B"
    btrdelta = (sys.executable, "-m", "btrdelta", "send", vol, "--store", store, "-q")
    halfway = (quote("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a) + " && "
               + quote(*btrdelta, "-o", ss_a, "--record", "--name", "A"))
    log = tmp / "fsstress.log"
    run_fsstress(vol, seed, ops, mix=mix, halfway=halfway, program=program, log=log)
    if not a.is_dir():
        return [f"fsstress -s {seed}: snapshot A was not taken (see {log})"]
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    run(*btrdelta, "-o", ss_b, "--from-sendshot", "latest", "--name", "B")
    problems = check_snapshots(f"{seed}", a, b, m, tmp, sendshots=(ss_a, ss_b))
    return problems + _other_streams(f"{seed}", a, b, m, tmp)


def _other_streams(label: str, a: Path, b: Path, m: Mounts, tmp: Path) -> list[str]:
    """The kernel's other streams of B: with A as a clone source and no parent (``-c A``:
    btrfs send takes A as the parent too), received by the kernel and by us on top of A;
    and ``--no-data`` from A, dumped (our dump == ``btrfs receive --dump``)."""
    full = tmp / "v2.A"
    c = kernel_send(b, tmp / "c.B", proto=2, compressed=True, extra=("-c", str(a)))
    n = kernel_send(b, tmp / "n.B", parent=a, extra=("--no-data",))
    problems = [f"dump of {s.name} differs from btrfs receive --dump"
                for s in (c, n) if _our_dump(s) != progs_dump(s).stdout]
    # (the kernel may take any copy of A on the filesystem as the parent: the v1 one too,
    # whose hole layout is not v2's; the content, not the layout, is compared)
    kern = _fresh(m.dst, f"c{label}")
    dests = [_fresh(m.dst, f"co{label}"), _fresh(m.ext4, f"c{label}")]
    for s in (full, c):
        kernel_receive(s, kern)
        for dest in dests:
            try:
                _our_receive(s, dest)
            except Exception as exc:
                problems.append(f"receive {s.name} into {dest}: {exc}")
    for dest in dests:
        problems += _same(kern / "B", dest / "B", f"-c A: B into {dest}",
                          ignore_root_mtime=True)
    return problems


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mix", [m for m in MIXES if m != "writes"])  # (writes: the chain's)
def test_fsstress(mix: str, seed: int, tmp_path: Path) -> None:
    with _mounts("compress-force=zstd") as m, _with_tmpfs(m) as m:
        problems = fsstress_seed(seed, m, tmp_path, mix=mix)
    if not problems:  # hundreds of seeds: keep the streams of the failing ones only
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert not problems, (f"fsstress seed {seed}, mix {mix}, {OPS} operations:\n"
                          + "\n".join(problems))


#: the first seed also on the source filesystems upstream's send tests meet (tests/matrix)
VARIANTS = {"plain": ("", ()), "lzo-no-inline": ("compress=lzo,max_inline=0", ()),
            "zlib": ("compress-force=zlib", ()), "hole-items": ("", ("-O", "^no-holes"))}


@pytest.mark.parametrize("seed", SEEDS[:1])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fsstress_variant(variant: str, seed: int, tmp_path: Path) -> None:
    with _mounts(*VARIANTS[variant]) as m, _with_tmpfs(m) as m:
        problems = fsstress_seed(seed, m, tmp_path)
    assert not problems, f"fsstress seed {seed} ({variant}):\n" + "\n".join(problems)


@contextmanager
def _busy(mnt: Path, snapshot_of: Path) -> Iterator[None]:
    """Balances of ``mnt`` one after another (upstream's btrfs/252) and read-only snapshots
    of ``snapshot_of`` taken every half second (btrfs/036) while the block runs."""
    script = ("trap 'wait; exit' TERM; "
              f"while :; do btrfs balance start --full-balance {quote(mnt)} >/dev/null 2>&1;"
              " done & "
              "i=0; while :; do i=$((i+1)); btrfs -q subvolume snapshot -r "
              f"{quote(snapshot_of)} {quote(mnt)}/busy.$i >/dev/null 2>&1; sleep 0.5; done & "
              "wait")
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        # a balance runs on after its process is signalled: cancel it until the loop ends
        while proc.poll() is None:
            subprocess.run(["btrfs", "balance", "cancel", str(mnt)], capture_output=True,
                           check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)


def _chain(snaps: list[Path], out: Path, tag: str) -> list[Path]:
    """The kernel's streams of the chain: the first snapshot whole, each next one from the
    one before it (v1, or v2 --compressed-data)."""
    proto = 2 if tag == "v2" else 1
    return [kernel_send(s, out / f"{tag}.{i}", parent=snaps[i - 1] if i else None,
                        proto=proto, compressed=proto == 2) for i, s in enumerate(snaps)]


def chain_seed(seed: int, m: Mounts, tmp: Path, ops: int, count: int) -> list[str]:
    """fsstress's writes with ``count`` snapshots along the way, the kernel's chain of
    streams of them sent while balances and snapshots run (upstream's btrfs/252 and 036);
    every stream dumped, received by the kernel, by us into btrfs, ext4 and tmpfs, made a
    delta and expanded again: the differences."""
    program = _program()
    vol, snaps_dir = m.src / "data", m.src / "snapshots"
    run("btrfs", "-q", "subvolume", "create", vol)
    snaps_dir.mkdir()
    snap = quote("btrfs", "-q", "subvolume", "snapshot", "-r", vol) + " " + \
        quote(snaps_dir) + "/snap_$(date +%s%N)"
    run_fsstress(vol, seed, ops, mix="writes", halfway=snap, times=count, program=program,
                 log=tmp / "fsstress.log")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, snaps_dir / "snap_z")
    snaps = sorted(snaps_dir.iterdir())
    problems: list[str] = []
    if len(snaps) != count + 1:
        return [f"{len(snaps)} snapshots, not {count + 1}"]
    with _busy(m.src, vol):
        chains = {tag: _chain(snaps, tmp, tag) for tag in ("v1", "v2")}
    for tag, streams in chains.items():
        problems += [f"dump of {s.name} differs from btrfs receive --dump"
                     for s in streams if _our_dump(s) != progs_dump(s).stdout]
        problems += _receive_chain(tag, streams, snaps, m)
        problems += [p for i, s in enumerate(streams) if i
                     for p in _delta_round_trip(s, snaps[i - 1])]
    return problems


def _receive_chain(tag: str, streams: list[Path], snaps: list[Path], m: Mounts) -> list[str]:
    """The kernel's receive of the chain ``streams`` and ours into btrfs, ext4 and tmpfs,
    compared snapshot by snapshot as they come; the received subvolumes are deleted at the
    end (``btrfs receive`` takes as the parent any subvolume of the filesystem that has
    the parent's received UUID: a copy of another chain could be it) and, in the plain
    directories, each snapshot once the next one is checked (they hold whole copies)."""
    problems: list[str] = []
    names = [s.name for s in snaps]
    kern = _fresh(m.dst, f"k{tag}")
    dests = [_fresh(p, f"o{tag}") for p in (m.dst, m.ext4, m.tmpfs) if p is not None]
    for i, s in enumerate(streams):
        kernel_receive(s, kern)
        drift = i > 0 or root_mtime_drifts(snaps[0], kern / names[0])
        for dest in dests:
            try:
                _our_receive(s, dest)
            except Exception as exc:
                problems.append(f"receive {s.name} into {dest}: {exc}")
                continue
            plain = dest.parent != m.dst
            problems += _same(kern / names[i], dest / names[i], f"{s.name} into {dest}",
                              holes=tag == "v2", ignore_root_mtime=drift, elsewhere=plain)
            if plain and i:
                shutil.rmtree(dest / names[i - 1])
    for d in (kern, dests[0]):
        for sub in d.iterdir():
            run("btrfs", "-q", "subvolume", "delete", sub)
    return problems


def _delta_round_trip(stream: Path, parent: Path) -> list[str]:
    out: list[bytes] = []
    with open(stream, "rb") as f:
        make_delta(f, parent, out.append, MakeOptions(min_file_size=1))
    back: list[bytes] = []
    expand_to(open_delta(io.BytesIO(b"".join(bytes(p) for p in out))), parent, back.append)
    if b"".join(bytes(p) for p in back) != stream.read_bytes():
        return [f"delta make + expand of {stream.name} is not the stream"]
    return []


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_fsstress_chain_while_balancing(seed: int, tmp_path: Path) -> None:
    with _mounts("compress=zstd") as m, _with_tmpfs(m) as m:
        problems = chain_seed(seed, m, tmp_path, OPS, 8)
    if not problems:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert not problems, f"fsstress chain, seed {seed}:\n" + "\n".join(problems)
