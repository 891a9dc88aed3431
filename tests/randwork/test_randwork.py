"""Random workloads against the kernel, every engine (upstream btrfs/007, fsstress + fssum).

For each seed, :mod:`btrdelta.testing.randwork` builds a tree A on a loop btrfs mounted
``compress-force=zstd``, snapshots it, applies random mutations and snapshots B. Then, with
the kernel as the oracle:

* ``btrdelta dump`` of the kernel's full and incremental streams (v1, and v2
  ``--compressed-data``) == ``btrfs receive --dump``, byte for byte;
* btrdelta's ``receive`` of them, into btrfs and into a plain directory on ext4, gives the
  tree ``btrfs receive`` gives (tree-sum, for v2 with the hole layout: on ext4 a file may
  have a hole in the one block btrfs fills with zeros at an old end of file; B's root mtime
  aside, send-scenarios.md §3.3);
* btrdelta's userspace send of A and A->B (the snapshots read as plain trees) is received by
  ``btrfs receive`` and gives A and B;
* ``delta make`` of the kernel's incremental then ``delta expand`` == the stream bit for
  bit, and ``receive`` of the delta on top of the kernel's A gives the kernel's B;
* ``send --record`` of the live subvolume at A, then ``send --from-sendshot latest`` at B:
  ``btrfs receive`` takes both and gives A and B.

The first seed also runs on ``compress-force=lzo`` and ``=zlib``, its v2 streams received
with ``force_decompress`` as well (upstream btrfs/284: every algorithm, with and without
``--force-decompress``).

``make test`` runs the seeds of :data:`SEEDS`; ``make randwork`` (``BTRDELTA_RANDWORK=N``,
``BTRDELTA_RANDWORK_FROM=K``) runs N seeds from K. A failure names its seed: re-run it with
``BTRDELTA_RANDWORK=1 BTRDELTA_RANDWORK_FROM=<seed> make randwork``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.receive import receive
from btrdelta.send import send_stream
from btrdelta.stream import StreamReader
from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs, run
from btrdelta.testing.randwork import build, mutate
from btrdelta.testing.scenarios import kernel_receive, send
from btrdelta.tree.treesum import diff_manifests, tree_manifest
from tests.conftest import layouts_elsewhere, progs_dump, require_btrfs

pytestmark = pytest.mark.btrfs

SEEDS = [1, 2, 3]
if os.environ.get("BTRDELTA_RANDWORK"):
    _first = int(os.environ.get("BTRDELTA_RANDWORK_FROM", "1"))
    SEEDS = list(range(_first, _first + int(os.environ["BTRDELTA_RANDWORK"])))


@dataclass
class Mounts:
    src: Path
    dst: Path
    ext4: Path
    #: a plain directory on tmpfs too (tests/randwork/test_fsstress.py)
    tmpfs: Path | None = None


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    with _mounts("compress-force=zstd") as m:
        yield m


@contextmanager
def _mounts(src_options: str, mkfs_args: tuple[str, ...] = ()) -> Iterator[Mounts]:
    require_btrfs()
    try:
        with ExitStack() as stack:
            src = stack.enter_context(loop_fs("btrfs", size="2G", options=src_options or None,
                                              mkfs_args=mkfs_args))
            dst = stack.enter_context(loop_fs("btrfs", size="3G"))
            ext4 = stack.enter_context(loop_fs("ext4", size="1G"))
            yield Mounts(src, dst, ext4)
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


def _same(expected: Path, got: Path, what: str, *, holes: bool = False,
          ignore_root_mtime: bool = False, elsewhere: bool = False) -> list[str]:
    """The differences of ``got`` from ``expected`` (tree-sum manifests). ``elsewhere``
    (with ``holes``: ``got`` on another filesystem than btrfs receive's ``expected``): a
    file may have a hole in one block where btrfs has zeros as data, as btrfs fills the
    block that held a file's end with zeros when the file grows past it or a hole is
    punched past it (seeds 19, 42, 52: the same system calls leave that block a hole on
    ext4, as in the source); any other difference of layout is one."""
    try:
        want = tree_manifest(expected, holes=holes, ignore_root_mtime=ignore_root_mtime)
        have = tree_manifest(got, holes=holes, ignore_root_mtime=ignore_root_mtime)
        if elsewhere:
            want = layouts_elsewhere(want, have)
        diff = diff_manifests(want, have)
    except OSError as exc:
        return [f"{what}: {exc}"]
    return [f"{what}: " + "; ".join(diff)] if diff else []


def _our_receive(stream: Path, dest: Path) -> None:
    with open(stream, "rb") as f:
        receive(StreamReader(f, source=stream.name).events(), dest)


def _our_dump(stream: Path) -> bytes:
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "dump", "-f", str(stream)],
                          capture_output=True, check=False, env={**os.environ, "TZ": "UTC"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _fresh(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    return d


def root_mtime_drifts(source: Path, received: Path) -> bool:
    """Whether ``btrfs receive`` left the root of ``received`` (a copy of the snapshot
    ``source``) with another mtime than the source's: the stream set it (utimes) and then
    changed the root again (an orphan ``oN-G-I`` made in it, fsstress seeds 21 and 27 of
    the "names" mix: a full stream; send-scenarios.md §3.3 for incrementals), so every
    receiver's root mtime is the time it received, not a value to compare."""
    return os.lstat(source).st_mtime_ns != os.lstat(received).st_mtime_ns


def _receive_checks(label: str, tag: str, streams: tuple[Path, Path], m: Mounts,
                    a: Path) -> list[str]:
    """The kernel's receive of ``streams`` (A, then B from A; ``a`` the source A) into
    ``m.dst``, ours into ``m.dst`` and plain directories (ext4, and tmpfs when
    ``m.tmpfs``): the differences."""
    problems: list[str] = []
    holes = tag == "v2"
    kern = _fresh(m.dst, f"k{label}{tag}")
    ours = _fresh(m.dst, f"o{label}{tag}")
    plains = [_fresh(p, f"o{label}{tag}") for p in (m.ext4, m.tmpfs) if p is not None]
    for s in streams:
        kernel_receive(s, kern)
        for dest in (ours, *plains):
            try:
                _our_receive(s, dest)
            except Exception as exc:
                problems.append(f"receive {tag} {s.name} into {dest}: {exc}")
    # (the hole layout on ext4 too: the parent's copy there keeps its holes and its
    # zero data blocks, tests below; BTRDELTA_RANDWORK_EXT4_HOLES=0 leaves it out)
    plain_holes = holes and os.environ.get("BTRDELTA_RANDWORK_EXT4_HOLES", "1") == "1"
    drift = root_mtime_drifts(a, kern / "A")
    for dest, lay in ((ours, holes), *((p, plain_holes) for p in plains)):
        problems += _same(kern / "A", dest / "A", f"receive {tag} A into {dest}",
                          holes=lay, ignore_root_mtime=drift, elsewhere=dest != ours)
        problems += _same(kern / "B", dest / "B", f"receive {tag} B into {dest}",
                          holes=lay, ignore_root_mtime=True, elsewhere=dest != ours)
    return problems


def check_seed(seed: int, m: Mounts, tmp: Path) -> list[str]:
    """Every check for one seed; the problems found (empty: all agree)."""
    top = _fresh(m.src, f"s{seed}")
    vol = top / "vol"
    run("btrfs", "-q", "subvolume", "create", vol)
    build(vol, seed)
    run("sync")
    a, b = top / "A", top / "B"
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
    store = tmp / "store"
    ss_a, ss_b = tmp / "ss.A", tmp / "ss.B"
    assert main(["send", str(vol), "-o", str(ss_a), "--record", "--store", str(store),
                 "--name", "A", "-q"]) == 0
    mutate(vol, seed)
    run("sync")
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
    assert main(["send", str(vol), "-o", str(ss_b), "--from-sendshot", "latest",
                 "--store", str(store), "--name", "B", "-q"]) == 0
    return check_snapshots(f"{seed}", a, b, m, tmp, sendshots=(ss_a, ss_b))


def kernel_streams(a: Path, b: Path, tmp: Path) -> dict[str, tuple[Path, Path]]:
    """The kernel's streams of ``a`` and of ``b`` from ``a``, v1 and v2 --compressed-data."""
    streams: dict[str, tuple[Path, Path]] = {}
    for tag, proto, compressed in (("v1", 1, False), ("v2", 2, True)):
        streams[tag] = (send(a, tmp / f"{tag}.A", proto=proto, compressed=compressed),
                        send(b, tmp / f"{tag}.B", parent=a, proto=proto, compressed=compressed))
    return streams


def check_snapshots(label: str, a: Path, b: Path, m: Mounts, tmp: Path, *,
                    sendshots: tuple[Path, Path] | None = None,
                    streams: dict[str, tuple[Path, Path]] | None = None) -> list[str]:
    """Every check of read-only snapshots ``a`` and ``b`` (a snapshot of the same subvolume
    taken later), of the kernel's ``streams`` of them (:func:`kernel_streams`, made here when
    not given) and of ``sendshots`` (our ``--record`` then ``--from-sendshot`` streams of
    that subvolume at A and at B), ``label`` naming the receive directories; the problems
    found (empty: all agree)."""
    problems: list[str] = []
    streams = streams or kernel_streams(a, b, tmp)

    # 1. dump == btrfs receive --dump
    for tag, pair in streams.items():
        for s in pair:
            ref = progs_dump(s)
            assert ref.returncode == 0, ref.stderr
            if _our_dump(s) != ref.stdout:
                problems.append(f"dump of {tag} {s.name} differs from btrfs receive --dump")

    # 2. receive: kernel into btrfs, ours into btrfs and into plain directories
    for tag, (sa, sb) in streams.items():
        problems += _receive_checks(label, tag, (sa, sb), m, a)

        # 3. delta make + expand == the stream; receive of the delta gives B
        holes = tag == "v2"
        kern = m.dst / f"k{label}{tag}"
        out: list[bytes] = []
        with open(sb, "rb") as f:
            make_delta(f, a, out.append, MakeOptions(min_file_size=1))
        delta = b"".join(bytes(p) for p in out)
        back: list[bytes] = []
        expand_to(open_delta(io.BytesIO(delta)), a, back.append)
        if b"".join(bytes(p) for p in back) != sb.read_bytes():
            problems.append(f"delta expand of {tag} B is not the stream")
        (tmp / f"{tag}.delta").write_bytes(delta)
        dd = _fresh(m.dst, f"d{label}{tag}")
        kernel_receive(sa, dd)
        if main(["receive", "-q", "-f", str(tmp / f"{tag}.delta"), str(dd)]) != 0:
            problems.append(f"receive of the {tag} delta failed")
        else:
            problems += _same(kern / "B", dd / "B", f"receive of the {tag} delta",
                              holes=holes, ignore_root_mtime=True)

    # 4. userspace send of the snapshots as plain trees, received by the kernel
    us = _fresh(m.dst, f"u{label}")
    for proto in (1, 2):
        ua, ub = tmp / f"u{proto}.A", tmp / f"u{proto}.B"
        kw = {"compress": "zstd"} if proto == 2 else {}
        with open(ua, "wb") as f:
            send_stream(f.write, a, version=proto, **kw)
        with open(ub, "wb") as f:
            send_stream(f.write, b, a, version=proto, **kw)
        dest = _fresh(us, f"p{proto}")
        try:
            kernel_receive(ua, dest)
            kernel_receive(ub, dest)
        except RuntimeError as exc:
            problems.append(f"userspace send v{proto}: {exc}")
            continue
        problems += _same(a, dest / "A", f"userspace send v{proto} A")
        problems += _same(b, dest / "B", f"userspace send v{proto} B")

    # 5. send --from-sendshot: the kernel receives the recorded full and the increment
    if sendshots is None:
        return problems
    sd = _fresh(m.dst, f"ss{label}")
    try:
        for ss in sendshots:
            kernel_receive(ss, sd)
    except RuntimeError as exc:
        problems.append(f"sendshot: {exc}")
    else:
        problems += _same(a, sd / "A", "sendshot A", ignore_root_mtime=True)
        problems += _same(b, sd / "B", "sendshot B", ignore_root_mtime=True)
    return problems


@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload(seed: int, mounts: Mounts, tmp_path: Path) -> None:
    problems = check_seed(seed, mounts, tmp_path)
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)


