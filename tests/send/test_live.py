"""``frozen(..., meanwhile=f)`` (send/live.py): ``f`` runs once, in the caller's thread,
while another thread makes the temporary snapshot of a live subvolume, given the snapshot's
lineage (the CLI imports the send's modules and loads the base record meanwhile); an error
of ``f`` (an exception, Ctrl-C, an ``OSError``) is raised as it is and the snapshot made
beside it is deleted; where no snapshot is made (read-only subvolume, ``snapshot=False``, a
plain directory) ``f`` runs at once, given None. The CLI's live send loads its base record
once, while the snapshot is made, and sends what the kernel receives as the tree. Oracles:
``btrfs subvolume list``, ``btrfs subvolume show``, ``btrfs receive`` and tree-sum."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zstandard

from btrdelta.send.live import frozen
from tests.send.conftest import run


def _subvolumes(mnt: Path) -> list[str]:
    return [ln.split()[-1] for ln in run("btrfs", "subvolume", "list", mnt).splitlines()]


def _uuid_of(subvolume: Path) -> str:
    return next(ln.split()[-1] for ln in run("btrfs", "subvolume", "show", subvolume
                                             ).splitlines() if ln.strip().startswith("UUID:"))


def _live(mnt: Path) -> Path:
    live = mnt / "live"
    run("btrfs", "subvolume", "create", live)
    (live / "f").write_bytes(os.urandom(10_000))
    return live


def test_meanwhile_runs_while_the_snapshot_is_made(
    two_fs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from btrdelta.send import live as live_mod

    snd, _rcv = two_fs
    live = _live(snd)
    seen: list[list[str]] = []
    looked = threading.Event()
    made_in: list[str] = []
    real = live_mod.create_snapshot

    def held(*args: object, **kw: object) -> object:  # (the snapshot waits for the look:
        made_in.append(threading.current_thread().name)  # under load its thread ended first)
        assert looked.wait(30)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(live_mod, "create_snapshot", held)

    lineages: list[object] = []

    def meanwhile(lineage: object) -> None:
        seen.append([t.name for t in threading.enumerate()])
        lineages.append(lineage)
        looked.set()

    with frozen(live, meanwhile=meanwhile) as fz:
        assert lineages == [fz.lineage]
        assert str(fz.lineage) == _uuid_of(live)  # (btrfs-progs' word for the subvolume)
        assert fz.temporary
        assert fz.info is not None
        assert fz.info.readonly
        assert (Path(os.fsdecode(fz.path)) / "f").read_bytes() == (live / "f").read_bytes()
        (snapshot,) = [n for n in _subvolumes(snd) if n != "live"]
        assert snapshot.startswith(".btrdelta-send-")
    assert len(seen) == 1
    assert made_in == ["btrdelta-snapshot"]
    assert "btrdelta-snapshot" in seen[0]  # (its thread was making it then)
    assert _subvolumes(snd) == ["live"]


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt, PermissionError])
def test_an_error_meanwhile_deletes_the_snapshot(two_fs: tuple[Path, Path],
                                                exc: type[BaseException]) -> None:
    snd, _rcv = two_fs
    live = _live(snd)

    def meanwhile(_lineage: object) -> None:
        raise exc("meanwhile")

    with pytest.raises(exc, match="meanwhile"), frozen(live, meanwhile=meanwhile):
        pytest.fail("the tree was given")
    assert _subvolumes(snd) == ["live"]


def test_meanwhile_runs_at_once_where_no_snapshot_is_made(two_fs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    snd, _rcv = two_fs
    live = _live(snd)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "ro")
    calls: list[object] = []
    for source, snapshot in ((snd / "ro", True), (live, False), (tmp_path, True)):
        with frozen(source, snapshot=snapshot, meanwhile=calls.append) as fz:
            assert not fz.temporary
            assert fz.path == os.fsencode(source)
    assert calls == [None] * 3
    assert sorted(_subvolumes(snd)) == ["live", "ro"]


def test_a_live_send_loads_its_base_while_the_snapshot_is_made(
        two_fs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``send LIVE --from-sendshot latest`` reads its base record once, while the snapshot
    is made (before the send itself starts); the snapshot's thread, once it made it, sweeps
    the changes since that base; the kernel's ``btrfs receive`` of each stream is the live
    tree. A damaged newest record passed over meanwhile is still said, and the older base
    it fell back to received (swept again from its own generation)."""
    import json

    from btrdelta.cli import main
    from btrdelta.send import live as live_mod
    from btrdelta.send import sendshot
    from btrdelta.tree.treesum import tree_sum

    snd, rcv = two_fs
    live = _live(snd)
    store = tmp_path / "store"
    for i in range(1500):  # (a record of several zstd blocks: a torn one's head still reads)
        (live / f"n{i}").write_bytes(os.urandom(40))
    calls: list[str] = []
    real_load, real_send = sendshot.load_base, sendshot.send_with_sendshots

    loaded = threading.Event()
    real_snapshot, real_sweep = live_mod.create_snapshot, sendshot.changed_inodes
    swept_in: list[str] = []

    def load_base(*args: object, **kw: object) -> object:
        calls.append("load")
        try:
            return real_load(*args, **kw)  # type: ignore[arg-type]
        finally:
            loaded.set()

    def create_snapshot(*args: object, **kw: object) -> object:
        # (held until the base is loaded: on a quiet machine the snapshot is often made
        # before the send's modules are imported, and the send then sweeps itself)
        assert loaded.wait(30)
        return real_snapshot(*args, **kw)  # type: ignore[arg-type]

    def changed_inodes(*args: object, **kw: object) -> object:
        swept_in.append(threading.current_thread().name)
        return real_sweep(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(live_mod, "create_snapshot", create_snapshot)
    monkeypatch.setattr(sendshot, "changed_inodes", changed_inodes)

    def send_with_sendshots(*args: object, **kw: object) -> object:
        calls.append("send")
        return real_send(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sendshot, "load_base", load_base)
    monkeypatch.setattr(sendshot, "send_with_sendshots", send_with_sendshots)

    def send(i: int) -> tuple[dict[str, object], str]:
        (live / "f").write_bytes(os.urandom(10_000 + i))
        capsys.readouterr()
        calls.clear()
        swept_in.clear()
        loaded.clear()
        if not i:
            loaded.set()  # (a full send loads no base)
        assert main(["send", str(live), "-o", str(tmp_path / f"s{i}"), "--record", "--store",
                     str(store), "--name", f"live.{i}", "--json",
                     *(["--from-sendshot", "latest"] if i else [])]) == 0
        got = capsys.readouterr()
        assert calls == (["load", "send"] if i else ["send"])
        assert swept_in[:1] == (["btrdelta-snapshot"] if i else []), swept_in
        return json.loads(got.out), got.err

    def received(i: int) -> None:
        run("btrfs", "receive", "-f", tmp_path / f"s{i}", rcv)
        assert tree_sum(rcv / f"live.{i}") == tree_sum(live)

    r0 = send(0)[0]["sendshot"]
    received(0)
    r1 = send(1)[0]["sendshot"]
    received(1)
    f1 = store / "records" / f"{r1}.sendshot"
    # damaged after its head (its END's CRC32C): the head reads, the record does not (a
    # truncation cut a small patch record's one zstd block, its head with it)
    data = f1.read_bytes()
    body = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(data[22:]))
    body[-1] ^= 1
    f1.write_bytes(data[:22] + zstandard.ZstdCompressor().compress(bytes(body)))
    got, err = send(2)
    assert got["from_sendshot"] == r0
    assert f"sendshot {str(r1)[:12]} cannot be read" in err
    assert swept_in == ["btrdelta-snapshot", "MainThread"]  # (since r1's, then r0's)
    received(2)
    assert _subvolumes(snd) == ["live"]
