"""Kernel streams beyond one A -> B pair, through every engine, the kernel as the oracle:

* a chain of six snapshots (five incrementals) whose streams ``btrfs receive`` takes, and
  then the chain the kernel sends *from those received snapshots* (each stream's parent
  was itself received, found by its received UUID: a cascade, as upstream's btrfs/
  send tests relay snapshots between filesystems);
* a snapshot sent with ``-c`` clone sources from two other subvolumes' snapshots (its
  files reflinked from both), full and incremental; btrdelta's sends of it with ``-c``
  too, and ``send -p --parent-uuid btrfs -c ...`` received after the kernel's streams
  (which named the clone sources by our own UUIDs, not btrfs's: refused before).

For each stream: ``btrdelta dump`` == ``btrfs receive --dump``; our receive into btrfs, ext4
and tmpfs gives ``btrfs receive``'s trees (tree-sum), the kernel's received trees the
sources'; for each incremental, ``delta make`` + ``delta expand`` gives it bit for bit and
the delta received after its parent gives the kernel's tree; btrdelta's userspace send of
the chain, its ``send -p --parent-uuid btrfs`` of each received pair (received next to the
kernel's received parent) and ``send --record`` / ``--from-sendshot`` at each step of it
are received by ``btrfs receive`` as the snapshots.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.fs.btrfs import subvol_info
from btrdelta.send import send_stream
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Clone
from btrdelta.testing.loopfs import loop_fs, run
from btrdelta.testing.scenarios import kernel_receive
from btrdelta.testing.scenarios import send as kernel_send
from tests.conftest import btrfs_loop, progs_dump
from tests.matrix.test_matrix import _compare, _our_dump, _our_receive, _tmpfs, delta_round_trip

pytestmark = [pytest.mark.btrfs, pytest.mark.timeout(1800)]

#: the chain's steps, run in turn in one live subvolume, a read-only snapshot after each:
#: a tree made, its ancestors removed and made again, a file turned into a directory that
#: takes another's subtree, links and truncations and an xattr removed, a directory moved
#: with a FIFO made beside it, most of it removed
STEPS = [
    "mkdir -p a/b/c d; echo 1 > a/b/c/f; head -c 300K /dev/urandom > big; ln a/b/c/f d/link;"
    " setfattr -n user.x -v 1 d",
    "mv a/b/c c; rm -r a; mkdir a; echo 2 >> c/f; xfs_io -c 'reflink big 0 1M 128K' big",
    "rm big; mkdir big; mv c big/c; chown 3:4 d;"
    " xfs_io -f -c 'falloc -k 0 1M' -c 'pwrite -S 0x61 64K 4K' big/p",
    "mv big/c/f c2; ln c2 big/c/f2; truncate -s 100K big/p; setfattr -x user.x d; ln -s c2 s",
    "mv d a/d; mkfifo a/fifo; rm c2; mv big/c big/c-renamed; printf new > s2",
    "rm -r big; mkdir -p big/x; mv a/d/link big/x/link; echo end > a/end",
]


@dataclass
class Roots:
    src: Path
    kernel: Path
    kernel2: Path
    kernel3: Path
    btrfs: Path
    ext4: Path
    tmpfs: Path


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roots]:
    with ExitStack() as stack:
        src = stack.enter_context(btrfs_loop("1G", options="compress=zstd"))
        kernel, kernel2, kernel3, btrfs = (stack.enter_context(btrfs_loop("1G")) for _ in "abcd")
        ext4 = stack.enter_context(loop_fs("ext4", size="1G"))
        tmpfs = stack.enter_context(_tmpfs(tmp_path_factory.mktemp("chains") / "tmpfs"))
        yield Roots(src, kernel, kernel2, kernel3, btrfs, ext4, tmpfs)


def _bash(script: str, cwd: Path) -> None:
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, check=True,
                   capture_output=True)


def _same(what: str, want: Path, got: Path, *, holes: bool = False, props: bool = True,
          root_mtime: bool = False) -> list[str]:
    return _compare(what, want, got, holes=holes, root_mtime=root_mtime, props=props)


def _receive_everywhere(streams: list[Path], kernel: Path, ours: dict[str, Path]) -> list[str]:
    """Each stream in turn: our dump against btrfs-progs', the kernel's receive into
    ``kernel``, ours into every directory of ``ours``."""
    problems = [f"dump of {s.name} differs from btrfs receive --dump"
                for s in streams if _our_dump(s) != progs_dump(s).stdout]
    for s in streams:
        kernel_receive(s, kernel)
        for key, dest in ours.items():
            try:
                _our_receive(s, dest)
            except Exception as exc:  # reported with the stream and receiver
                problems.append(f"{key} receive of {s.name}: {type(exc).__name__}: {exc}")
    return problems


def _received_alike(names: list[str], kernel: Path, ours: dict[str, Path],
                    holes: bool) -> list[str]:
    return [p for name in names for key, dest in ours.items()
            for p in _same(f"{key} {name}", kernel / name, dest / name, holes=holes,
                           props=key == "btrfs")]


def _delta_round_trip(stream: Path, old: Path, out: Path) -> tuple[Path, list[str]]:
    """``delta make`` of ``stream`` against ``old``, expanded back: the delta's file and
    the problems."""
    if delta_round_trip(stream, old, out):
        return out, []
    return out, [f"delta make + expand of {stream.name} is not the stream"]


def _cli_receive(stream: Path, dest: Path) -> list[str]:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["receive", "-q", "-f", str(stream), str(dest)])
    return [f"receive of {stream.name} into {dest}: exit {code}: {err.getvalue().strip()}"
            ] if code else []


def subvol_info_of(path: Path) -> object:
    """The UUID of the subvolume at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return subvol_info(fd).uuid
    finally:
        os.close(fd)