@pytest.mark.parametrize("algo", ["lzo", "zlib"])
def test_random_workload_compressed_with(algo: str, tmp_path: Path) -> None:
    # fstests btrfs/284: its random workload and v2 --compressed-data streams, for every
    # compression btrfs has (zstd above)
    seed = SEEDS[0]
    with _mounts(f"compress-force={algo}") as m:
        problems = check_seed(seed, m, tmp_path)
        # and received with --force-decompress (upstream's second receive)
        dest = _fresh(m.dst, "force-decompress")
        for s in (tmp_path / "v2.A", tmp_path / "v2.B"):
            with open(s, "rb") as f:
                receive(StreamReader(f, source=s.name).events(), dest, force_decompress=True)
        kern = m.dst / f"k{seed}v2"
        problems += _same(kern / "A", dest / "A", "--force-decompress A", holes=True)
        problems += _same(kern / "B", dest / "B", "--force-decompress B", holes=True,
                          ignore_root_mtime=True)
    assert not problems, f"seed {seed}, {algo}:\n" + "\n".join(problems)


def test_directory_backend_keeps_holes_of_a_file_with_an_xattr_block(tmp_path: Path) -> None:
    """Found by the random workloads: an 8 KiB file, 4 KiB of data then a hole, with an
    xattr stored in its own ext4 block (its blocks count then reaches its size): the copy of
    the parent for the incremental receive (``cp -a``: its --sparse=auto takes such a file
    for a dense one) filled the hole; the copy now punches the source's holes again."""
    require_btrfs()
    with ExitStack() as stack:
        src = stack.enter_context(loop_fs("btrfs", size="300M"))
        dst = stack.enter_context(loop_fs("btrfs", size="300M"))
        ext4 = stack.enter_context(loop_fs("ext4", size="1G"))  # (4 KiB blocks)
        vol = src / "vol"
        run("btrfs", "-q", "subvolume", "create", vol)
        with open(vol / "f", "wb") as f:
            f.write(b"x" * 4096)
            f.truncate(8192)
        os.setxattr(vol / "f", "user.a", b"v" * 3000)
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, src / "A")
        (vol / "g").write_bytes(b"new")
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, src / "B")
        full = send(src / "A", tmp_path / "a", proto=2, compressed=True)
        incr = send(src / "B", tmp_path / "b", parent=src / "A", proto=2, compressed=True)
        for s in (full, incr):
            kernel_receive(s, dst)
            _our_receive(s, ext4)
        assert not _same(dst / "B", ext4 / "B", "B", holes=True)
