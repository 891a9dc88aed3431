"""``delta make`` checks its own output (cheaply by default, a full expansion with
``--verify``) and says when a plain-directory ``--old`` does not look like the parent."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from btrdelta.delta import MakeOptions, diffing, make_delta
from btrdelta.delta import make as make_mod
from btrdelta.delta.format import DeltaEnd
from btrdelta.errors import BtrdeltaError
from btrdelta.stream import StreamWriter
from btrdelta.stream import records as R


def _stream(*recs: object) -> bytes:
    out: list[bytes] = []
    w = StreamWriter(out.append, 1)
    w.write(R.Snapshot(b"B", uuid.UUID(int=1), 9, uuid.UUID(int=2), 8))
    for rec in recs:
        w.write(rec)
    w.write(R.End())
    return b"".join(bytes(p) for p in out)


@pytest.fixture
def old(tmp_path: Path) -> Path:
    root = tmp_path / "old"
    (root / "d").mkdir(parents=True)
    (root / "d/f").write_bytes(bytes(range(256)) * 2)
    (root / "d/gone").write_bytes(b"x")
    return root


def _tiny_change() -> bytes:
    new = random.Random(5).randbytes(100)
    return _stream(R.Write(b"d/f", 0, new), R.Truncate(b"d/f", len(new)))


def _make(stream: bytes, old: Path, **kw: object) -> tuple[bytes, make_mod.MakeStats]:
    out: list[bytes] = []
    stats = make_delta(io.BufferedReader(io.BytesIO(stream)), old,  # type: ignore[arg-type]
                       out.append, MakeOptions(min_file_size=1, jobs=1, **kw))  # type: ignore[arg-type]
    return b"".join(bytes(p) for p in out), stats


@pytest.mark.parametrize("verify", ["cheap", "full"])
def test_a_patch_the_expansion_refuses_fails_make(
    old: Path, verify: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the length rule taken out of make (the bug of the issue), make's own check
    refuses the delta: it never exits 0 with a delta the device cannot expand."""
    monkeypatch.setattr(diffing, "patch_refusal", lambda *_a: None)
    with pytest.raises(BtrdeltaError, match=r"does not expand.*not below new size"):
        _make(_tiny_change(), old, verify=verify)


def test_only_the_full_check_expands(old: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong digest in DEND passes the cheap check (nothing is hashed) and fails the full
    one (the expansion checks the digest of what it produced)."""
    real = make_mod.DeltaEnd

    def wrong(count: int, size: int, algo: int, digest: bytes) -> DeltaEnd:
        return real(count, size, algo, bytes(len(digest)))

    monkeypatch.setattr(make_mod, "DeltaEnd", wrong)
    stream = _stream(R.Write(b"d/f", 0, b"changed" + bytes(range(256))))
    _make(stream, old, verify="cheap")
    with pytest.raises(BtrdeltaError, match=r"does not expand.*digest mismatch"):
        _make(stream, old, verify="full")


def test_cli_verify_and_failure(old: Path, tmp_path: Path) -> None:
    stream = tmp_path / "S"
    stream.write_bytes(_stream(R.Write(b"d/f", 0, b"changed" + bytes(range(256)) * 2)))
    delta = tmp_path / "D"
    py = [sys.executable, "-m", "btrdelta", "delta"]
    proc = subprocess.run([*py, "make", "-f", str(stream), "--old", str(old), "-o", str(delta),
                           "--verify"], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    back = subprocess.run([*py, "expand", "-f", str(delta), "--old", str(old)],
                          capture_output=True, check=True).stdout
    assert back == stream.read_bytes()
    # make with the length rule taken out: one line, an error exit, no output left
    stream.write_bytes(_tiny_change())
    script = (
        "import sys\n"
        "from btrdelta.delta import diffing\n"
        "from btrdelta.cli import entry\n"
        "diffing.patch_refusal = lambda *_a: None\n"
        "sys.argv[0] = 'btrdelta'\n"
        "entry()\n"
    )
    out = tmp_path / "D2"
    proc = subprocess.run([sys.executable, "-c", script, "delta", "make", "-f", str(stream),
                           "--old", str(old), "-o", str(out)],
                          capture_output=True, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1
    assert "does not expand" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_plain_directory_that_is_not_the_parent(old: Path, tmp_path: Path) -> None:
    """A plain-directory --old cannot be identified: make says when the paths the stream
    removes are not there, and when no written file has an old file to diff against."""
    stream = _stream(R.Unlink(b"d/gone"), R.Write(b"d/f", 0, b"new data" * 100))
    _, stats = _make(stream, old)
    assert stats.warnings == []
    other = tmp_path / "other"
    other.mkdir()
    _, stats = _make(stream, other)
    assert len(stats.warnings) == 2
    assert "1 of 1 paths the stream removes or renames from its parent are not in --old" in (
        stats.warnings[0])
    assert "none of the 1 files the stream writes has an old file" in stats.warnings[1]
    path = tmp_path / "S"
    path.write_bytes(stream)
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "delta", "make", "-f", str(path),
                           "--old", str(other), "-o", str(tmp_path / "D")],
                          capture_output=True, check=False)
    assert proc.returncode == 0
    assert proc.stderr.decode().count("delta make: warning: ") == 2
