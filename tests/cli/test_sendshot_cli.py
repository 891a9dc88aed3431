"""`btrdelta sendshot list|show|delete|prune` on records made by `send --record` of plain
directories. Oracles: the stream UUIDs `btrfs receive --dump` (btrfs-progs) reads from each
stream's header, the record files in the store, the source tree's files (os.walk)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import btrdelta
from btrdelta.cli import main
from btrdelta.cli._common import human_bytes
from btrdelta.send.store import SendshotStore
from tests.jsondoc import checked


def _json(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> Any:
    """``main(["sendshot", *args])``'s JSON, its keys checked (docs/cli-json.md)."""
    capsys.readouterr()
    assert main(["sendshot", *args]) == 0
    return checked(command, json.loads(capsys.readouterr().out))


def _dumped_uuid(stream: Path) -> str:
    """The UUID in a stream's first record, as btrfs-progs reads it."""
    out = subprocess.run(["btrfs", "receive", "--dump", "-f", str(stream)], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"uuid=([0-9a-f-]{36})", out.splitlines()[0])
    assert m is not None, out.splitlines()[0]
    return m.group(1)


def _records(store: Path) -> set[str]:
    return {n.split(".")[0] for n in os.listdir(store / "records")}


def test_list_show_delete_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    st = ["--store", str(store), "--json"]
    src, other = tmp_path / "src", tmp_path / "other"
    (src / "d").mkdir(parents=True)
    other.mkdir()
    (other / "x").write_bytes(b"x" * 5000)
    streams = []
    for i in range(4):
        (src / "d" / f"f{i}").write_bytes(os.urandom(5000 + i))
        out = tmp_path / f"s{i}"
        more = ["--from-sendshot", "latest"] if i else []
        named = ["--name", f"src.{i}"] if i == 3 else []
        capsys.readouterr()
        assert main(["send", str(src), "-o", str(out), "--record", "--store", str(store),
                     *more, *named]) == 0
        # an increment named like its base (which a receiver holds under that name) is
        # told so; a named one is not
        note = "names its subvolume 'src' like its base does" in capsys.readouterr().err
        assert note == (i in (1, 2)), i
        streams.append(out)
    assert main(["send", str(other), "-o", str(tmp_path / "o0"), "--record", "--store",
                 str(store)]) == 0

    listed = _json(capsys, "sendshot list", *st, "list")
    # the store and --json after the action too, as `send --store` spells it
    assert _json(capsys, "sendshot list", "list", *st) == listed
    assert _json(capsys, "sendshot list", "--json", "list", "--store", str(store)) == listed
    ids = [r["id"] for r in listed]
    assert set(ids) == _records(store)
    mine = [r for r in listed if r["source"] == str(src)]
    assert [r["stream_uuid"] for r in mine] == [_dumped_uuid(s) for s in streams]
    assert [r["parent"] for r in mine] == [None] + [r["id"] for r in mine[:-1]]
    for r in listed:
        assert r["bytes"] == (store / "records").joinpath(
            next(n for n in os.listdir(store / "records") if n.startswith(r["id"]))
        ).stat().st_size

    shown = _json(capsys, "sendshot show", *st, "show", mine[-1]["id"][:10])
    files = [Path(d, n) for d, _s, ns in os.walk(src) for n in ns]
    assert shown["id"] == mine[-1]["id"]
    assert shown["files"] == len(files)
    assert shown["data_bytes"] == sum(f.stat().st_size for f in files)
    assert shown["blocks"] == 2 * len(files)  # two 4 KiB blocks each

    # a receiver's cursor holds round 1: delete refuses, prune keeps it
    SendshotStore(store).edit_cursor("nas", lambda _: (mine[1]["id"], {}))
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "delete", mine[1]["id"]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "held by receiver(s) nas" in err
    listed = _json(capsys, "sendshot list", *st, "list")
    assert [r["held_by"] for r in listed if r["id"] == mine[1]["id"]] == [["nas"]]
    # without --json: a summary first (as `repo ls`), then a line per record, oldest first
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    total = sum(r["bytes"] for r in listed)
    assert head == (f"{len(listed)} sendshots, {human_bytes(total)}; 1 receiver cursor; "
                    f"store {store}")
    assert [row.split()[0] for row in rows] == [r["id"][:16] for r in listed]
    assert rows[[r["id"] for r in listed].index(mine[1]["id"])].endswith("held by nas")

    dry = _json(capsys, "sendshot prune", *st, "prune", "--keep", "1", "--dry-run")
    assert dry == {"deleted": [mine[0]["id"], mine[2]["id"]], "dry_run": True,
                   "leftovers": []}
    assert set(ids) == _records(store)
    pruned = _json(capsys, "sendshot prune", *st, "prune", "--keep", "1")
    assert pruned["deleted"] == dry["deleted"]
    assert _records(store) == {mine[1]["id"], mine[3]["id"], *(set(ids) - {r["id"] for r in mine})}

    # the next incremental is against the newest, which prune never deletes
    assert main(["send", str(src), "-o", str(tmp_path / "s4"), "--record", "--store",
                 str(store), "--from-sendshot", "latest"]) == 0
    newest = _json(capsys, "sendshot show", *st, "show", "latest")
    assert newest["parent"] == mine[3]["id"]

    # a grid of one hour keeps the newest of each source (and what is held)
    gone = _json(capsys, "sendshot prune", *st, "prune", "--grid", "1h:24")
    assert gone["deleted"] == [mine[3]["id"]]
    deleted = _json(capsys, "sendshot delete", *st, "delete", "--force", mine[1]["id"])
    assert deleted == {"deleted": [mine[1]["id"]]}
    assert len(_records(store)) == 2

    # mistakes: one line, the error's exit code; a rule missing or not understood is a
    # usage error (it was exit 1, and an empty --grid or a negative --keep was taken)
    for args, code in ((["prune"], 2), (["prune", "--grid", "1x:3"], 2),
                       (["prune", "--grid", ""], 2), (["prune", "--keep", "-1"], 2),
                       (["show", "0000"], 6)):
        capsys.readouterr()
        try:
            rc = main(["sendshot", "--store", str(store), *args])
        except SystemExit as exc:  # argparse's
            rc = exc.code
        assert rc == code, args
        err = capsys.readouterr().err
        # named by its action, as every other command's error (it said 'btrdelta sendshot')
        assert err.startswith(f"btrdelta sendshot {args[0]}: error: "), err
        assert err.count("\n") == 1
    assert len(_records(store)) == 2


