"""The directory backend's registry (``DEST/.btrdelta-subvols.json``) under concurrent
receives, a failure at the last step, hostile names and leftovers, through the CLI.

Oracles: the registry file read as plain JSON, the directories in DEST, and whether an
incremental stream finds its parent there (exit 0) or not (exit 6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from btrdelta.receive.registry import REGISTRY_NAME, Registry, RegistryEntry
from btrdelta.receive.subvolumes import _REGISTRY
from btrdelta.stream.records import End, Mkfile, Snapshot, Subvol, Write
from tests.conftest import Children

from .helpers import stream_bytes


def _full(tmp: Path, name: str, u: uuid.UUID) -> Path:
    path = tmp / f"{name}.stream"
    path.write_bytes(stream_bytes([Subvol(path=name.encode(), uuid=u, ctransid=7),
                                   Mkfile(path=b"f", ino=257),
                                   Write(path=b"f", offset=0, data=name.encode()), End()]))
    return path


def _incremental(tmp: Path, name: str, parent: uuid.UUID) -> Path:
    path = tmp / f"{name}.stream"
    path.write_bytes(stream_bytes([Snapshot(path=name.encode(), uuid=uuid.uuid4(), ctransid=9,
                                            clone_uuid=parent, clone_ctransid=7),
                                   Write(path=b"f", offset=0, data=b"changed"), End()]))
    return path


def _receive(stream: Path, dest: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "--backend", "dir",
                           "-f", str(stream), str(dest)], capture_output=True, check=False)
    return proc.returncode, proc.stderr.decode()


def _registered(dest: Path) -> dict[str, str]:
    doc = json.loads((dest / REGISTRY_NAME).read_bytes())
    return {e["name"]: e["uuid"] for e in doc["subvols"]}


def test_concurrent_receives_keep_every_entry(tmp_path: Path, children: Children) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    subvols = {f"sv{i:02d}": uuid.uuid4() for i in range(24)}
    procs = [children.start([sys.executable, "-m", "btrdelta", "receive", "--backend", "dir",
                             "-f", str(_full(tmp_path, name, u)), str(dest)],
                            stderr=subprocess.PIPE)
             for name, u in subvols.items()]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    assert _registered(dest) == {name: str(u) for name, u in subvols.items()}
    for name, u in list(subvols.items())[:3]:
        code, err = _receive(_incremental(tmp_path, f"{name}-inc", u), dest)
        assert code == 0, err
        assert (dest / f"{name}-inc" / "f").read_bytes() == b"changed"


def test_registry_unwritable_at_the_last_step_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / REGISTRY_NAME).mkdir()  # the registry cannot be read or written
    u = uuid.uuid4()
    stream = _full(tmp_path, "sv", u)
    code, err = _receive(stream, dest)
    assert code == 3, err  # (a malformed state file, named)
    assert f"{REGISTRY_NAME}: record 3 (end): invalid subvolume registry: not a regular " \
           "file" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in dest.iterdir()) == [REGISTRY_NAME]  # not even a temp dir
    (dest / REGISTRY_NAME).rmdir()
    code, err = _receive(stream, dest)  # the same receive again, once the cause is gone
    assert code == 0, err
    assert _registered(dest) == {"sv": str(u)}
    code, err = _receive(_incremental(tmp_path, "inc", u), dest)
    assert code == 0, err


@pytest.mark.parametrize("name", [REGISTRY_NAME, ".btrdelta-tmp-0123456789ab-1",
                                  f"{REGISTRY_NAME}.tmp-5"])
def test_reserved_names_are_refused(tmp_path: Path, name: str) -> None:
    assert REGISTRY_NAME.encode() == _REGISTRY
    dest = tmp_path / "dest"
    dest.mkdir()
    u = uuid.uuid4()
    assert _receive(_full(tmp_path, "first", u), dest)[0] == 0
    code, err = _receive(_full(tmp_path, name, uuid.uuid4()), dest)
    assert code == 4, err
    assert err.count("\n") == 1
    assert "is reserved by btrdelta" in err
    assert sorted(p.name for p in dest.iterdir()) == [REGISTRY_NAME, "first"]
    assert _registered(dest) == {"first": str(u)}
    assert _receive(_incremental(tmp_path, "inc", u), dest)[0] == 0


def test_a_dead_receivers_registration_never_takes_over(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    ghost = uuid.uuid4()
    # what a receiver killed between registering "sv" and renaming its temp dir leaves
    Registry(dest).add(RegistryEntry("sv", ghost, 7, ino=1 << 40))
    u = uuid.uuid4()
    code, err = _receive(_full(tmp_path, "sv", u), dest)
    assert code == 0, err
    code, err = _receive(_incremental(tmp_path, "from-ghost", ghost), dest)
    assert code == 6, err
    assert f"cannot find parent subvolume {ghost}" in err
    code, err = _receive(_incremental(tmp_path, "inc", u), dest)
    assert code == 0, err
    # copied elsewhere (every inode differs), the registry still finds its subvolumes
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(dest), str(copy)], check=True)
    assert os.stat(copy / "sv").st_ino != os.stat(dest / "sv").st_ino
    code, err = _receive(_incremental(tmp_path, "inc2", u), copy)
    assert code == 0, err


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_planted_registry_is_refused_not_followed(tmp_path: Path, planted: str) -> None:
    """A symlink under the registry's name is not followed to a file outside DEST (was:
    read, and its bytes parsed as the registry), a FIFO does not block the receive (was:
    it hung in open): one line, exit 3, nothing received."""
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"version": 1, "subvols": []}))
    if planted == "symlink":
        (dest / REGISTRY_NAME).symlink_to(outside)
    else:
        os.mkfifo(dest / REGISTRY_NAME)
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "--backend", "dir",
                           "-f", str(_full(tmp_path, "A", uuid.uuid4())), str(dest)],
                          capture_output=True, check=False, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert "invalid subvolume registry: " in err
    assert [line for line in err.splitlines() if "error" in line] == err.splitlines()[-1:]
    assert sorted(p.name for p in dest.iterdir()) == [REGISTRY_NAME]
    assert outside.read_text() == json.dumps({"version": 1, "subvols": []})


def test_a_killed_writers_temporary_registry_is_removed_by_the_next(tmp_path: Path) -> None:
    """A receive killed between the registry's link and its rename leaves
    ``.btrdelta-subvols.json.tmp-PID-HEX``; the next receive's registration removes it."""
    dest = tmp_path / "dest"
    dest.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = dest / f".{REGISTRY_NAME}.tmp-{gone.pid}-{'0f' * 6}"
    leftover.write_bytes(b'{"version": 1, "subvols": []}\n')
    code, err = _receive(_full(tmp_path, "a", uuid.uuid4()), dest)
    assert code == 0, err
    assert sorted(os.listdir(dest)) == [REGISTRY_NAME, "a"]


