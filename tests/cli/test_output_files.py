"""Output files of `send`, `delta make` and `delta expand` are never written through a symlink.

Another local user can guess the temporary name an output used to be written under
(``OUT.tmp-PID``) and plant a symlink there to a file of the user running btrdelta (root).
Each command runs in this process (so the PID is the one an attacker would guess) with such a
symlink planted; the victim must stay unchanged and the output must be a new regular file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.stream import StreamReader, StreamWriter
from btrdelta.stream import records as R


def _plant(out: Path, victim: Path) -> list[Path]:
    """Symlinks to ``victim`` at every temporary name the old code could have used."""
    links = [out.with_name(f"{out.name}.tmp-{os.getpid()}"),
             out.with_name(f".{out.name}.tmp-{os.getpid()}")]
    for link in links:
        link.symlink_to(victim)
    return links


def _old_and_stream(tmp_path: Path) -> tuple[Path, Path]:
    old = tmp_path / "old"
    old.mkdir()
    base = bytes(range(256)) * 400
    (old / "f").write_bytes(base)
    out: list[bytes] = []
    w = StreamWriter(out.append, 1)
    w.write(R.Snapshot(b"B", uuid.uuid4(), 2, uuid.uuid4(), 1))
    w.write(R.Write(b"f", 0, base[:5000] + b"changed" + base[5007:40000]))
    w.write(R.End())
    stream = tmp_path / "S"
    stream.write_bytes(b"".join(bytes(p) for p in out))
    return old, stream


@pytest.mark.parametrize("command", ["send", "delta make", "delta expand"])
def test_planted_symlink_is_not_followed(command: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    old, stream = _old_and_stream(tmp_path)
    if command == "delta expand":
        delta = tmp_path / "D"
        assert main(["delta", "make", "-f", str(stream), "--old", str(old), "-o",
                     str(delta), "-j", "1"]) == 0
    out = tmp_path / "out"
    links = _plant(out, victim)
    if command == "send":
        argv = ["send", str(old), "-o", str(out)]
    elif command == "delta make":
        argv = ["delta", "make", "-f", str(stream), "--old", str(old), "-o", str(out), "-j", "1"]
    else:
        argv = ["delta", "expand", "-f", str(delta), "--old", str(old), "-o", str(out)]
    assert main(argv) == 0
    assert victim.read_bytes() == b"precious\n"
    assert not out.is_symlink()
    assert out.is_file()
    if command == "delta expand":
        assert out.read_bytes() == stream.read_bytes()
    if command == "send":
        with open(out, "rb") as f:
            assert any(isinstance(ev, R.Subvol) for ev in StreamReader(f).events())
    # the planted links are left alone, nothing else is left behind
    assert all(link.is_symlink() for link in links)
    left = {p.name for p in tmp_path.iterdir()} - {"victim", "old", "S", "D", "out"}
    assert left == {link.name for link in links}


def test_output_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    old, _ = _old_and_stream(tmp_path)
    out = tmp_path / "out"
    out.symlink_to(victim)
    assert main(["send", str(old), "-o", str(out)]) == 0
    assert victim.read_bytes() == b"precious\n"
    assert not out.is_symlink()
    assert out.read_bytes().startswith(b"btrfs-stream\0")
