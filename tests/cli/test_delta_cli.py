"""`btrdelta delta make|expand|stat` and `btrdelta stat` on delta streams (no root needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from btrdelta.cli import main
from btrdelta.stream import StreamWriter
from btrdelta.stream import records as R


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    old = tmp_path / "old"
    old.mkdir()
    base = os.urandom(50_000) * 3
    (old / "f").write_bytes(base)
    new = base[:1000] + b"X" + base[1001:] + b"more"
    out: list[bytes] = []
    w = StreamWriter(out.append, 1)
    w.write(R.Snapshot(b"B", uuid.uuid4(), 2, uuid.uuid4(), 1))
    for off in range(0, len(new), 49152):
        w.write(R.Write(b"f", off, new[off : off + 49152]))
    w.write(R.End())
    stream = tmp_path / "S"
    stream.write_bytes(b"".join(bytes(p) for p in out))
    return old, stream


def test_make_expand_stat(tmp_path: Path, capsys: object) -> None:
    old, stream = _setup(tmp_path)
    delta = tmp_path / "D"
    back = tmp_path / "S2"
    assert main(["delta", "make", "-f", str(stream), "--old", str(old), "-o", str(delta),
                 "--codec", "bsdiff", "-j", "1"]) == 0
    assert delta.stat().st_size < stream.stat().st_size // 20
    assert main(["delta", "expand", "-f", str(delta), "--old", str(old), "-o", str(back)]) == 0
    assert back.read_bytes() == stream.read_bytes()
    assert main(["delta", "stat", "--json", str(delta)]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    info = json.loads(out)
    assert info["patched_files"] == 1
    assert info["codecs"]["bsdiff"]["saved_bytes"] > 100_000
    assert main(["stat", "--json", str(delta)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "delta"  # type: ignore[attr-defined]


def test_pipe_and_errors(tmp_path: Path) -> None:
    old, stream = _setup(tmp_path)
    py = [sys.executable, "-m", "btrdelta"]
    made = subprocess.run([*py, "delta", "make", "--old", str(old), "-"],
                          input=stream.read_bytes(), capture_output=True, check=True)
    back = subprocess.run([*py, "delta", "expand", "--old", str(old)], input=made.stdout,
                          capture_output=True, check=True)
    assert back.stdout == stream.read_bytes()
    bad = subprocess.run([*py, "delta", "expand", "--old", str(old)],
                         input=made.stdout[: len(made.stdout) // 2], capture_output=True,
                         check=False)
    assert bad.returncode == 3
    assert b"Traceback" not in bad.stderr
    assert bad.stderr.count(b"\n") == 1
    garbage = subprocess.run([*py, "delta", "make", "--old", str(old)], input=b"not a stream",
                             capture_output=True, check=False)
    assert garbage.returncode == 3
    assert b"Traceback" not in garbage.stderr


def test_expand_against_another_old_snapshot_asks_if_it_is_the_right_one(
        tmp_path: Path, capsys: object) -> None:
    # "old file has 150001 bytes, the patch expects 150000": a new user's --old mistake
    old, stream = _setup(tmp_path)
    delta = tmp_path / "D"
    assert main(["delta", "make", "-q", "-f", str(stream), "--old", str(old), "-o",
                 str(delta)]) == 0
    capsys.readouterr()  # type: ignore[attr-defined]
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes((old / "f").read_bytes() + b"!")
    assert main(["delta", "expand", "-f", str(delta), "--old", str(other), "-o",
                 str(tmp_path / "S2")]) == 5
    err = capsys.readouterr().err.strip()  # type: ignore[attr-defined]
    assert len(err.splitlines()) == 1
    assert f"(is {other} the snapshot the delta was made against, unchanged?)" in err
    assert not (tmp_path / "S2").exists()