def test_show_and_delete_speak_to_a_person_without_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --json, ``show`` gives the creation time as ``list`` does (it printed the
    epoch seconds, 'held_by: []' and an empty tree digest) and ``delete`` says what it
    deleted (it printed nothing)."""
    store, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    assert main(["send", str(src), "-o", str(tmp_path / "s"), "--record", "--store",
                 str(store)]) == 0
    listed = _json(capsys, "sendshot list", "--store", str(store), "--json", "list")
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(listed[0]["created"]))
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "show", "latest"]) == 0
    shown = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert shown["created"] == created
    assert shown["held_by"] == "no receiver's cursor"
    assert "[]" not in shown.values()
    assert all(shown.values())
    assert main(["sendshot", "--store", str(store), "delete", listed[0]["id"][:12]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deleted {listed[0]['id'][:16]}  {created}"), out
    assert out.count("\n") == 1
    assert not _records(store)


def test_a_missing_or_damaged_newest_record_is_absent_to_latest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``send --record`` does not wait for the disk (docs/formats/sendshot.md §4): after a
    power cut its newest record may be missing (the name lost, a temporary file left) or
    damaged (named before its bytes were on the disk). ``--from-sendshot latest`` then sends
    against the newest record that reads whole, with a warning, and a receiver that holds
    that base applies the stream (oracle: tree-sum of the source); a damaged record named
    explicitly, or one whose content is not what its name says, is a one-line error."""
    from btrdelta.tree.treesum import tree_sum

    src, rcv, store = tmp_path / "src", tmp_path / "rcv", tmp_path / "store"
    (src / "d").mkdir(parents=True)
    rcv.mkdir()
    for i in range(3):
        (src / "d" / f"f{i}").write_bytes(os.urandom(9000 + i))
    for i in range(1500):  # a record of several zstd blocks: a torn one's head still reads
        (src / f"n{i}").write_bytes(os.urandom(40))

    warned: list[str] = []

    def send(i: int) -> dict[str, Any]:
        (src / "d" / "f0").write_bytes(os.urandom(9000 + i))
        capsys.readouterr()
        assert main(["send", str(src), "-o", str(tmp_path / f"s{i}"), "--record", "--store",
                     str(store), "--name", f"src.{i}", "--json",
                     *(["--from-sendshot", "latest"] if i else [])]) == 0
        got = capsys.readouterr()
        warned.append(got.err)
        return dict(json.loads(got.out))

    def received(i: int) -> bool:
        assert main(["receive", "-f", str(tmp_path / f"s{i}"), str(rcv)]) == 0
        return tree_sum(rcv / f"src.{i}") == tree_sum(src)

    r0 = send(0)["sendshot"]
    assert received(0)
    r1 = send(1)["sendshot"]  # never received; then torn (its head still reads)
    f1 = store / "records" / f"{r1}.sendshot"
    os.truncate(f1, f1.stat().st_size * 2 // 3)
    assert SendshotStore(store).records_list()[-1].digest == r1
    got = send(2)
    assert got["from_sendshot"] == r0
    assert f"sendshot {r1[:12]} cannot be read" in warned[-1]
    assert received(2)

    # the newest record missing, its temporary file left: the newest readable one
    r2 = got["sendshot"]
    os.replace(store / "records" / f"{r2}.sendshot", store / "records" / ".tmp-1-0badf00d")
    got = send(3)
    assert got["from_sendshot"] == r0
    assert received(3)

    # named: the damaged one, and a record under another's name
    (store / "records" / ("ab" * 32 + ".sendshot")).write_bytes(
        (store / "records" / f"{r0}.sendshot").read_bytes())
    for ident, says in ((r1, "truncated"), ("ab" * 32, "its name says")):
        capsys.readouterr()
        assert main(["send", str(src), "-o", str(tmp_path / "sx"), "--store", str(store),
                     "--from-sendshot", ident]) == 3
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith("btrdelta send: error: "), err
        assert says in err[-1]


def test_a_newest_record_left_empty_is_listed_warned_and_deletable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A power cut can leave the newest record named but empty (or shorter than its head):
    it was skipped in silence (`list` did not show it, `latest` used the older one without a
    word, `show`/`delete` said 'no sendshot matches'). It is listed as unreadable, `latest`
    says it used an older one (and the receiver of that one applies the stream: tree-sum),
    naming it is a one-line error (exit 3) and `delete` removes it."""
    from btrdelta.tree.treesum import tree_sum

    src, rcv, store = tmp_path / "src", tmp_path / "rcv", tmp_path / "store"
    src.mkdir()
    rcv.mkdir()
    ids = []
    for i in range(2):
        (src / f"f{i}").write_bytes(os.urandom(5000 + i))
        assert main(["send", str(src), "-o", str(tmp_path / f"s{i}"), "--record", "--store",
                     str(store), "--name", f"src.{i}", "--json",
                     *(["--from-sendshot", "latest"] if i else [])]) == 0
        ids.append(json.loads(capsys.readouterr().out)["sendshot"])
    assert main(["receive", "-f", str(tmp_path / "s0"), str(rcv)]) == 0
    for cut in (0, 10):  # empty, then a few bytes of the header
        f1 = store / "records" / f"{ids[1]}.sendshot"
        with open(f1, "r+b") as f:
            f.truncate(cut)
        os.utime(f1)  # (written after the record it was sent against)
        capsys.readouterr()
        assert main(["sendshot", "--store", str(store), "list"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("1 sendshot,")
        assert ids[0][:16] in out
        assert f"{ids[1][:16]}  cannot be read (" in out
        for argv in (["sendshot", "--store", str(store), "show", ids[1][:12]],
                     ["send", str(src), "-o", str(tmp_path / "sx"), "--store", str(store),
                      "--from-sendshot", ids[1][:12]]):
            assert main(argv) == 3
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1, err
            assert f"sendshot {ids[1][:16]} cannot be read" in err[0]
    assert main(["send", str(src), "-o", str(tmp_path / "s2"), "--store", str(store),
                 "--name", "src.2", "--from-sendshot", "latest", "--json"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["from_sendshot"] == ids[0]
    assert f"sendshot {ids[1][:12]} cannot be read" in got.err
    assert main(["receive", "-f", str(tmp_path / "s2"), str(rcv)]) == 0
    assert tree_sum(rcv / "src.2") == tree_sum(src)
    assert main(["sendshot", "--store", str(store), "delete", ids[1][:12]]) == 0
    assert sorted(p.name for p in (store / "records").iterdir()) == [f"{ids[0]}.sendshot"]
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    assert "cannot be read" not in capsys.readouterr().out


def test_prune_removes_leftovers_of_killed_writers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A record or cursor file a killed send left unnamed goes with `prune` once its process
    is gone and it is an hour old; a running writer's file and a young one stay."""
    store = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(6000))
    assert main(["send", str(src), "-o", str(tmp_path / "s0"), "--record",
                 "--store", str(store)]) == 0
    probe = subprocess.Popen(["true"])
    probe.wait()
    gone_pid = probe.pid
    old = time.time() - 7200
    stale = [store / "records" / f".tmp-{gone_pid}-0badc0de",
             store / f"cursors.json.tmp-{gone_pid}",
             store / f".cursors.json.tmp-{gone_pid}-0badc0de",
             store / f".heads.tmp-{gone_pid}-0badc0de"]
    kept = [store / "records" / f".tmp-{os.getpid()}-00c0ffee",      # a running writer
            store / "records" / f".tmp-{gone_pid}-0000beef"]         # an hour not yet passed
    for p in stale + kept:
        p.write_bytes(b"partial")
    for p in stale + kept[:1]:
        os.utime(p, (old, old))
    capsys.readouterr()
    out = _json(capsys, "sendshot prune", "--store", str(store), "--json", "prune",
                "--keep", "5", "-n")
    assert out["leftovers"] == sorted(str(p) for p in stale)
    assert all(p.exists() for p in stale + kept)
    assert main(["sendshot", "--store", str(store), "prune", "--keep", "5"]) == 0
    said = capsys.readouterr().out
    assert all(f"deleted leftover temporary file {p}" in said for p in stale), said
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert len([n for n in os.listdir(store / "records") if not n.startswith(".")]) == 1


