"""Helpers of the signing tests: the CLI run in-process or as a process, a one-line refusal,
a tampered send stream."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

from btrdelta.cli import main
from btrdelta.stream.codec import command_crc
from btrdelta.stream.constants import Cmd

BTRDELTA = [sys.executable, "-m", "btrdelta"]


def run(*args: str | Path, stdin: bytes | None = None,
        process: bool = False) -> subprocess.CompletedProcess[bytes]:
    """``btrdelta ARGS``: in this process (fast), or as a process (standard input)."""
    words = [str(a) for a in args]
    if stdin is not None or process:
        return subprocess.run([*BTRDELTA, *words], input=stdin, capture_output=True,
                              check=False)
    out, err = io.BytesIO(), io.StringIO()
    text = io.TextIOWrapper(out, write_through=True)
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(err):
        code = main(words)
    text.flush()
    stdout = out.getvalue()
    text.detach()
    return subprocess.CompletedProcess(words, code, stdout, err.getvalue().encode())


def refused(proc: subprocess.CompletedProcess[bytes], code: int, match: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert match in err, err
    return err


def flip_in_write(stream: bytes, *, fix_crc: bool) -> bytes:
    """One byte of the first WRITE's data flipped; its CRC32C recomputed when ``fix_crc``
    (an attacker who knows the format), so only the signature can notice."""
    out = bytearray(stream)
    pos = 17
    while pos < len(out):
        length = int.from_bytes(out[pos:pos + 4], "little")
        cmd = int.from_bytes(out[pos + 4:pos + 6], "little")
        if cmd == Cmd.WRITE:
            out[pos + 10 + length - 1] ^= 0x40
            if fix_crc:
                crc = command_crc(length, cmd, bytes(out[pos + 10:pos + 10 + length]))
                out[pos + 6:pos + 10] = crc.to_bytes(4, "little")
            return bytes(out)
        pos += 10 + length
    raise AssertionError("no WRITE in the stream")
