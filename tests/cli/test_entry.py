"""The console entry (``python -m btrdelta``) exits quickly but loses no output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.cli import main

STREAM = Path(__file__).parents[1] / "data" / "streams" / "reflink-deep-paths-108.A.v1.stream"


def test_quick_exit_flushes_all_output(tmp_path: Path,
                                       capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["dump", "-f", str(STREAM)]) == 0
    want = capfdbinary.readouterr().out
    assert want.count(b"\n") > 10
    out = tmp_path / "dump.txt"  # a file: block-buffered, the case a lost flush would show
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "dump", "-f", str(STREAM)],
                              stdout=f, stderr=subprocess.PIPE, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == want


def test_exit_code_and_error_line_survive_the_quick_exit(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "dump", "-f",
                           str(tmp_path / "missing")], capture_output=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("btrdelta dump: error:")
