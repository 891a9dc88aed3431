"""Real release trees for tests and benchmarks: consecutive releases of a PyPI wheel with
native libraries, downloaded once with ``pip download`` and unpacked deterministically
(each file's mode and mtime from the wheel's zip entry, directories at a fixed time), so
the same release always gives the same tree.
"""

from __future__ import annotations

import calendar
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["MARKUPSAFE", "REGEX", "release_trees", "unpack_wheel"]

#: nine consecutive MarkupSafe releases (a C extension; ~120 KiB trees: unit tests)
MARKUPSAFE = ("markupsafe", ("2.1.2", "2.1.3", "2.1.4", "2.1.5", "3.0.0", "3.0.1", "3.0.2",
                             "3.0.3", "3.0.4"))
#: eight consecutive regex releases (~3 MB trees, a 2.5 MB shared library: benchmarks)
REGEX = ("regex", ("2024.4.16", "2024.4.28", "2024.5.10", "2024.5.15", "2024.7.24",
                   "2024.9.11", "2024.11.6", "2025.7.34"))
_DIR_TIME = 1_700_000_000


def unpack_wheel(wheel: Path, dest: Path) -> None:
    """Unpack ``wheel`` into ``dest`` with modes and mtimes from the zip entries."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = Path(z.extract(info, dest))
            mode = (info.external_attr >> 16) & 0o7777
            if mode and not info.is_dir():
                os.chmod(path, mode)
            t = calendar.timegm((*info.date_time, 0, 0, -1))
            os.utime(path, (t, t))
    for root, _dirs, _files in os.walk(dest, topdown=False):
        os.utime(root, (_DIR_TIME, _DIR_TIME))


def release_trees(package: str, versions: tuple[str, ...], cache: Path) -> list[Path] | None:
    """The unpacked trees of ``package`` at ``versions`` below ``cache`` (downloaded and
    unpacked on first use); ``None`` when ``pip download`` cannot get them."""
    wheels = cache / "wheels"
    out = []
    for ver in versions:
        tree = cache / f"{package}-{ver}"
        if not tree.exists():
            wheels.mkdir(parents=True, exist_ok=True)
            found = sorted(wheels.glob(f"{package}-{ver}-*.whl"), key=str) or sorted(
                p for p in wheels.glob("*.whl") if p.name.lower().startswith(
                    f"{package}-{ver}-"))
            if not found:
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                     "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
                     "--python-version", "3.11", "-d", str(wheels), f"{package}=={ver}"],
                    capture_output=True, check=False)
                found = sorted(p for p in wheels.glob("*.whl")
                               if p.name.lower().startswith(f"{package}-{ver}-"))
                if proc.returncode != 0 or not found:
                    return None
            tmp = tree.with_name(tree.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            unpack_wheel(found[0], tmp)
            tmp.rename(tree)
        out.append(tree)
    return out