def test_entries_of_replaced_directories_are_dropped(tmp_path: Path) -> None:
    """A version deleted with ``rm -rf`` and received again under its name left its old
    entry behind (a benchmark's DEST grew to 276 entries, each read by every ``find``). A
    registration drops the entries of its name that a newer one replaced: the name holds a
    directory the newer one owns, or the directory is gone and the newer one came over a
    minute later. An entry whose directory is just missing stays (a rename to come), and
    the incremental against the current version still finds its parent."""
    dest = tmp_path / "dest"
    dest.mkdir()
    u = uuid.uuid4()
    registry = Registry(dest)
    long_ago = time.time() - 3000
    for n in range(3):  # earlier receives of "sv" whose directories were deleted since
        registry.add(RegistryEntry("sv", uuid.uuid4(), 7, received_at=long_ago + n,
                                   ino=(1 << 40) + n))
    registry.add(RegistryEntry("gone", uuid.uuid4(), 7, received_at=long_ago, ino=1 << 41))
    code, err = _receive(_full(tmp_path, "sv", u), dest)  # (registered before its rename)
    assert code == 0, err

    def entries(name: str) -> list[int]:
        doc = json.loads((dest / REGISTRY_NAME).read_bytes())
        return [e["ino"] for e in doc["subvols"] if e["name"] == name]

    assert entries("sv") == [os.stat(dest / "sv").st_ino]
    assert entries("gone") == [1 << 41]  # no newer entry of its name: kept
    registry.add(RegistryEntry("sv", uuid.uuid4(), 7, received_at=time.time() - 1,
                               ino=1 << 42))  # older than the current one, not its directory
    assert entries("sv") == [os.stat(dest / "sv").st_ino]
    assert _receive(_full(tmp_path, "other", uuid.uuid4()), dest)[0] == 0
    assert set(_registered(dest)) == {"sv", "gone", "other"}
    code, err = _receive(_incremental(tmp_path, "inc", u), dest)
    assert code == 0, err
