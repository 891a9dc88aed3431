"""A real release pair made from this Debian machine's own packages, without the network.

The device tests take the Debian bookworm minbase pair of ``benchmarks/trees.py`` where it is
cached (``debootstrap``, then ``apt-get upgrade``: the better data). Where it is not (a fresh
machine, CI's clean clone: building it needs the Debian mirror), :func:`build` makes a pair
of the same kind from the packages installed here:

OLD
    a minbase root: the files of the installed packages that ``debootstrap --variant=minbase``
    installs (the Essential and required ones, apt, and what they depend on), copied from
    ``/`` by ``tar`` with their owners, modes, times, hard links and xattrs; dpkg's status and
    info files of those packages; ``/etc/passwd`` and ``/etc/group`` from base-passwd's
    masters, apt's ``sources.list`` and the device nodes as debootstrap writes them; dpkg's
    log of the installs.
NEW
    OLD after a point release's ``apt-get upgrade`` as dpkg makes one, of the packages
    :data:`UPGRADED` (those the cached pair's real upgrade changed): each one's version
    raised in dpkg's status; every file of it written anew (a new inode, the new release's
    time); its ELF files rebuilt (a new build ID and debug-link CRC; in the packages of
    :data:`FIXED` 37 bytes of code inserted and the code after them moved, as when a
    function grows); its changelogs given a new entry; most of its time zone files a small
    edit; its md5sums computed again. Besides: a conffile moved (apt's ``01autoremove`` to
    ``20autoremove``, as ``dpkg-maintscript-helper mv_conffile`` does), apt's rsh and ssh
    methods removed, a library of :data:`FIXED` renamed to the next upstream version
    (``libzstd.so.1.5.4`` → ``1.5.5``, its SONAME link following), America/Coyhaique added
    where the machine lacks it; dpkg's status kept as ``status-old``, its log appended to,
    apt's history, term log and extended states written; a mode, an owner and a file
    capability (``security.capability``) changed.

The build takes 5-15 s on 2 busy cores (~130 MB, ~6,500 entries per tree; the Debian pair:
158 MB, 6,763). Everything is derived from the files and a fixed seed: on one machine, the
same pair each time (the tests take their tree-sums from the trees, never a constant).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

#: the packages the cached pair's ``apt-get upgrade`` changed (bookworm, session 20)
UPGRADED = ("apt", "libapt-pkg6.0", "liblzma5", "libpam-modules", "libpam-modules-bin",
            "libpam-runtime", "libpam0g", "libpcre2-8-0", "libzstd1", "perl-base", "tzdata",
            "zlib1g")
#: of those, the ones whose code changed (security fixes) besides being rebuilt
FIXED = ("libzstd1", "zlib1g", "libpam-modules", "liblzma5")
#: the times of OLD's files that this module writes, and of NEW's upgrade (2026-11-03 12:55:59)
OLD_TIME, NEW_TIME = 1_790_000_000, 1_793_710_559
#: debootstrap's device nodes: name, (major, minor)
DEVICES = {"console": (5, 1), "full": (1, 7), "null": (1, 3), "ptmx": (5, 2), "random": (1, 8),
           "tty": (5, 0), "urandom": (1, 9), "zero": (1, 5)}
_DPKG = Path("var/lib/dpkg")
#: what a package may list but is the running system's, not a release's (made empty instead)
_VIRTUAL = ("..", "dev", "proc", "run", "sys", "tmp")


class NoPackages(Exception):
    """This machine has no dpkg database to make a release of."""


def _stanzas(status: str) -> list[tuple[str, dict[str, str]]]:
    """dpkg's status file: (the stanza's text, its fields)."""
    out = []
    for text in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", text, re.M))
        if "Package" in fields:
            out.append((text.strip("\n"), fields))
    return out


def minbase(root: Path = Path("/")) -> list[tuple[str, dict[str, str]]]:
    """The stanzas of the installed packages a minbase root has, in the status file's order:
    the Essential and required ones and apt, with their (pre-)dependencies."""
    path = root / _DPKG / "status"
    if not path.is_file():
        raise NoPackages(f"{path} not found: not a Debian machine")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    installed = {f["Package"]: (text, f) for text, f in _stanzas(path.read_text())
                 if f.get("Status", "").endswith(" installed")
                 and f.get("Architecture") in (arch, "all")}
    todo = [n for n, (_, f) in installed.items()
            if f.get("Essential") == "yes" or f.get("Priority") == "required"] + ["apt"]
    chosen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in chosen or name not in installed:
            continue
        chosen.add(name)
        fields = installed[name][1]
        for dep in ",".join((fields.get("Pre-Depends", ""), fields.get("Depends", ""))).split(","):
            alts = [re.split(r"[\s:(]", a.strip())[0] for a in dep.split("|") if a.strip()]
            todo.extend([a for a in alts if a in installed][:1])
    if "apt" not in chosen:
        raise NoPackages("apt is not installed here")
    return [v for n, v in installed.items() if n in chosen]


def _info_files(root: Path, names: set[str]) -> list[str]:
    """dpkg's info files of the packages ``names`` (``pkg.list``, ``pkg:arch.md5sums``, ...)
    and its layout's version (``format``)."""
    return sorted(f"{_DPKG}/info/{f}" for f in os.listdir(root / _DPKG / "info")
                  if f.rpartition(".")[0].split(":")[0] in names or f == "format")