def _uuids(stream: Path) -> tuple[str, str]:
    """The stream's subvolume UUID and its parent's (clone UUID; "" for a full stream)."""
    first = progs_dump(stream).stdout.decode(errors="replace").splitlines()[0]
    uuid = re.search(r" uuid=(\S+)", first)
    parent = re.search(r"parent_uuid=(\S+)", first)
    assert uuid is not None, first
    return uuid.group(1), parent.group(1) if parent else ""


def test_chain_of_incrementals_and_its_relay(roots: Roots, tmp_path: Path) -> None:
    vol = roots.src / "vol"
    run("btrfs", "-q", "subvolume", "create", vol)
    store, shots = tmp_path / "store", tmp_path / "shots"
    shots.mkdir()
    names, snaps, recorded = [], [], []
    for i, step in enumerate(STEPS):
        _bash(step, vol)
        run("btrfs", "filesystem", "sync", roots.src)
        names.append(f"S{i}")
        snaps.append(roots.src / names[-1])
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, snaps[-1])
        # the live subvolume at the same point, recorded; from the record before
        recorded.append(shots / f"shot{i}")
        frm = ["--from-sendshot", "latest"] if i else []
        assert main(["send", "-q", "--store", str(store), str(vol), "-o", str(recorded[-1]),
                     *frm, "--record", "--name", names[-1]]) == 0
    out1, out2 = tmp_path / "level1", tmp_path / "level2"
    out1.mkdir()
    out2.mkdir()
    level1 = [kernel_send(s, out1 / s.name, parent=p, proto=2, compressed=True)
              for s, p in zip(snaps, [None, *snaps[:-1]], strict=True)]
    problems = []
    ours = {}
    for key in ("btrfs", "ext4", "tmpfs"):
        ours[key] = getattr(roots, key) / "level1"
        ours[key].mkdir()
    problems += _receive_everywhere(level1, roots.kernel, ours)
    problems += [p for n, s in zip(names, snaps, strict=True)
                 for p in _same(f"kernel {n} vs source", s, roots.kernel / n)]
    problems += _received_alike(names, roots.kernel, ours, holes=True)
    # the relay: the kernel sends the chain again from the snapshots it received
    received = [roots.kernel / n for n in names]
    level2 = [kernel_send(s, out2 / s.name, parent=p)
              for s, p in zip(received, [None, *received[:-1]], strict=True)]
    for i in range(1, len(names)):
        # a parent found by its received UUID: level 2's parent is level 1's subvolume
        assert _uuids(level2[i])[1] == _uuids(level1[i - 1])[0]
    # ... and from the snapshots our receive made on btrfs (their received UUIDs ours)
    relay = roots.kernel3 / "relay-of-ours"
    relay.mkdir()
    mine = [roots.btrfs / "level1" / n for n in names]
    for s, p in zip(mine, [None, *mine[:-1]], strict=True):
        kernel_receive(kernel_send(s, out2 / f"ours-{s.name}", parent=p), relay)
    problems += [p for n, s in zip(names, snaps, strict=True)
                 for p in _same(f"kernel relay of our {n}", s, relay / n)]
    for key in ours:
        ours[key] = getattr(roots, key) / "level2"
        ours[key].mkdir()
    problems += _receive_everywhere(level2, roots.kernel2, ours)
    problems += _received_alike(names, roots.kernel2, ours, holes=False)
    # each relayed incremental as a delta against the received parent, applied in a chain
    chain = roots.ext4 / "deltas"
    chain.mkdir()
    _our_receive(level2[0], chain)
    for i in range(1, len(names)):
        delta, trouble = _delta_round_trip(level2[i], received[i - 1],
                                           out2 / f"{names[i]}.delta")
        problems += trouble + _cli_receive(delta, chain)
    problems += [p for n in names
                 for p in _same(f"delta chain {n}", roots.kernel2 / n, chain / n, props=False)]
    # btrdelta's send -p of each received pair naming the parent as btrfs does (its received
    # UUID), received by the kernel next to the kernel's received parent
    mixed = roots.kernel3 / "mixed"
    mixed.mkdir()
    for i, name in enumerate(names):
        if i:
            ours_i = tmp_path / f"{name}.parent-uuid"
            assert main(["send", "-q", "-p", str(received[i - 1]), "--parent-uuid", "btrfs",
                         "--name", f"{name}-ours", str(received[i]), "-o", str(ours_i)]) == 0
            kernel_receive(ours_i, mixed)
            problems += _same(f"send -p {name} --parent-uuid btrfs", snaps[i],
                              mixed / f"{name}-ours")
        kernel_receive(level1[i], mixed)
    # btrdelta's userspace send of the received chain, and the sendshots of the live one
    for label, streams in (("our-send", _our_sends(received, tmp_path)),
                           ("sendshots", recorded)):
        dest = roots.kernel2 / label
        dest.mkdir()
        for s in streams:
            kernel_receive(s, dest)
        problems += [p for n, s in zip(names, snaps, strict=True)
                     for p in _same(f"{label} {n}, btrfs receive", s, dest / n)]
    assert not problems, "\n".join(problems)