def test_a_new_user_s_first_sendshot(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``--from-sendshot latest`` before any record says how to make the first one; a
    store of one record says '1 sendshot' (was: 'no sendshot of this source in STORE',
    '1 sendshots')."""
    store, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    st = ["--store", str(store)]
    capsys.readouterr()
    assert main(["send", str(src), "-o", str(tmp_path / "inc"), "--from-sendshot", "latest",
                 *st]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "the first send records one (send SOURCE -o FILE --record" in err
    assert "sendshot create COPY --source SOURCE" in err
    assert main(["send", str(src), "-o", str(tmp_path / "full"), "--record", "-q", *st]) == 0
    capsys.readouterr()
    assert main(["sendshot", *st, "list"]) == 0
    assert capsys.readouterr().out.startswith("1 sendshot, ")


def test_create_says_what_it_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sendshot create`` says what it recorded as ``list`` shows a record (id, source,
    size) and what a receiver must hold (was: only the record's digest)."""
    tree, src = tmp_path / "copy", tmp_path / "src"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 5000)
    st = ["sendshot", "--store", str(tmp_path / "store")]
    capsys.readouterr()
    assert main([*st, "create", str(tree), "--source", str(src)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert main([*st, "--json", "list"]) == 0
    (shot,) = checked("sendshot list", json.loads(capsys.readouterr().out))
    assert len(out) == 2, out
    assert out[0].startswith(f"recorded {shot['id'][:16]}  ")
    assert f"  {src}  {shot['stream_uuid']}  {shot['bytes']} B" in out[0]
    assert out[1] == (f"  a receiver holding {shot['stream_uuid']} (ctransid "
                      f"{shot['stream_ctransid']}) takes `btrdelta send {src} "
                      f"--from-sendshot {shot['id'][:16]}`")


def test_create_shows_its_walk_then_its_reading(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``sendshot create`` reads every file of the tree (a large one: seconds of silence):
    with --progress (or on a terminal) the walk's files, then the bytes read; -q says
    nothing."""
    tree = tmp_path / "copy"
    tree.mkdir()
    for i in range(300):
        (tree / f"f{i}").write_bytes(os.urandom(1000 + i))
    st = ["sendshot", "--store", str(tmp_path / "store"), "create", str(tree)]
    capsys.readouterr()
    assert main([*st, "--progress"]) == 0
    lines = capsys.readouterr().err.splitlines()
    # each phase's first line at once (the walk's first 256 entries), then its last figures
    assert lines[:2] == ["sendshot create walk: 256 files", "sendshot create walk: 300 files"]
    read = lines[-1].split(": ")
    assert read[0] == "sendshot create read", lines
    assert read[1].split(",")[0] == human_bytes(sum(1000 + i for i in range(300))), lines
    assert lines[2].startswith("sendshot create read: "), lines
    assert len(lines) == 4, lines
    assert main([*st, "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_list_of_a_store_that_does_not_exist_says_so(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # a mistyped --store listed '0 sendshots' as an empty store would
    store = tmp_path / "typo"
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    assert capsys.readouterr().out == (f"0 sendshots, 0 B; 0 receiver cursors; store {store} "
                                       "(no such directory yet: a typo, or no send recorded "
                                       "there)\n")
    assert not store.exists()


def test_list_says_where_each_receiver_is(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Session 32's trial: with three receivers `sendshot list` said `held by
    160d13de7c324a0cb27b1156dc0d0b04` and nothing named which receiver that was (the
    cursor kept no DEST): to forget the one gone for good a user had to read each
    receiver's `.btrdelta-replica.json`. The cursor keeps the DEST its last replicate
    gave, and list names it beside the id (also for a receiver whose record is gone).
    Oracle: each DEST's own receiver id (its state file)."""
    store, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(9000))
    dests = [tmp_path / "nas", tmp_path / "usb"]
    for dest in dests:
        dest.mkdir()
        assert main(["replicate", "-q", str(src), str(dest), "--store", str(store)]) == 0
    ids = {dest: json.loads((dest / ".btrdelta-replica.json").read_text())["id"]
           for dest in dests}
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    out = capsys.readouterr().out
    for dest, rid in ids.items():
        assert f"held by {rid} ({dest})" in out, out
    # a receiver whose record is gone (deleted with --force) is named with it too
    held = SendshotStore(store).cursors()[ids[dests[1]]]["digest"]
    assert main(["sendshot", "--store", str(store), "delete", held, "--force", "-q"]) == 0
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    out = capsys.readouterr().out
    assert f"receiver {ids[dests[1]]} ({dests[1]}): its record {held[:16]} is gone" in out, out


def test_a_receiver_of_two_sources_keeps_a_base_of_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Session 32's trial: two sources replicated into one DEST (`/pool/data` and
    `/pool/etc` into `/backup`, as btrbk users do) with one store. The receiver's cursor
    named one record, the last sent: replicating the second source moved it off the
    first one's, a replicate of the first source to another receiver then pruned that
    record, and the first DEST, which still held its tree, could only be sent a full one
    again (`no-common-base`). The cursor keeps the record it holds of each source.
    Oracles: the kind of the next run (incremental), its base (the record the DEST's own
    state names), the tree-sum of the result."""
    from btrdelta.tree import tree_sum

    store = tmp_path / "store"
    app, etc, nas, usb = (tmp_path / n for n in ("app", "etc", "nas", "usb"))
    for d in (app, etc, nas, usb):
        d.mkdir()
    (app / "f").write_bytes(os.urandom(9000))
    (etc / "g").write_bytes(os.urandom(9000))

    def rep(src: Path, dest: Path) -> dict[str, Any]:
        capsys.readouterr()
        assert main(["replicate", str(src), str(dest), "--store", str(store), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    first = rep(app, nas)
    other = rep(etc, nas)
    (app / "f").write_bytes(os.urandom(9000))
    rep(app, usb)  # (prunes what no receiver needs of app's records)
    held = {s.digest: s.held_by for s in SendshotStore(store).records_list()}
    assert held[first["sendshot"]] == held[other["sendshot"]] == [first["receiver"]], held
    (app / "f").write_bytes(os.urandom(9000))
    again = rep(app, nas)
    assert again["kind"] == "incremental", again
    assert again["base"] == first["sendshot"], again
    state = json.loads((nas / ".btrdelta-replica.json").read_text())
    assert state["received"][first["name"]] == first["sendshot"]
    assert tree_sum(nas / again["name"]) == tree_sum(app)
    # nas moved on of app: the record it held of app goes, the one of etc stays
    held = {s.digest: s.held_by for s in SendshotStore(store).records_list()}
    assert first["sendshot"] not in held, held
    assert held[other["sendshot"]] == held[again["sendshot"]] == [first["receiver"]], held


def test_two_sources_ending_and_starting_at_once_keep_both_records(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sources replicated into one DEST with one store, their runs overlapping: the
    receiver lets the second conversation in once the first one's COMMITTED is out, while
    the first sender still moves its cursor. That move was a read-modify-write of the
    cursor's ``sources`` without the store's lock (session 32's rev32): the second run,
    whole inside it, named its new record of etc and pruned the older one, and the first
    run then wrote back the ``sources`` it had read, naming the pruned record of etc and
    not the one the DEST holds (its next run: a full resend, a record of it pruned as no
    receiver's). The first run is held between its read of the cursors and its write
    while the second one runs in a process of its own (up to 4 s: with the lock it
    waits). Oracles: the records the DEST's own state says it received, the store's
    record files, the trees' sums."""
    from btrdelta.tree import tree_sum
    from btrdelta.update import replicate as replicate_mod

    store = tmp_path / "store"
    app, etc, nas = (tmp_path / n for n in ("app", "etc", "nas"))
    for d in (app, etc, nas):
        d.mkdir()
    for d in (app, etc):
        (d / "f").write_bytes(os.urandom(9000))
        assert main(["replicate", "-q", str(d), str(nas), "--store", str(store)]) == 0
        (d / "f").write_bytes(os.urandom(9000))
    other: list[subprocess.Popen[bytes]] = []
    pythonpath = str(Path(btrdelta.__file__).parents[1])
    moving = threading.local()
    cursor, read = replicate_mod._Sender._cursor, SendshotStore.cursors

    def held_cursor(self: Any, digest: str | None, *, holds: bool = False,
                    **extra: Any) -> None:
        moving.on = holds and "name" in extra and not other  # (after the COMMITTED)
        try:
            cursor(self, digest, holds=holds, **extra)
        finally:
            moving.on = False

    def cursors(self: SendshotStore) -> dict[str, dict[str, Any]]:
        got = read(self)
        if getattr(moving, "on", False) and not other:  # the other source's run, now
            other.append(subprocess.Popen(
                [sys.executable, "-m", "btrdelta", "replicate", "-q", str(etc), str(nas),
                 "--store", str(store)], env={**os.environ, "PYTHONPATH": pythonpath}))
            with contextlib.suppress(subprocess.TimeoutExpired):
                other[0].wait(4)
        return got

    monkeypatch.setattr(replicate_mod._Sender, "_cursor", held_cursor)
    monkeypatch.setattr(SendshotStore, "cursors", cursors)
    assert main(["replicate", "-q", str(app), str(nas), "--store", str(store)]) == 0
    assert other
    assert other[0].wait(60) == 0
    monkeypatch.undo()
    state = json.loads((nas / ".btrdelta-replica.json").read_text())["received"]
    (cur,) = json.loads((store / "cursors.json").read_text())["receivers"].values()
    held = cur["sources"]
    assert set(held) == {str(app), str(etc)}, cur
    for src, digest in held.items():
        name = next(n for n, d in state.items() if d == digest)  # what the DEST holds
        assert name.startswith(os.path.basename(src) + "."), (name, src)
        assert tree_sum(nas / name) == tree_sum(Path(src))
    assert set(held.values()) <= _records(store)
    for d in (app, etc):  # each source's next run: an incremental on what the DEST holds
        (d / "f").write_bytes(os.urandom(9000))
        capsys.readouterr()
        assert main(["replicate", str(d), str(nas), "--store", str(store), "--json"]) == 0
        run = json.loads(capsys.readouterr().out)
        assert (run["kind"], run["base"]) == ("incremental", held[str(d)]), run


def test_forget_a_receiver_gone_for_good(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Two receivers replicated to; one moves on, the other is gone for good: prune keeps
    the record the gone one holds until `sendshot forget` drops its cursor. Oracles: the
    store's cursor file and record files, the replicated tree."""
    store, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(9000))
    dests = [tmp_path / "nas", tmp_path / "old-nas"]
    for dest in dests:
        dest.mkdir()
        assert main(["replicate", "-q", str(src), str(dest), "--store", str(store)]) == 0
    first = json.loads((store / "cursors.json").read_text())["receivers"]
    assert len(first) == 2
    assert {c["digest"] for c in first.values()} == _records(store)
    (src / "f").write_bytes(os.urandom(9000))
    stay = dests[0]
    assert main(["replicate", "-q", str(src), str(stay), "--store", str(store)]) == 0
    cursors = json.loads((store / "cursors.json").read_text())["receivers"]
    (gone, old), = ((r, c["digest"]) for r, c in cursors.items() if c == first[r])
    capsys.readouterr()
    _json(capsys, "sendshot prune", "--store", str(store), "--json", "prune", "--keep", "1")
    assert old in _records(store)  # held by the receiver that did not move on

    # an unknown receiver: one line naming the ones there are, nothing changed
    before = (store / "cursors.json").read_bytes()
    assert main(["sendshot", "--store", str(store), "forget", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no receiver 'nosuch'" in err
    assert gone in err
    assert (store / "cursors.json").read_bytes() == before

    # a receiver with a transfer in flight (a replicate killed): refused without --force
    snap = "/pool/.btrdelta-replicate-0123456789abcdef-01234567-42"
    SendshotStore(store).edit_cursor("cut", lambda _: (None, {"inflight": {"snapshot": snap}}))
    assert main(["sendshot", "--store", str(store), "forget", "cut"]) == 1
    assert snap in capsys.readouterr().err
    assert _json(capsys, "sendshot forget", "--store", str(store), "--json", "forget",
                 "cut", "--force") == {"forgotten": ["cut"]}

    assert main(["sendshot", "--store", str(store), "forget", gone]) == 0
    assert capsys.readouterr().out == f"forgot receiver {gone} (it held {old[:16]})\n"
    assert gone not in json.loads((store / "cursors.json").read_text())["receivers"]
    _json(capsys, "sendshot prune", "--store", str(store), "--json", "prune", "--keep", "1")
    assert old not in _records(store)
    assert len(_records(store)) == 1
    (kept,) = json.loads((store / "cursors.json").read_text())["receivers"].values()
    assert (stay / kept["name"] / "f").read_bytes() == (src / "f").read_bytes()


def test_list_names_receivers_whose_record_is_gone(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A receiver whose record was deleted with --force (or that holds none yet) is named
    by `sendshot list`: no record line names it, and `forget` needs its id. Oracle: the
    receivers replicate wrote into the store's cursor file."""
    store, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(9000))
    dest = tmp_path / "nas"
    dest.mkdir()
    assert main(["replicate", "-q", str(src), str(dest), "--store", str(store)]) == 0
    (receiver, cursor), = json.loads((store / "cursors.json").read_text())["receivers"].items()
    snap = "/pool/.btrdelta-replicate-0123456789abcdef-01234567-43"
    SendshotStore(store).edit_cursor("new-one",
                                     lambda _: (None, {"inflight": {"snapshot": snap}}))
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1 sendshot, ")
    assert "; 2 receiver cursors; " in lines[0]
    assert lines[1].endswith(f"held by {receiver} ({dest})")  # (where: since session 32)
    assert lines[2].startswith("receiver new-one: it holds no sendshot yet")
    assert len(lines) == 3

    assert main(["sendshot", "--store", str(store), "delete", "--force", cursor["digest"]]) == 0
    capsys.readouterr()
    assert main(["sendshot", "--store", str(store), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0 sendshots, 0 B; 2 receiver cursors")
    assert lines[1:] == [
        f"receiver {receiver} ({dest}): its record {cursor['digest'][:16]} is gone (its next "
        f"replicate chooses a base from what it holds, or sends in full; `sendshot forget "
        f"{receiver}` drops it)",
        "receiver new-one: it holds no sendshot yet (its next replicate chooses a base from "
        "what it holds, or sends in full; `sendshot forget new-one` drops it)"]
    assert main(["sendshot", "--store", str(store), "forget", receiver]) == 0


def test_a_store_whose_first_run_met_a_full_disk_works_once_there_is_room(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new sendshot store on a full file system (a 256 KiB tmpfs): its first replicate
    exits 8 (no space); once room is made, the next one replicates. It left the store's
    seed file empty (made, then its write failed), and every run after it failed, exit 3
    'damaged seed file', until the file was deleted by hand. Oracle: tree-sum of DEST's
    copy against the source."""
    from btrdelta.tree import tree_sum
    from tests.conftest import require_btrfs

    require_btrfs()  # (root: a mount)
    src, dest, mnt = tmp_path / "src", tmp_path / "dest", tmp_path / "small"
    for d in (src, dest, mnt):
        d.mkdir()
    (src / "f").write_bytes(os.urandom(9000))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:
            while f.write(b"\1" * 4096):
                if os.statvfs(mnt).f_bfree == 0:
                    break
        capsys.readouterr()
        store = mnt / "store"
        assert main(["replicate", "-q", str(src), str(dest), "--store", str(store)]) == 8
        assert "No space left on device" in capsys.readouterr().err
        filler.unlink()
        assert main(["replicate", "-q", str(src), str(dest), "--store", str(store)]) == 0, \
            capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    copies = [p for p in dest.iterdir() if not p.name.startswith(".")]
    assert len(copies) == 1, copies
    assert tree_sum(copies[0]) == tree_sum(src)
