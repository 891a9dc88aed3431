"""The sendshot store's head cache (``STORE/heads``): a listing reads no record's head that
the cache holds for the file as it is, and a cache that is stale, damaged or lying changes
nothing a send or a listing decides."""

from __future__ import annotations

import json
import os
from pathlib import Path
from time import time_ns

import pytest

from btrdelta.cli import main
from btrdelta.errors import StreamFormatError
from btrdelta.send import store as store_mod
from btrdelta.send.store import SendshotStore, StoredSendshot
from btrdelta.tree.sendshot import SendshotHead, decode_head, encode_head


def _store(tmp_path: Path, rounds: int = 3) -> Path:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    for i in range(rounds):
        (src / f"f{i}").write_bytes(os.urandom(5000 + i))
        assert main(["send", str(src), "-o", str(tmp_path / f"s{i}"), "--record", "--store",
                     str(store), "-q", *(["--from-sendshot", "latest"] if i else [])]) == 0
    return store


def _listed(store: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[StoredSendshot], int]:
    """The listing, and how many heads it read from records."""
    reads = []
    real = store_mod.read_head

    def counted(*args: object, **kwargs: object) -> SendshotHead:
        reads.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "read_head", counted)
    got = SendshotStore(store).records_list()
    monkeypatch.setattr(store_mod, "read_head", real)
    return got, len(reads)


def _truth(store: Path, monkeypatch: pytest.MonkeyPatch) -> list[StoredSendshot]:
    """The listing of every head read from its record (the cache removed first)."""
    (store / "heads").unlink(missing_ok=True)
    got, reads = _listed(store, monkeypatch)
    assert reads == len(got)
    return got


def test_a_listing_reads_no_head_the_cache_holds(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    got, reads = _listed(store, monkeypatch)  # each new record added itself
    assert (len(got), reads) == (3, 0)
    want = _truth(store, monkeypatch)  # (and the cache written again by that listing)
    assert got == want
    assert sorted(s.digest + ".sendshot" for s in want) == sorted(os.listdir(store / "records"))
    assert _listed(store, monkeypatch) == (want, 0)


def test_a_changed_or_new_file_is_read_again(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    want = _truth(store, monkeypatch)
    os.utime(want[0].path, ns=(1, 1))  # another mtime: not the file the cache saw
    assert _listed(store, monkeypatch) == (want, 1)
    assert _listed(store, monkeypatch) == (want, 0)
    os.unlink(want[1].path)  # a deleted record goes from the cache too
    got, reads = _listed(store, monkeypatch)
    assert (got, reads) == ([want[0], want[2]], 0)
    assert len(SendshotStore(store)._heads()) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "not a cache"])
