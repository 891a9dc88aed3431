"""Real tree pairs for benchmarks, built once and cached under benchmarks/.cache/.

``debian_pair()`` is a Debian bookworm minbase root made with ``debootstrap`` (OLD), and the
same root after ``apt-get upgrade`` with bookworm-security and bookworm-updates enabled in a
chroot (NEW): the update a device really receives. Building needs root and the Debian
mirror; when either is missing, ``fallback_pair()`` gives a real tree of this machine
(``/usr/lib/python3*`` and ``/usr/share/doc``) and a copy with a tenth of its files edited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("BTRDELTA_BENCH_CACHE", Path(__file__).parent / ".cache"))
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"


def _sh(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def _clean_apt(root: Path) -> None:
    for d in ("var/lib/apt/lists", "var/cache/apt"):
        p = root / d
        if p.exists():
            for child in p.iterdir():
                if child.is_file():
                    child.unlink()
    for f in ("var/cache/ldconfig/aux-cache",):
        (root / f).unlink(missing_ok=True)


@contextlib.contextmanager
def _building() -> Iterator[None]:
    """One builder of the cache at a time (two benchmark runs, or a run and a test session,
    on one machine: a second debootstrap into the same directory fails, and each would
    delete the other's half-made tree); the caller checks again whether it is done."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def debian_pair() -> tuple[Path, Path]:
    """(OLD, NEW): bookworm minbase before and after ``apt-get upgrade`` (cached)."""
    old, new = CACHE / "debian-old", CACHE / "debian-new"
    done = CACHE / "debian.done"
    if done.exists():
        return old, new
    with _building():
        if not done.exists():
            _build_debian_pair(old, new, done)
    return old, new


def _build_debian_pair(old: Path, new: Path, done: Path) -> None:
    for d in (old, new):
        if d.exists():
            shutil.rmtree(d)
    _sh("debootstrap", "--variant=minbase", "bookworm", str(old), MIRROR)
    _clean_apt(old)
    _sh("cp", "-a", str(old), str(new))
    (new / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} bookworm main\n"
        f"deb {MIRROR} bookworm-updates main\n"
        f"deb {SECURITY} bookworm-security main\n"
    )
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    _sh("chroot", str(new), "apt-get", "-qq", "update", env=env)
    _sh("chroot", str(new), "apt-get", "-qq", "-y", "upgrade", env=env)
    _sh("chroot", str(new), "apt-get", "clean", env=env)
    _clean_apt(new)
    done.write_text("ok\n")


#: the packages of :func:`debian_install_pair` (27 packages with their dependencies, from
#: bookworm main: Python 3.11 and its libraries, OpenSSL, CA certificates, PyYAML, six)
INSTALL = ("python3", "ca-certificates", "python3-yaml", "python3-six")


def debian_install_pair() -> tuple[Path, Path]:
    """(OLD, NEW): the bookworm minbase root of :func:`debian_pair` (OLD, shared, never
    modified) and a copy of it into which :data:`INSTALL` was installed with ``apt-get
    install --no-install-recommends`` in a chroot (an update that is mostly new files)."""
    old, _ = debian_pair()
    new = CACHE / "debian-install-new"
    done = CACHE / "debian-install.done"
    if done.exists():
        return old, new
    with _building():
        if not done.exists():
            _build_install(old, new, done)
    return old, new


def _build_install(old: Path, new: Path, done: Path) -> None:
    tmp = CACHE / "debian-install-new.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    _sh("cp", "-a", str(old), str(tmp))
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    _sh("chroot", str(tmp), "apt-get", "-qq", "update", env=env)
    _sh("chroot", str(tmp), "apt-get", "-qq", "-y", "install", "--no-install-recommends",
        *INSTALL, env=env)
    _sh("chroot", str(tmp), "apt-get", "clean", env=env)
    _clean_apt(tmp)
    if new.exists():
        shutil.rmtree(new)
    tmp.rename(new)
    done.write_text("ok\n")


def fallback_pair() -> tuple[Path, Path]:
    """(OLD, NEW) from this machine's own files: NEW edits ~10% of OLD's files a little."""
    old, new = CACHE / "local-old", CACHE / "local-new"
    done = CACHE / "local.done"
    if done.exists():
        return old, new
    for d in (old, new):
        if d.exists():
            shutil.rmtree(d)
    old.mkdir(parents=True)
    for src in [*sorted(Path("/usr/lib").glob("python3*"))[:1], Path("/usr/share/doc")]:
        _sh("cp", "-a", str(src), str(old / src.name))
    _sh("cp", "-a", str(old), str(new))
    rng = random.Random(1)
    files = sorted(p for p in new.rglob("*") if p.is_file() and not p.is_symlink())
    for p in rng.sample(files, len(files) // 10):
        data = bytearray(p.read_bytes())
        for _ in range(3):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        p.write_bytes(bytes(data))
    done.write_text("ok\n")
    return old, new


def real_pair() -> tuple[str, Path, Path]:
    """(name, OLD, NEW): the Debian pair if it can be built here, else the local one."""
    try:
        return ("debian-bookworm-minbase-upgrade", *debian_pair())
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        print(f"# debootstrap pair unavailable ({exc}; {detail[-200:]!r}); using local trees")
        return ("local-usr-lib-python", *fallback_pair())


def rebuilt_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with new inodes for every file (a release rebuilt from scratch)."""
    if dst.exists():
        shutil.rmtree(dst)
    _sh("cp", "-a", "--reflink=never", str(src), str(dst))
    return dst
