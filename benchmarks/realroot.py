"""Real Debian roots of realistic size for benchmarks (``BTRDELTA_BENCH_REALROOT=1``).

``realroot_pair()`` is (OLD, NEW): OLD is a Debian bookworm root made with ``debootstrap``
from the last point release (``bookworm``) with a standard server/developer package set
(:data:`PACKAGES`: systemd, OpenSSH, Python 3 full, Perl, GCC, Git, Vim, man pages, locales:
about 1 GB and 50 k files, 10-30x the minbase trees of :mod:`benchmarks.trees`); NEW is a
copy of OLD after ``apt-get upgrade`` with bookworm-updates and bookworm-security enabled
(months of security updates after the point release) and :data:`MORE` installed: the update a
real server receives. Cached under ``$BTRDELTA_BENCH_CACHE/realroot-{old,new}``; building
needs root and the Debian mirror (5-20 min). ``python -m benchmarks.realroot`` builds them;
``BTRDELTA_BENCH_REALROOT=1 python -m benchmarks realroot`` runs every engine on them
(:mod:`benchmarks.bench_realroot`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from benchmarks.trees import CACHE, MIRROR, SECURITY, _clean_apt, _sh, cached_pair

#: OLD's packages (installed with their dependencies and recommendations into the
#: ``debootstrap`` of priority important and above)
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3-full", "python3-pip",
    "python3-numpy", "perl", "build-essential", "gdb", "vim", "git", "curl", "wget",
    "locales", "man-db", "manpages", "manpages-dev", "less", "sudo", "rsync", "iproute2",
    "iputils-ping", "ca-certificates", "gnupg", "bash-completion", "file", "htop", "tmux",
    "strace", "lsof", "cron", "logrotate", "btrfs-progs", "e2fsprogs", "zstd", "xz-utils",
)
#: installed into NEW after the upgrade (a few more applications: mostly new files)
MORE = ("nginx", "postgresql-client", "python3-yaml", "jq")

_ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C"}


def realroot_pair() -> tuple[Path, Path]:
    """(OLD, NEW): the bookworm server root before and after its update (cached)."""
    return cached_pair(CACHE / "realroot-old", CACHE / "realroot-new",
                       CACHE / "realroot.done", _build)


def _apt(root: Path, *args: str) -> None:
    _sh("chroot", str(root), "apt-get", "-qq", "-y", *args, env=_ENV)


@contextlib.contextmanager
def _no_services(root: Path) -> Iterator[None]:
    """No service starts in the chroot while packages install (``policy-rc.d`` says 101):
    sshd or nginx would otherwise run on this machine's ports."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink()


def _build(old: Path, new: Path, done: Path) -> None:
    for d in (old, new):
        if d.exists():
            shutil.rmtree(d)
    tmp = old.with_name(old.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _sh("debootstrap", "bookworm", str(tmp), MIRROR, env=_ENV)
    with _no_services(tmp):
        _apt(tmp, "update")
        _apt(tmp, "install", *PACKAGES)
    _apt(tmp, "clean")
    _clean_apt(tmp)
    tmp.rename(old)
    tmp = new.with_name(new.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _sh("cp", "-a", str(old), str(tmp))
    (tmp / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} bookworm main\n"
        f"deb {MIRROR} bookworm-updates main\n"
        f"deb {SECURITY} bookworm-security main\n"
    )
    with _no_services(tmp):
        _apt(tmp, "update")
        _apt(tmp, "upgrade")
        _apt(tmp, "install", *MORE)
    _apt(tmp, "clean")
    _clean_apt(tmp)
    tmp.rename(new)
    done.write_text("ok\n")


if __name__ == "__main__":
    for p in realroot_pair():
        print(p)
    sys.exit(0)
