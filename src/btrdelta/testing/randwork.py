"""Seeded random workloads on a real filesystem (the fsstress of upstream's btrfs/007).

:func:`build` fills an empty directory with a random tree (``ops`` operations) and
:func:`mutate` changes an existing one (``ops`` more), both deterministic for a seed: every
choice comes from ``random.Random(seed)`` over the *sorted* listing of the tree as it is on
disk, so a failing seed is reproduced by running it again (see
``tests/randwork/test_randwork.py`` and ``make randwork``).

Operations: directories, files of random sizes written in pieces with holes between them
(compressible and random bytes), appends, overwrites in the middle, truncates (shrink and
grow), reflinks of whole files (FICLONE) and 4 KiB-aligned ranges (FICLONERANGE, into the
same file too), hard links, symlinks, renames over existing names, directory moves,
swaps of two entries through a third name, parent/child directory inversions, deletes of
files and of whole directories, user xattrs set and removed, modes, owners, times, fifos,
character and block device nodes, preallocation past EOF (``fallocate -k``) and hole
punching. Needs root (owners, device nodes) and a filesystem with reflinks for the reflink
operations (they fall back to plain copies elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from ..fs.btrfs import clone_range, fallocate

__all__ = ["build", "mutate"]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLOCK = 4096


class _Work:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.counter = 0

    # -- the tree as it is now (sorted, so choices are reproducible) ---------------------
    def _walk(self) -> tuple[list[Path], list[Path], list[Path]]:
        dirs: list[Path] = [self.root]
        files: list[Path] = []
        others: list[Path] = []
        for top, dnames, fnames in os.walk(self.root):
            dnames.sort()
            t = Path(top)
            for d in dnames:
                p = t / d
                (others if p.is_symlink() else dirs).append(p)
            for f in sorted(fnames):
                p = t / f
                st = p.lstat()
                (files if stat.S_ISREG(st.st_mode) else others).append(p)
        return dirs, files, others

    def name(self) -> str:
        self.counter += 1
        stem = self.rng.choice(["f", "d", "x", "long-name-" + "n" * self.rng.randrange(1, 60),
                                "sp ace", "é", "a.b"])
        return f"{stem}{self.counter}"

    def data(self, n: int) -> bytes:
        kind = self.rng.randrange(3)
        if kind == 0:
            return self.rng.randbytes(n)
        if kind == 1:
            return bytes([self.rng.randrange(256)]) * n
        text = b"line %d of some compressible text\n" % self.rng.randrange(1000)
        return (text * (n // len(text) + 1))[:n]

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randrange(0, 3000)  # inline extents
        if r < 0.9:
            return self.rng.randrange(3000, 300_000)
        return self.rng.randrange(300_000, 2_000_000)

    # -- operations ---------------------------------------------------------------------
    def op_mkdir(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        (self.rng.choice(dirs) / self.name()).mkdir()

    def op_create(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        p = self.rng.choice(dirs) / self.name()
        size = self.size()
        with open(p, "wb") as f:
            pos = 0
            while pos < size:
                if self.rng.random() < 0.25:  # a hole
                    pos += self.rng.randrange(1, 200_000)
                    continue
                n = min(size - pos, self.rng.randrange(1, 150_000))
                f.seek(pos)
                f.write(self.data(n))
                pos += n
            f.truncate(size)

    def op_append(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if files:
            with open(self.rng.choice(files), "ab") as f:
                f.write(self.data(self.rng.randrange(1, 100_000)))

    def op_overwrite(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if files:
            p = self.rng.choice(files)
            size = p.stat().st_size
            with open(p, "r+b") as f:
                f.seek(self.rng.randrange(size + 1))
                f.write(self.data(self.rng.randrange(1, 70_000)))

    def op_truncate(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if files:
            p = self.rng.choice(files)
            size = p.stat().st_size
            new = self.rng.randrange(size + 1) if self.rng.random() < 0.6 else size + \
                self.rng.randrange(1, 500_000)
            os.truncate(p, new)

    def op_reflink(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if not files:
            return
        src = self.rng.choice(files)
        if self.rng.random() < 0.4:  # whole file to a new name
            dst = self.rng.choice(dirs) / self.name()
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                try:
                    clone_range(fo.fileno(), 0, fi.fileno(), 0, 0)  # the whole file
                except OSError:
                    shutil.copyfileobj(fi, fo)
            return
        dst = self.rng.choice(files)
        ssize = src.stat().st_size
        if ssize < _BLOCK:
            return
        blocks = ssize // _BLOCK
        start = self.rng.randrange(blocks)
        nblk = self.rng.randrange(1, blocks - start + 1)
        length = nblk * _BLOCK
        if start + nblk == blocks and self.rng.random() < 0.5 and ssize % _BLOCK:
            length = ssize - start * _BLOCK  # up to EOF (a partial last block)
        dsize = dst.stat().st_size
        dpos = self.rng.randrange(dsize // _BLOCK + 2) * _BLOCK
        if length % _BLOCK and dpos + length < dsize:
            length = nblk * _BLOCK if nblk * _BLOCK <= ssize - start * _BLOCK else 0
        if length <= 0:
            return
        if src == dst and not (dpos + length <= start * _BLOCK or
                               start * _BLOCK + length <= dpos):
            return  # overlapping ranges of one file are refused
        with open(src, "rb") as fi, open(dst, "r+b") as fo:
            try:
                clone_range(fo.fileno(), dpos, fi.fileno(), start * _BLOCK, length)
            except OSError:
                fi.seek(start * _BLOCK)
                fo.seek(dpos)
                fo.write(fi.read(length))

    def op_link(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if files:
            os.link(self.rng.choice(files), self.rng.choice(dirs) / self.name())

    def op_symlink(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        target = self.rng.choice(["../x", "dangling", "a" * self.rng.randrange(1, 300),
                                  str(self.rng.choice(files or dirs).relative_to(self.root))])
        os.symlink(target or ".", self.rng.choice(dirs) / self.name())

    def op_rename(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        pool = files + others
        if not pool:
            return
        src = self.rng.choice(pool)
        if self.rng.random() < 0.4 and len(pool) > 1:
            dst = self.rng.choice(pool)  # over an existing non-directory
        else:
            dst = self.rng.choice(dirs) / self.name()
        if src != dst:
            os.rename(src, dst)

    def _movable(self, dirs: list[Path]) -> list[Path]:
        return [d for d in dirs if d != self.root]

    def op_movedir(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        movable = self._movable(dirs)
        if not movable:
            return
        d = self.rng.choice(movable)
        targets = [t for t in dirs if t != d and d not in t.parents]
        os.rename(d, self.rng.choice(targets) / self.name())

    def op_swap(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        pool = self._movable(dirs) + files + others
        if len(pool) < 2:
            return
        a, b = self.rng.sample(pool, 2)
        if a in b.parents or b in a.parents:
            return
        tmp = self.root / f".swap{self.counter}"
        self.counter += 1
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)

    def op_invert(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        """Parent P with subdirectory C: C takes P's place and P goes inside C."""
        pairs = [(d.parent, d) for d in self._movable(dirs) if d.parent != self.root]
        if not pairs:
            return
        p, c = self.rng.choice(pairs)
        tmp = p.parent / f".inv{self.counter}"
        self.counter += 1
        inner = tmp / (p.name if not os.path.lexists(c / p.name) else self.name())
        os.rename(c, tmp)
        os.rename(p, inner)
        os.rename(tmp, p)

    def op_delete(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        pool = files + others
        if self.rng.random() < 0.15 and self._movable(dirs):
            shutil.rmtree(self.rng.choice(self._movable(dirs)))
        elif pool:
            os.unlink(self.rng.choice(pool))

    def op_xattr(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        p = self.rng.choice(dirs + files)
        names = os.listxattr(p)
        users = [n for n in names if n.startswith("user.")]
        if users and self.rng.random() < 0.3:
            os.removexattr(p, self.rng.choice(users))
        else:
            # (at most 6 names of <= 500 bytes: what ext4 holds in one block)
            value = self.data(self.rng.choice([0, 1, 10, 200, 500]))
            os.setxattr(p, f"user.k{self.rng.randrange(6)}", value)

    def op_meta(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        p = self.rng.choice(dirs + files + others)
        kind = self.rng.randrange(3)
        if kind == 0 and not p.is_symlink():
            os.chmod(p, self.rng.choice([0o644, 0o600, 0o755, 0o700, 0o4755, 0o2750, 0o1777,
                                         0o444]))
        elif kind == 1:
            os.chown(p, self.rng.randrange(3000), self.rng.randrange(3000),
                     follow_symlinks=False)
        else:
            ns = self.rng.randrange(0, 2_000_000_000 * 10**9)
            os.utime(p, ns=(ns, ns + self.rng.randrange(10**9)), follow_symlinks=False)

    def op_special(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        p = self.rng.choice(dirs) / self.name()
        kind = self.rng.randrange(3)
        if kind == 0:
            os.mkfifo(p)
        else:
            mode = (stat.S_IFCHR if kind == 1 else stat.S_IFBLK) | 0o640
            os.mknod(p, mode, os.makedev(self.rng.randrange(1, 300), self.rng.randrange(256)))

    def op_prealloc(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if not files:
            return
        p = self.rng.choice(files)
        size = p.stat().st_size
        off = self.rng.randrange(size + 200_000)
        mode = _FALLOC_FL_KEEP_SIZE if self.rng.random() < 0.6 else 0
        fd = os.open(p, os.O_WRONLY)
        try:
            with contextlib.suppress(OSError):
                fallocate(fd, mode, off, self.rng.randrange(1, 400_000))
        finally:
            os.close(fd)

    def op_punch(self, dirs: list[Path], files: list[Path], others: list[Path]) -> None:
        if not files:
            return
        p = self.rng.choice(files)
        size = p.stat().st_size
        if not size:
            return
        off = self.rng.randrange(size)
        fd = os.open(p, os.O_WRONLY)
        try:
            fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off,
                       self.rng.randrange(1, 300_000))
        finally:
            os.close(fd)


Op = Callable[[_Work, list[Path], list[Path], list[Path]], None]

#: (weight when building, weight when mutating, operation)
_OPS: list[tuple[int, int, Op]] = [
    (10, 3, _Work.op_mkdir),
    (20, 6, _Work.op_create),
    (2, 6, _Work.op_append),
    (2, 8, _Work.op_overwrite),
    (2, 5, _Work.op_truncate),
    (4, 6, _Work.op_reflink),
    (3, 4, _Work.op_link),
    (3, 3, _Work.op_symlink),
    (2, 8, _Work.op_rename),
    (1, 5, _Work.op_movedir),
    (1, 4, _Work.op_swap),
    (1, 3, _Work.op_invert),
    (1, 6, _Work.op_delete),
    (3, 4, _Work.op_xattr),
    (3, 5, _Work.op_meta),
    (2, 2, _Work.op_special),
    (2, 3, _Work.op_prealloc),
    (1, 4, _Work.op_punch),
]


def _run(root: Path, seed: int, ops: int, column: int) -> list[str]:
    rng = random.Random(seed)
    work = _Work(root, rng)
    work.counter = 100_000 * column  # names made by mutate never equal build's
    weights = [mutating if column else building for building, mutating, _ in _OPS]
    done: list[str] = []
    for _ in range(ops):
        _, _, op = rng.choices(_OPS, weights)[0]
        dirs, files, others = work._walk()
        op(work, dirs, files, others)
        done.append(op.__name__[3:])
    return done


def build(root: str | os.PathLike[str], seed: int, ops: int = 120) -> list[str]:
    """Fill the (empty) directory ``root`` with a random tree; the operations done, in order."""
    return _run(Path(root), seed, ops, 0)


def mutate(root: str | os.PathLike[str], seed: int, ops: int = 80) -> list[str]:
    """Change the tree at ``root`` by ``ops`` random operations; the operations done."""
    return _run(Path(root), seed ^ 0x5EED, ops, 1)
