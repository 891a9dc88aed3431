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
from collections.abc import Callable, Iterator
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


def cached_pair(old: Path, new: Path, done: Path,
                build: Callable[[Path, Path, Path], None]) -> tuple[Path, Path]:
    """(OLD, NEW), made by ``build(old, new, done)`` unless ``done`` says they are (one
    builder at a time: :func:`_building`; ``build`` writes ``done`` last)."""
    if not done.exists():
        with _building():
            if not done.exists():
                build(old, new, done)
    return old, new


def debian_pair() -> tuple[Path, Path]:
    """(OLD, NEW): bookworm minbase before and after ``apt-get upgrade`` (cached)."""
    return cached_pair(CACHE / "debian-old", CACHE / "debian-new", CACHE / "debian.done",
                       _build_debian_pair)


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
    return cached_pair(debian_pair()[0], CACHE / "debian-install-new",
                       CACHE / "debian-install.done", _build_install)


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


#: app releases that are not wheels (``benchmarks delta``'s app rows): (name, version) ->
#: the archives unpacked into one tree, each (URL, fallback URL, SHA-256). Debian's pool
#: drops a version once superseded: snapshot.debian.org keeps every file by its SHA-1
_DEBIAN = "http://deb.debian.org/debian/pool/main/"
_SECURITY = "http://deb.debian.org/debian-security/pool/updates/main/"
_SNAPSHOT = "https://snapshot.debian.org/file/"
_NPM = "https://registry.npmjs.org/"
ARCHIVES: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {
    ("typescript", "5.4.4"): ((
        _NPM + "typescript/-/typescript-5.4.4.tgz", "",
        "0a5b3b80f055936eef797431778bbb3c39c1a4d3fcdbea16f9ac9dc343454c48"),),
    ("typescript", "5.4.5"): ((
        _NPM + "typescript/-/typescript-5.4.5.tgz", "",
        "154fae77169f04155ac52d521ac59abb07c9be29ea3744732adbf9f14abb2440"),),
    ("nodejs", "18.20.4+dfsg-1~deb12u2"): (
        (_DEBIAN + "n/nodejs/libnode108_18.20.4+dfsg-1~deb12u2_amd64.deb",
         _SNAPSHOT + "128655242efd46b2ba2031c0bc2cf7a65c1d2eb3",
         "49c281c5fa259fa453a257e9cb0fcfb4385917ee21008ef1acbb5de2a9bb88a6"),
        (_DEBIAN + "n/nodejs/nodejs_18.20.4+dfsg-1~deb12u2_amd64.deb",
         _SNAPSHOT + "389fb3ff856691e07c911f7ab60c36620ade8240",
         "ed733bcac17b24e6a1642f0dc2b71ae95513388197395a7736940df6c3c24cfc")),
    ("nodejs", "18.20.4+dfsg-1~deb12u3"): (
        (_SECURITY + "n/nodejs/libnode108_18.20.4+dfsg-1~deb12u3_amd64.deb",
         _SNAPSHOT + "0a0f6122acad276fda1dfa914f4dc40c9b55f7e6",
         "4d1b4ba623b2f65a1b8a9524d3ecccd535388acbac1f9ce810eab017bbc01036"),
        (_SECURITY + "n/nodejs/nodejs_18.20.4+dfsg-1~deb12u3_amd64.deb",
         _SNAPSHOT + "0597e22ea6a42a70e9edd1f04c17c4569baef2f4",
         "97d0944c0da81b0acd4c6d58e7d5a2894f89aa66067400a86c9ecb0b76969ecc")),
    ("containerd", "1.6.20~ds1-1+deb12u2"): ((
        _SECURITY + "c/containerd/containerd_1.6.20~ds1-1+deb12u2_amd64.deb",
        _SNAPSHOT + "0adaed412ba059ae427eadd1c17bc5885184676b",
        "97a18ebff2326b96ce9bd7b1904bba4204525b678744294ab78d76acb6f3af62"),),
    ("containerd", "1.6.20~ds1-1+deb12u3"): ((
        _DEBIAN + "c/containerd/containerd_1.6.20~ds1-1+deb12u3_amd64.deb",
        _SNAPSHOT + "e02e060cfddc39750c77c0be214518335f8b82f1",
        "8669d264eeb0fcdb4a0b1ba436ab88ec5dafde4a66e1278ec279d830db4c2216"),),
}
#: the time every directory of an unpacked archive gets (as wheels' trees)
_DIR_TIME = 1_700_000_000


def _fetch(urls: tuple[str, ...], sha256: str, dest: Path) -> bool:
    """``dest`` downloaded from the first of ``urls`` that gives the SHA-256 (kept if it
    has it already)."""
    import hashlib
    import urllib.request

    def good(p: Path) -> bool:
        return p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == sha256

    if good(dest):
        return True
    tmp = dest.with_name(dest.name + ".part")
    for url in filter(None, urls):
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f)
        except OSError:
            continue
        if good(tmp):
            tmp.rename(dest)
            return True
    tmp.unlink(missing_ok=True)
    return False


def archive_tree(name: str, version: str) -> Path | None:
    """The tree of :data:`ARCHIVES`' ``(name, version)`` below the cache (downloaded, its
    checksums checked, and unpacked on first use: ``.deb`` files by ``dpkg-deb -x``, npm
    ``.tgz`` by ``tar``, each file's mode and mtime from the archive, directories at a fixed
    time); ``None`` when it cannot be downloaded."""
    dest = CACHE / "apps" / f"{name}-{version}"
    if dest.is_dir():
        return dest
    dl = CACHE / "apps" / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for url, alt, sha in ARCHIVES[(name, version)]:
        f = dl / url.rsplit("/", 1)[1]
        if not _fetch((url, alt), sha, f):
            shutil.rmtree(tmp)
            return None
        if f.suffix == ".deb":
            _sh("dpkg-deb", "-x", str(f), str(tmp))
        else:
            _sh("tar", "-xzf", str(f), "-C", str(tmp), "--no-same-owner")
    for root, _dirs, _files in os.walk(tmp, topdown=False):
        os.utime(root, (_DIR_TIME, _DIR_TIME), follow_symlinks=False)
    tmp.rename(dest)
    return dest
