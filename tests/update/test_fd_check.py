"""The descriptor check of tests/update (conftest ``_no_fd_leak``) judges passing tests only.

A test that failed, or that Ctrl-C interrupted (``make soak``), may leave a channel's pipes
open; reporting them as well buried the real failure under a second error (and, on Ctrl-C,
under a traceback of the session's teardown)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TESTS = '''
import os

leaked = []


def test_passes_leaking():
    leaked.append(os.pipe())


def test_fails_leaking():
    leaked.append(os.pipe())
    assert False, "the real failure"


def test_passes_clean():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
'''


def test_only_passing_tests_are_checked(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, check=False)
    last = proc.stdout.strip().splitlines()[-1]
    assert "1 failed, 2 passed, 1 error" in last, proc.stdout
    assert "ERROR at teardown of test_passes_leaking" in proc.stdout, proc.stdout
    assert "the real failure" in proc.stdout
