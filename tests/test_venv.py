"""The venv ``make`` builds (what ``make demo`` and the benchmarks run) starts its processes
with no import of its own: no ``.pth`` file there imports a module (setuptools'
``distutils-precedence.pth`` imported ``_distutils_hack`` and put its finder before every
import: ~0.5 ms of each ``btrdelta`` command; the Makefile removes the venv's setuptools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]


def test_the_venvs_processes_start_with_no_pth_import() -> None:
    if Path(sys.prefix).resolve() != (_ROOT / ".venv").resolve():
        pytest.skip("not the venv the Makefile builds")
    site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    importing = [p.name for p in Path(site).glob("*.pth")
                 if any(line.startswith(("import ", "import\t"))
                        for line in p.read_text().splitlines())]
    assert importing == []
    proc = subprocess.run([sys.executable, "-c", "import sys; print(sorted(sys.modules))"],
                          capture_output=True, text=True, check=True)
    assert "_distutils_hack" not in proc.stdout
    assert not any(type(f).__module__.startswith("_distutils_hack")
                   for f in sys.meta_path)