def _owned(root: Path, pkg: str) -> list[str]:
    """The paths of a package's list (``dpkg -L``), relative, as they are on disk here (a
    path through a symlinked directory such as ``/bin`` is taken where it leads)."""
    info = root / _DPKG / "info"
    lists = [info / f"{pkg}.list", *info.glob(f"{pkg}:*.list")]
    out = []
    for path in (p for p in lists if p.exists()):
        for line in path.read_text().splitlines():
            if line in ("", "/."):
                continue
            real = os.path.join(os.path.realpath(os.path.dirname(root / line.lstrip("/"))),
                                os.path.basename(line))
            rel = os.path.relpath(real, root)
            if os.path.lexists(real) and rel.split("/")[0] not in _VIRTUAL and rel != "..":
                out.append(rel)
    return out


def _copy(paths: Iterable[str], dst: Path) -> None:
    """``tar`` the relative ``paths`` of ``/`` (not their contents) into ``dst``: owners,
    modes, times, hard links, xattrs (file capabilities too)."""
    wanted: set[str] = set()
    for rel in paths:
        while rel not in ("", ".") and rel not in wanted:
            wanted.add(rel)
            rel = os.path.dirname(rel)
    dst.mkdir(parents=True, exist_ok=True)
    xattrs = ("--xattrs", "--xattrs-include=*")
    with tempfile.TemporaryFile() as listing:
        # each directory right before what it holds: tar sets a directory's time when it
        # leaves it, and an entry of it coming later would change that time again
        listing.write("".join(f"{p}\0" for p in sorted(wanted, key=lambda p: p.split("/")))
                      .encode())
        listing.seek(0)
        create = subprocess.Popen(["tar", "-C", "/", "--null", "--no-recursion", "-T", "-",
                                   *xattrs, "-cf", "-"], stdin=listing, stdout=subprocess.PIPE)
        extract = subprocess.run(["tar", "-C", str(dst), *xattrs, "--numeric-owner", "-xpf", "-"],
                                 stdin=create.stdout, check=False)
        if create.stdout:  # a failed extract ends the create (SIGPIPE), not blocks it
            create.stdout.close()
        if create.wait() != 0 or extract.returncode != 0:
            raise RuntimeError(f"copying {len(wanted)} paths of / into {dst} failed")


def _write(path: Path, data: bytes, like: os.stat_result | None = None, mode: int = 0o644,
           mtime: int = NEW_TIME) -> None:
    """Write a file as dpkg does: a new inode renamed over the old one, the owner and mode of
    ``like`` (or root and ``mode``), the time ``mtime``."""
    tmp = path.with_name(path.name + ".dpkg-new")
    tmp.write_bytes(data)
    os.chown(tmp, like.st_uid if like else 0, like.st_gid if like else 0)
    os.chmod(tmp, stat.S_IMODE(like.st_mode) if like else mode)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)
    _touched(path, mtime)


def _touched(path: Path, mtime: int = NEW_TIME) -> None:
    """The time of the directory whose entry ``path`` changed (as when the release's
    install changed it: the same in every build)."""
    os.utime(path.parent, (mtime, mtime))


