"""``btrdelta._zstd``: zstandard's C backend without the package's ``__init__``, the same
objects a later ``import zstandard`` exports; the package itself where the import policy
asks for another backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_CHECK = """
import sys
from btrdelta._zstd import zstd
before = sorted(m for m in ("typing", "zstandard", "platform") if m in sys.modules)
data = zstd.ZstdCompressor(level=1).compress(b"btrdelta " * 1000)
import zstandard
print(zstd.__name__, before, zstandard.ZstdError is zstd.ZstdError,
      zstandard.ZstdCompressor is zstd.ZstdCompressor, zstandard.decompress(data)[:8])
"""


def _run(**env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                          check=False, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_c_backend_without_the_package() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_ZSTANDARD_IMPORT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "zstandard.backend_c [] True True b'btrdelta'"


@pytest.mark.parametrize("policy", ["cffi_fallback", "cext"])
def test_another_import_policy_takes_the_package(policy: str) -> None:
    assert _run(PYTHON_ZSTANDARD_IMPORT_POLICY=policy).startswith("zstandard ")
