"""``frozen(..., meanwhile=f)`` (send/live.py): ``f`` runs once, in the caller's thread,
while another thread makes the temporary snapshot of a live subvolume (the CLI imports the
send's modules meanwhile); an error of ``f`` (an exception, Ctrl-C, an ``OSError``) is
raised as it is and the snapshot made beside it is deleted; where no snapshot is made
(read-only subvolume, ``snapshot=False``, a plain directory) ``f`` runs at once. Oracle:
``btrfs subvolume list``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from btrdelta.send.live import frozen
from tests.send.conftest import run


def _subvolumes(mnt: Path) -> list[str]:
    return [ln.split()[-1] for ln in run("btrfs", "subvolume", "list", mnt).splitlines()]


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

    def meanwhile() -> None:
        seen.append([t.name for t in threading.enumerate()])
        looked.set()

    with frozen(live, meanwhile=meanwhile) as fz:
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

    def meanwhile() -> None:
        raise exc("meanwhile")

    with pytest.raises(exc, match="meanwhile"), frozen(live, meanwhile=meanwhile):
        pytest.fail("the tree was given")
    assert _subvolumes(snd) == ["live"]


def test_meanwhile_runs_at_once_where_no_snapshot_is_made(two_fs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    snd, _rcv = two_fs
    live = _live(snd)
    run("btrfs", "subvolume", "snapshot", "-r", live, snd / "ro")
    calls: list[str] = []
    for source, snapshot in ((snd / "ro", True), (live, False), (tmp_path, True)):
        with frozen(source, snapshot=snapshot, meanwhile=lambda: calls.append("x")) as fz:
            assert not fz.temporary
            assert fz.path == os.fsencode(source)
    assert calls == ["x"] * 3
    assert sorted(_subvolumes(snd)) == ["live", "ro"]
