"""What an input is, told from its first bytes: real files, pipes and unrewindable files."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.chunk.archive import MAGIC as CHUNK_MAGIC
from btrdelta.delta.format import DELTA_MAGIC
from btrdelta.stream.constants import MAGIC as STREAM_MAGIC
from btrdelta.update.identify import PEEK, Kind, identify, identify_bytes
from tests.conftest import Children, committed_streams

STREAM = committed_streams()[0]


class _Unrewindable(io.RawIOBase):
    """A file that can only be read (no peek, no seek), a few bytes at a time."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        chunk = self._f.read(min(len(b), 5))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_peek_covers_every_magic() -> None:
    assert max(len(STREAM_MAGIC), len(DELTA_MAGIC), len(CHUNK_MAGIC)) <= PEEK


def _compressed(tool: str, data: bytes) -> bytes:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    return subprocess.run([tool, "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize(("tool", "name"), [("zstd", "zstd"), ("xz", "xz"), ("gzip", "gzip"),
                                            ("bzip2", "bzip2")])
def test_compressed_streams_are_named(tool: str, name: str) -> None:
    what = identify_bytes(_compressed(tool, STREAM.read_bytes())[:PEEK])
    assert what.kind is Kind.COMPRESSED
    assert what.describe() == f"{name}-compressed data"
    assert f"{name} -dc" in str(what.refuse("a send stream"))


def test_kinds() -> None:
    assert identify_bytes(STREAM.read_bytes()[:PEEK]).kind is Kind.SEND_STREAM
    assert identify_bytes(b"").kind is Kind.EMPTY
    assert identify_bytes(b"hello world").kind is Kind.UNKNOWN
    assert identify_bytes(DELTA_MAGIC + b"\4\0\0\0").kind is Kind.DELTA_STREAM
    assert identify_bytes(CHUNK_MAGIC + bytes(8)).kind is Kind.CHUNK_ARCHIVE


def test_file_pipe_and_unrewindable_give_every_byte_back(tmp_path: Path,
                                                         children: Children) -> None:
    data = STREAM.read_bytes()
    with open(STREAM, "rb", buffering=0) as raw:
        what, f = identify(raw)
        assert what.kind is Kind.SEND_STREAM
        assert f.read() == data
    with open(STREAM, "rb") as buffered:
        what, f = identify(buffered)
        assert what.kind is Kind.SEND_STREAM
        assert f.read() == data
    # a pipe whose writer sends the magic in two short writes: the peek sees only part
    code = ("import sys,time; d=open(sys.argv[1],'rb').read(); o=sys.stdout.buffer; "
            "o.write(d[:3]); o.flush(); time.sleep(0.2); o.write(d[3:]); o.flush()")
    proc = children.start([sys.executable, "-c", code, str(STREAM)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    what, f = identify(proc.stdout)  # type: ignore[arg-type]
    assert what.kind is Kind.SEND_STREAM
    assert f.read() == data
    proc.stdout.close()
    proc.wait()
    what, f = identify(_Unrewindable(data))  # type: ignore[arg-type]
    assert what.kind is Kind.SEND_STREAM
    assert f.read() == data