def _our_sends(snaps: list[Path], out: Path) -> list[Path]:
    paths = []
    for s, p in zip(snaps, [None, *snaps[:-1]], strict=True):
        paths.append(out / f"our-{s.name}")
        with open(paths[-1], "wb") as f:
            send_stream(f.write, s, p)
    return paths


def test_clone_sources_from_two_subvolumes(roots: Roots, tmp_path: Path) -> None:
    src = roots.src
    for name, script in (("X", "head -c 512K /dev/urandom > x1; seq 1 50000 > x2"),
                         ("Y", "head -c 256K /dev/urandom > y1; xfs_io -f -c"
                               " 'pwrite -S 0x79 0 192K' y2")):
        run("btrfs", "-q", "subvolume", "create", src / f"live{name}")
        _bash(script, src / f"live{name}")
        run("btrfs", "filesystem", "sync", roots.src)
        run("btrfs", "-q", "subvolume", "snapshot", "-r", src / f"live{name}", src / name)
    vol = src / "clones"
    run("btrfs", "-q", "subvolume", "create", vol)
    _bash("cp --reflink=always ../X/x1 a; xfs_io -f -c 'reflink ../Y/y1 0 0 128K'"
          " -c 'reflink ../X/x2 0 128K 64K' b; echo own > c; cp --reflink=always ../Y/y2 g", vol)
    run("btrfs", "filesystem", "sync", src)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, src / "CA")
    _bash("xfs_io -f -c 'reflink ../Y/y2 0 0 192K' -c 'reflink ../X/x1 64K 256K 128K' d;"
          " xfs_io -c 'reflink ../Y/y1 128K 0 128K' a; cp --reflink=always ../X/x2 e;"
          " mkdir dir; mv b dir/b; rm c", vol)
    run("btrfs", "filesystem", "sync", src)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, src / "CB")
    clones = ("-c", str(src / "X"), "-c", str(src / "Y"))
    problems = []
    for proto in (1, 2):
        out = tmp_path / f"v{proto}"
        out.mkdir()
        streams = [kernel_send(src / n, out / n, proto=proto, compressed=proto == 2)
                   for n in ("X", "Y")]
        # btrfs-progs finds no parent for a full stream with -c: CA from X, Y its clone source
        streams.append(kernel_send(src / "CA", out / "CA", parent=src / "X", proto=proto,
                                   compressed=proto == 2, extra=clones[2:]))
        streams.append(kernel_send(src / "CB", out / "CB", parent=src / "CA", proto=proto,
                                   compressed=proto == 2, extra=clones))
        # the clones come from both sources, in the full stream and the incremental
        # not vacuous: CB's clones come from both X and Y (btrfs receive --dump names every
        # clone source by the received subvolume's path, so their UUIDs tell)
        sources = {str(subvol_info_of(src / n)) for n in ("X", "Y")}
        recs = list(StreamReader(io.BytesIO(streams[3].read_bytes())))
        assert {str(r.clone_uuid) for r in recs if isinstance(r, Clone)} >= sources
        kernel = roots.kernel / f"clones-v{proto}"
        kernel.mkdir()
        ours = {}
        for key in ("btrfs", "ext4", "tmpfs"):
            ours[key] = getattr(roots, key) / f"clones-v{proto}"
            ours[key].mkdir()
        problems += _receive_everywhere(streams, kernel, ours)
        names = ["X", "Y", "CA", "CB"]
        problems += [p for n in names for p in _same(f"v{proto} kernel {n}", src / n, kernel / n)]
        problems += _received_alike(names, kernel, ours, holes=proto == 2)
        # the incremental as a delta, applied after X, Y and CA
        delta, trouble = _delta_round_trip(streams[3], src / "CA", out / "CB.delta")
        problems += trouble
        dest = roots.ext4 / f"clones-delta-v{proto}"
        dest.mkdir()
        for s in streams[:3]:
            _our_receive(s, dest)
        problems += _cli_receive(delta, dest)
        problems += _same(f"v{proto} delta applied", kernel / "CB", dest / "CB", holes=proto == 2,
                          props=False)
    # btrdelta's send of CB from CA and X, Y, all named as btrfs send names them
    # (--parent-uuid btrfs), received by the kernel after its own streams of X, Y and CA
    named = tmp_path / "CB.parent-uuid"
    assert main(["send", "-q", "-p", str(src / "CA"), "--parent-uuid", "btrfs", "-c",
                 str(src / "X"), "-c", str(src / "Y"), str(src / "CB"), "-o", str(named)]) == 0
    dest = roots.kernel / "clones-parent-uuid"
    dest.mkdir()
    for s in (*streams[:3], named):
        kernel_receive(s, dest)
    problems += _same("send -p CA --parent-uuid btrfs -c X -c Y", src / "CB", dest / "CB")
    # btrdelta's sends of the same: X and Y full, CA full with X and Y as clone sources, CB
    # from CA with them (which name each source by the UUID our full stream of it names),
    # received by the kernel
    dest = roots.kernel / "our-send-clones"
    dest.mkdir()
    for name, parent, sources in (("X", None, ()), ("Y", None, ()), ("CA", None, "XY"),
                                  ("CB", "CA", "XY")):
        ours_s = tmp_path / f"our-{name}"
        with open(ours_s, "wb") as f:
            send_stream(f.write, src / name, parent and src / parent,
                        clone_sources=[src / c for c in sources])
        recs = list(StreamReader(io.BytesIO(ours_s.read_bytes())))
        if sources:  # not vacuous: whole files cloned from the sources (CA: from both)
            head = recs[0]
            own = {getattr(head, "uuid", None), getattr(head, "clone_uuid", None)}
            assert len({r.clone_uuid for r in recs if isinstance(r, Clone)} - own) >= (
                2 if name == "CA" else 1), name
        kernel_receive(ours_s, dest)
        problems += _same(f"our send of {name}", src / name, dest / name)
    assert not problems, "\n".join(problems)