def build_old(dst: Path, root: Path = Path("/")) -> None:
    """OLD: the minbase root of this machine's packages (see the module's docstring)."""
    stanzas = minbase(root)
    names = {f["Package"] for _, f in stanzas}
    paths = [p for n in sorted(names) for p in _owned(root, n)]
    top = [e.name for e in os.scandir(root)  # merged /usr: /bin -> usr/bin, ...
           if e.is_symlink() and e.name.startswith(("bin", "sbin", "lib"))]
    _copy([*top, *paths, *_info_files(root, names)], dst)
    status = "\n\n".join(text for text, _ in stanzas) + "\n"
    _write(dst / _DPKG / "status", status.encode(), mtime=OLD_TIME)
    log = "".join(f"2026-09-01 12:00:00 status installed {f['Package']}:{f['Architecture']} "
                  f"{f['Version']}\n" for _, f in stanzas)
    (dst / "var/log").mkdir(parents=True, exist_ok=True)
    _write(dst / "var/log/dpkg.log", log.encode(), mtime=OLD_TIME)
    for name in ("passwd", "group"):
        master = dst / f"usr/share/base-passwd/{name}.master"
        if master.exists():
            _write(dst / "etc" / name, master.read_bytes(), mtime=OLD_TIME)
    codename = re.search(r"^VERSION_CODENAME=(\S+)", (root / "etc/os-release").read_text(), re.M)
    (dst / "etc/apt").mkdir(parents=True, exist_ok=True)
    _write(dst / "etc/apt/sources.list", f"deb http://deb.debian.org/debian "
           f"{codename.group(1) if codename else 'bookworm'} main\n".encode(), mtime=OLD_TIME)
    for sub in ("home", "dev/pts", "proc", "run", "sys", "tmp", "root"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(dst / "tmp", 0o1777)
    for name, (major, minor) in DEVICES.items():
        os.mknod(dst / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dst / "dev" / name, 0o666)
    os.symlink("/proc/self/fd", dst / "dev/fd")
    for name in [*DEVICES, "fd"]:
        os.utime(dst / "dev" / name, (OLD_TIME, OLD_TIME), follow_symlinks=False)
    for sub in ("home", "dev/pts", "dev", "proc", "run", "sys", "tmp", "root", "var/log", "etc/apt",
                "etc", "."):
        os.utime(dst / sub, (OLD_TIME, OLD_TIME))


def _bump(version: str) -> str:
    """The next point release's version: ``X+deb12uN`` → ``X+deb12u(N+1)``, else ``X+deb12u1``."""
    m = re.search(r"deb(\d+)u(\d+)$", version)
    if m:
        return f"{version[:m.start(2)]}{int(m.group(2)) + 1}"
    return f"{version}+deb12u1"


def _sections(data: bytes) -> dict[bytes, tuple[int, int]]:
    """An ELF64 little-endian file's sections: name → (offset, size); {} for anything else."""
    if data[:6] != b"\x7fELF\x02\x01" or len(data) < 64:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if not shoff or shoff + shnum * shentsize > len(data) or shstrndx >= shnum:
        return {}
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = heads[shstrndx][4]
    out = {}
    for name, _, _, _, offset, size in heads:
        end = data.find(b"\0", names_at + name)
        out[data[names_at + name:end]] = (offset, size)
    return out


def _rebuilt(data: bytes, rng: random.Random, fixed: bool) -> bytes:
    """An ELF file as a rebuild of a new version leaves it: a new build ID, a new CRC in the
    debug link; with ``fixed``, a few bytes of code changed too."""
    sections = _sections(data)
    out = bytearray(data)
    if b".note.gnu.build-id" in sections:
        offset, size = sections[b".note.gnu.build-id"]
        if size > 16:  # the note's header (16 bytes), then the ID
            new_id = hashlib.sha1(data[offset:offset + size]).digest()
            out[offset + 16:offset + size] = new_id[:size - 16]
    if b".gnu_debuglink" in sections:
        offset, size = sections[b".gnu_debuglink"]
        out[offset + size - 4:offset + size] = struct.pack("<I", zlib.crc32(out))
    if fixed and b".text" in sections and sections[b".text"][1] >= 4096:
        # a function that grew: the code after it up to a later one that shrank moves
        offset, size = sections[b".text"]
        grew = offset + rng.randrange(size // 2)
        shrank = grew + rng.randrange(64, size // 2)
        out[grew:shrank] = rng.randbytes(37) + out[grew:shrank - 37]
    return bytes(out)


def _changelog(data: bytes, source: str, version: str) -> bytes:
    """A ``changelog.Debian.gz`` with the new version's entry first (``gzip -9n``)."""
    entry = (f"{source} ({version}) bookworm; urgency=medium\n\n"
             f"  * Point release update (the device tests' upgrade).\n\n"
             f" -- btrdelta tests <tests@btrdelta.invalid>  Mon, 02 Nov 2026 12:55:59 +0000\n\n")
    return gzip.compress(entry.encode() + gzip.decompress(data), 9, mtime=0)


def _edited(rel: str, data: bytes, source: str, version: str, fixed: bool) -> bytes:
    """A file of an upgraded package as the new version has it."""
    rng = random.Random(rel)
    if data[:4] == b"\x7fELF":
        return _rebuilt(data, rng, fixed)
    if re.search(r"/changelog(\.Debian)?\.gz$", rel):
        return _changelog(data, source, version)
    if data[:4] == b"TZif" and len(data) > 64 and rng.random() < 0.7:
        out = bytearray(data)  # four bytes of its data (after the 44-byte header) changed
        at = rng.randrange(44, len(data) - 4)
        out[at:at + 4] = rng.randbytes(4)
        return bytes(out)
    return data


def _md5sums(tree: Path, listed: str) -> str:
    """An ``md5sums`` file computed again for the files it names."""
    lines = []
    for line in listed.splitlines():
        rel = line[34:]
        real = os.path.join(os.path.realpath(os.path.dirname(tree / rel)), os.path.basename(rel))
        if os.path.isfile(real):
            lines.append(f"{hashlib.md5(Path(real).read_bytes()).hexdigest()}  {rel}\n")
    return "".join(lines)


def _upgrade_package(new: Path, pkg: str, source: str, version: str) -> None:
    """dpkg's unpack of ``pkg``'s new version over NEW: every file anew, md5sums again."""
    done: dict[tuple[int, int], Path] = {}
    for rel in sorted(set(_owned(new, pkg))):
        path = new / rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):  # unpacked anew: the new release's time
            os.utime(path, (NEW_TIME, NEW_TIME), follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or rel.startswith("etc/"):
            continue  # directories, links, conffiles stay
        if (st.st_dev, st.st_ino) in done:  # a hard link of a file written already
            os.unlink(path)
            os.link(done[st.st_dev, st.st_ino], path)
            _touched(path)
            continue
        xattrs = {name: os.getxattr(path, name) for name in os.listxattr(path)}
        _write(path, _edited(rel, path.read_bytes(), source, version, pkg in FIXED), like=st)
        for name, value in xattrs.items():  # after the owner: chown drops a file capability
            os.setxattr(path, name, value)
        done[st.st_dev, st.st_ino] = path
    info = new / _DPKG / "info"
    for md5 in [info / f"{pkg}.md5sums", *info.glob(f"{pkg}:*.md5sums")]:
        if md5.exists():
            _write(md5, _md5sums(new, md5.read_text()).encode(), like=md5.lstat())


def _relist(new: Path, pkg: str, add: Iterable[str] = (), drop: Iterable[str] = (),
            moves: dict[str, str] | None = None) -> None:
    """Files a package's new version adds, drops and moves (relative paths): on disk (adding
    is the caller's), in its list and its md5sums (the sums of added files are computed by
    :func:`_upgrade_package`)."""
    moves = moves or {}
    gone, add = set(drop), list(add)
    info = new / _DPKG / "info"

    def renamed(rel: str) -> str | None:
        return None if rel in gone else moves.get(rel, rel)

    for path in [info / f"{pkg}.list", *info.glob(f"{pkg}:*.list")]:
        if path.exists():
            lines = {f"/{r}" for x in path.read_text().splitlines() if (r := renamed(x[1:]))}
            _write(path, ("\n".join(sorted({*lines, *(f"/{p}" for p in add)})) + "\n").encode(),
                   like=path.lstat())
    for path in [info / f"{pkg}.md5sums", *info.glob(f"{pkg}:*.md5sums")]:
        if path.exists():
            sums = [f"{x[:34]}{r}" for x in path.read_text().splitlines() if (r := renamed(x[34:]))]
            _write(path, "".join(f"{x}\n" for x in [*sums, *(f"{'0' * 32}  {p}" for p in add)])
                   .encode(), like=path.lstat())
    for rel in gone:
        os.unlink(new / rel)
        _touched(new / rel)
    for rel, to in moves.items():
        os.rename(new / rel, new / to)
        _touched(new / rel)
        _touched(new / to)


def _soname_move(new: Path) -> tuple[str, dict[str, str]] | None:
    """A library of :data:`FIXED` whose upstream version the upgrade raises:
    ``libzstd.so.1.5.4`` → ``libzstd.so.1.5.5``, its SONAME link pointing there."""
    for pkg in FIXED:
        for rel in sorted(_owned(new, pkg)):
            m = re.search(r"\.so\.\d+\.\d+\.(\d+)$", rel)
            if m and (new / rel).is_file() and not (new / rel).is_symlink():
                to = f"{rel[:m.start(1)]}{int(m.group(1)) + 1}"
                return pkg, {rel: to}
    return None


def upgrade(old: Path, new: Path) -> None:
    """NEW: ``cp -a`` of OLD, then the point release's upgrade (see the module's docstring)."""
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    stanzas = _stanzas((new / _DPKG / "status").read_text())
    # files added, dropped and moved by the new versions
    zones = new / "usr/share/zoneinfo"
    if (zones / "America/Santiago").is_file() and not (zones / "America/Coyhaique").exists():
        shutil.copy2(zones / "America/Santiago", zones / "America/Coyhaique")
        _touched(zones / "America/Coyhaique")
        _relist(new, "tzdata", add=["usr/share/zoneinfo/America/Coyhaique"])
    methods = "usr/lib/apt/methods"
    conf = ("etc/apt/apt.conf.d/01autoremove", "etc/apt/apt.conf.d/20autoremove")
    _relist(new, "apt", drop=[f"{methods}/{m}" for m in ("rsh", "ssh")
                              if os.path.lexists(new / methods / m)],
            moves=dict([conf]) if (new / conf[0]).is_file() else {})
    soname = _soname_move(new)
    if soname:
        pkg, moves = soname
        _relist(new, pkg, moves=moves)
        for rel, to in moves.items():
            for link in (new / rel).parent.iterdir():
                if link.is_symlink() and os.readlink(link) == os.path.basename(rel):
                    link.unlink()
                    link.symlink_to(os.path.basename(to))
                    os.utime(link, (NEW_TIME, NEW_TIME), follow_symlinks=False)
                    _touched(link)
    # the packages' new versions: files, md5sums, dpkg's status
    upgraded, texts = [], []
    for text, fields in stanzas:
        pkg = fields["Package"]
        if pkg in UPGRADED:
            version = _bump(fields["Version"])
            _upgrade_package(new, pkg, fields.get("Source", pkg).split(" ")[0], version)
            upgraded.append((pkg, fields["Architecture"], fields["Version"], version))
            text = re.sub(r"^Version: .*$", f"Version: {version}", text, count=1, flags=re.M)
            text = text.replace(f" /{conf[0]} ", f" /{conf[1]} ")
        texts.append(text)
    # dpkg keeps the status it replaces as status-old, apt its history and what it installed
    status = new / _DPKG / "status"
    os.replace(status, new / _DPKG / "status-old")
    _write(status, ("\n\n".join(texts) + "\n").encode(), like=(new / _DPKG / "status-old").lstat())
    stamp = "2026-11-02 12:55:59"
    log = (new / "var/log/dpkg.log").read_text() + "".join(
        f"{stamp} upgrade {p}:{a} {w} {n}\n{stamp} status installed {p}:{a} {n}\n"
        for p, a, w, n in upgraded)
    _write(new / "var/log/dpkg.log", log.encode(), like=(new / "var/log/dpkg.log").lstat())
    (new / "var/log/apt").mkdir(parents=True, exist_ok=True)
    when = stamp.replace(" ", "  ")
    _write(new / "var/log/apt/history.log", (
        f"\nStart-Date: {when}\nCommandline: apt-get -y upgrade\nUpgrade: "
        + ", ".join(f"{p}:{a} ({w}, {n})" for p, a, w, n in upgraded) + f"\nEnd-Date: {when}\n"
    ).encode())
    _write(new / "var/log/apt/term.log", "".join(
        f"Preparing to unpack .../{p}_{n}_{a}.deb ...\nUnpacking {p}:{a} ({n}) over ({w}) ...\n"
        for p, a, w, n in upgraded).encode(), mode=0o640)
    (new / "var/lib/apt").mkdir(parents=True, exist_ok=True)
    _write(new / "var/lib/apt/extended_states", "".join(
        f"Package: {p}\nArchitecture: {a}\nAuto-Installed: 1\n\n"
        for p, a, _, _ in upgraded if p.startswith("lib")).encode())
    # a mode, an owner and a file capability changed by the new versions
    if (new / "usr/lib/apt/apt.systemd.daily").is_file():
        os.chmod(new / "usr/lib/apt/apt.systemd.daily", 0o750)
    os.chown(new / "var/log/apt", 0, 4)  # root:adm
    helper = new / "usr/lib/apt/apt-helper"
    if helper.is_file():  # cap_net_raw, permitted and effective (VFS_CAP_REVISION_2)
        os.setxattr(helper, "security.capability",
                    struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0))


def build(out: Path) -> tuple[Path, Path]:
    """(OLD, NEW) under ``out``, made from this machine's packages."""
    old, new = out / "old", out / "new"
    build_old(old)
    upgrade(old, new)
    return old, new
