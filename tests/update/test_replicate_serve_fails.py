"""`replicate --serve` when its conversation raises (here: DEST's state file damaged after
the receiver said HELLO, as another process's write could leave it): the peer gets a
REFUSE naming the error instead of a bare end of the pipe, the receiver exits with the
error's documented code (3: a damaged state file, docs/replicate.md) and one line, no
traceback, and DEST keeps what it held."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from btrdelta.protocol import Connection, Hello, Refuse
from btrdelta.update.channels import MessageIO, spawn_local


def test_a_serve_that_raises_tells_the_peer_and_exits_with_the_errors_code(
        tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "a").write_bytes(b"one")
    subprocess.run([sys.executable, "-m", "btrdelta", "replicate", "-q", str(src), str(dest),
                    "--store", str(tmp_path / "store")], check=True)
    held = sorted(os.listdir(dest))
    ch = spawn_local(str(dest))
    io = MessageIO(ch, Connection("sender"))
    io.expect(Hello)
    state = dest / ".btrdelta-replica.json"
    state.write_text("not json")
    io.send(Hello("sender", (1, 2, 3), (), "test", str(src)))
    got = io.expect(Refuse)
    assert isinstance(got, Refuse)
    assert (got.code, got.message) == (
        "failed", f"{state}: damaged replica state: Expecting value: line 1 column 1 (char 0)")
    ch.close()
    assert ch.proc is not None
    assert (ch.proc.returncode, ch.err) == (
        3, f"btrdelta replicate: error: {got.message}"), ch.err
    assert sorted(os.listdir(dest)) == held