def test_a_damaged_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     damage: str) -> None:
    store = _store(tmp_path)
    want = _truth(store, monkeypatch)
    cache = store / "heads"
    data = bytearray(cache.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        del data[-40:]
    elif damage == "empty":
        data.clear()
    else:
        data[:] = b"x" * 200
    cache.write_bytes(bytes(data))
    assert _listed(store, monkeypatch) == (want, 3)
    assert _listed(store, monkeypatch) == (want, 0)  # (written again)


def test_a_lying_cache_is_caught_when_the_record_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry that matches the file but holds another head (a cache written by something
    else, its checksum right) is what the listing says; the record read whole is checked
    against it: an error naming the record, and the cache is gone."""
    store = _store(tmp_path)
    want = _truth(store, monkeypatch)
    s = SendshotStore(store)
    entries = s._heads()
    newest = want[-1]
    lie = SendshotHead(**{**vars_of(newest.head), "generation": newest.head.generation + 7})
    size, mtime, ino, _head = entries[newest.digest]
    entries[newest.digest] = (size, mtime, ino, encode_head(lie))
    s._write_heads(entries)
    listed = s.records_list()
    assert listed[-1].head == lie
    with pytest.raises(StreamFormatError, match="not the one listed"):
        s.open(listed[-1])
    assert not (store / "heads").exists()
    assert _listed(store, monkeypatch) == (want, 3)


def vars_of(head: SendshotHead) -> dict[str, object]:
    return {name: getattr(head, name) for name in (
        "stream_uuid", "stream_ctransid", "name", "created_ns", "kind", "subvol_uuid",
        "parent", "source", "generation", "seed", "tree_digest")}


def test_encode_head_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for s in _truth(_store(tmp_path), monkeypatch):
        assert decode_head(encode_head(s.head)) == s.head
        assert vars_of(decode_head(encode_head(s.head))) == vars_of(s.head)


def test_a_store_that_cannot_be_written_is_still_listed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    want = _truth(store, monkeypatch)

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    (store / "heads").unlink()
    monkeypatch.setattr(store_mod, "write_atomic", refused)
    assert _listed(store, monkeypatch) == (want, 3)
    assert not (store / "heads").exists()


def test_a_record_dated_past_2262_is_listed_its_head_read_each_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An mtime past the cache's signed 64-bit nanoseconds (2262-04-11: a clock set far
    ahead, a touch -d) is not kept: the listing, ``sendshot list`` and a send's record
    failed ('internal error: argument out of range') instead."""
    store = _store(tmp_path)
    want = _truth(store, monkeypatch)
    os.utime(want[1].path, ns=(0, (1 << 63) + 3600 * 10**9))
    capsys.readouterr()
    assert main(["sendshot", "list", "--store", str(store), "--json"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == [s.digest for s in want]
    assert _listed(store, monkeypatch) == (want, 1)
    assert _listed(store, monkeypatch) == (want, 1)  # (the others from the cache)
    (tmp_path / "src" / "f9").write_bytes(b"new")
    assert main(["send", str(tmp_path / "src"), "-o", str(tmp_path / "s9"), "--record",
                 "--store", str(store), "-q", "--from-sendshot", "latest"]) == 0
    assert _listed(store, monkeypatch)[1] == 1


def test_a_fifo_among_the_records_is_unreadable_not_waited_for(tmp_path: Path) -> None:
    """A FIFO named as the newest record made ``sendshot list`` and ``send --from-sendshot
    latest`` (the listing, and the read-ahead of ``python -m btrdelta``) wait forever in its
    open: it is listed as one that cannot be read, and the send takes the newest record."""
    import subprocess
    import sys

    store = _store(tmp_path, rounds=2)
    fifo = store / "records" / ("f" * 64 + ".sendshot")
    os.mkfifo(fifo)
    later = time_ns() + 3600 * 10**9
    os.utime(fifo, ns=(later, later))
    cli = [sys.executable, "-m", "btrdelta"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    got = subprocess.run([*cli, "sendshot", "list", "--store", str(store)], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert got.returncode == 0, got.stderr
    assert f"{'f' * 16}  cannot be read (not a regular file)" in got.stdout, got.stdout
    out = tmp_path / "s.stream"
    got = subprocess.run([*cli, "send", str(tmp_path / "src"), "-o", str(out), "--store",
                          str(store), "--from-sendshot", "latest", "-q"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert got.returncode == 0, got.stderr
    assert out.stat().st_size > 0


def test_a_base_and_its_patch_named_together_are_both_deleted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sendshot delete BASE PATCH`` was refused ("the base of patch record(s)"), though
    the patch was named too: the patch goes first. A mistyped id among them deletes none."""
    import subprocess

    from tests.conftest import btrfs_loop

    store = tmp_path / "store"
    with btrfs_loop() as mnt:
        src = mnt / "live"
        subprocess.run(["btrfs", "subvolume", "create", str(src)], check=True,
                       capture_output=True)
        for i in range(100):
            (src / f"f{i}").write_bytes(os.urandom(100))
        for i in range(2):
            (src / "f0").write_bytes(os.urandom(100))
            assert main(["send", str(src), "-o", str(tmp_path / f"s{i}"), "--record",
                         "--store", str(store), "-q",
                         *(["--from-sendshot", "latest"] if i else [])]) == 0
    base, patch = sorted(SendshotStore(store).records_list(), key=lambda s: s.head.base or "")
    assert patch.head.base == base.digest  # (the second send wrote a patch record)
    capsys.readouterr()
    assert main(["sendshot", "delete", "--store", str(store), base.digest[:16], "nosuch"]) == 6
    assert len(SendshotStore(store).records_list()) == 2
    assert main(["sendshot", "delete", "--store", str(store), base.digest[:16],
                 patch.digest[:16]]) == 0
    assert SendshotStore(store).records_list() == []
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[1][:16] for ln in out] == [patch.digest[:16], base.digest[:16]], out
