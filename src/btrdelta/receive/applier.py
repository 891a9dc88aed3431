"""Applying send-stream records to a destination directory with system calls.

:class:`Applier` has one method per command, looked up in a ``type(record) -> method``
table built once. SUBVOL and SNAPSHOT begin a subvolume under a temporary name inside DEST,
END (or the next SUBVOL/SNAPSHOT) finishes it and :meth:`Applier.abort` removes it, through
:mod:`.subvolumes` (the lifecycle, parent lookups, backends and registry), so a failed or
interrupted receive leaves nothing under the final name and never touches the parent (an
incremental stream works on a snapshot or a copy of it).

On btrfs, ENCODED_WRITE is passed through with the encoded-write ioctl; on the directory
backend it is decompressed.

Every path goes through :class:`btrdelta.fs.sandbox.Sandbox` (no ``..``, no absolute
paths, no symlink followed, nothing outside the subvolume). :meth:`Applier.apply_fast` runs
the common commands of a batch through the optional C module ``_fastapply`` (same system
calls, same path rules); it hands every record it does not handle, or whose system call
fails, back to the Python handlers here, which stay the reference for every command and
every error.
FILEATTR is ignored by default, exactly as btrfs-progs does; with ``apply_fileattr=True``
the flags that have a ``chattr`` equivalent are set with ``FS_IOC_SETFLAGS`` when the
subvolume is finished, an incremental's from the parent's (:mod:`.fileattrs`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from .. import TYPE_CHECKING, _native
from ..errors import ApplyError, BtrdeltaError, MissingBaseError, StreamFormatError, warn
from ..fs import btrfs
from ..fs.btrfs import fileattr_to_fsflags
from ..fs.copy import copy_range, within_source, write_zeros
from ..fs.sandbox import Sandbox, split_path
from ..stream.reader import StreamHeader
from ..stream.records import (
    Chmod,
    Chown,
    Clone,
    EnableVerity,
    EncodedWrite,
    End,
    Fallocate,
    Fileattr,
    Link,
    Mkdir,
    Mkfifo,
    Mkfile,
    Mknod,
    Mksock,
    Record,
    RemoveXattr,
    Rename,
    Rmdir,
    SetXattr,
    Snapshot,
    Subvol,
    Symlink,
    Truncate,
    Unlink,
    UpdateExtent,
    Utimes,
    Write,
)
from . import fileattrs
from .encoded import MAX_UNENCODED, decode_extent
from .subvolumes import PendingSubvol, PreCommit, ReceivedSubvol, Subvolumes

if TYPE_CHECKING:
    from typing import Any

__all__ = ["Applier"]


# the C fast path (``_fastapply.c``), used by appliers made while it is live (btrdelta._native)
_native.on_load("fastapply", lambda mod: mod.configure((
    Mkfile, Mkdir, Symlink, Rename, Link, Unlink, Rmdir, Write, Truncate, Chmod, Chown, Utimes,
    UpdateExtent, EncodedWrite, Clone)))

_WRITE_FLAGS = os.O_WRONLY
#: with ``write_behind``, a file's write-out is started each time this much more was written
WRITE_BEHIND = 8 << 20
_FALLBACK_ERRNOS = (errno.ENOTTY, errno.EINVAL, errno.ENOSPC, errno.EOPNOTSUPP, errno.EXDEV,
                    errno.EPERM)


#: the largest value a system call takes for an owner (``uid_t``) and for anything else
#: (offsets, sizes, modes, times: ``off_t``/``long long``)
_ID_MAX = (1 << 32) - 1
_VALUE_MAX = (1 << 63) - 1


def _out_of_range(rec: Record) -> str:
    """The first integer field of ``rec`` no system call can take, e.g. ``uid 4294967301``."""
    for name in rec.__match_args__:
        value = getattr(rec, name)
        if isinstance(value, int) and not 0 <= value <= (
            _ID_MAX if name in ("uid", "gid") else _VALUE_MAX
        ):
            return f"{name} {value}"
    return "a value"


def _check_xattr_name(name: bytes) -> None:
    """An xattr name is a C string: refuse an empty one or one with a NUL in it."""
    if not name or b"\0" in name:
        raise StreamFormatError("empty extended attribute name or NUL in it")


class Applier:
    """Apply records to the destination directory ``dest``.

    Args:
        dest: existing directory that receives the subvolumes.
        backend: ``"auto"``, ``"btrfs"`` or ``"dir"`` (see the module docstring).
        dry_run: check and resolve everything (paths, parents, clone sources), write nothing.
        apply_fileattr: set FILEATTR flags that map to ``chattr`` flags (default: ignore
            them, like btrfs-progs).
        force_decompress: never pass ENCODED_WRITE through, always decompress.
        on_warning: called with a message for things skipped (default: ``warnings.warn``).
        pre_commit: called with each complete subvolume before it gets its final name;
            raising aborts it (see :meth:`.subvolumes.Subvolumes.finish`).
        search_root: find parents and clone sources below this directory of ``dest``'s
            btrfs instead of below ``dest`` (``btrfs receive -m``).
        temp_name: the temporary name of the subvolumes received (see
            :meth:`.subvolumes.Subvolumes.begin`; one stream, one subvolume).
        parents: parents found before, by (received) UUID (see
            :class:`.subvolumes.Subvolumes`).
        detach_on: what ``pre_commit`` may raise to leave the complete subvolume under
            its temporary name instead of removing it (a receive to finish later).
        write_behind: start large files' write-out as they are written (the C fast path,
            every :data:`WRITE_BEHIND`), for a caller that writes ``dest`` out at the end
            (``syncfs``); the writeback's CPU is then spent during the receive.
    """

    def __init__(
        self, dest: Path, *, backend: str = "auto", dry_run: bool = False,
        apply_fileattr: bool = False, force_decompress: bool = False,
        on_warning: Callable[[str], None] | None = None, pre_commit: PreCommit | None = None,
        search_root: Path | None = None, temp_name: bytes | None = None,
        parents: dict[UUID, Path] | None = None,
        detach_on: tuple[type[BaseException], ...] = (), write_behind: bool = False,
    ) -> None:
        #: the temporary name of the subvolume being received (None: the default)
        self.temp_name = temp_name
        #: the destination's subvolumes (begin, finish, abort, find)
        self.subvols = Subvolumes(dest, backend=backend, dry_run=dry_run,
                                  search_root=search_root, parents=parents)
        self.dest = self.subvols.dest
        self.btrfs = self.subvols.btrfs
        self.dry_run = dry_run
        self.pre_commit = pre_commit
        self.detach_on = detach_on
        self.apply_fileattr = apply_fileattr
        self.force_decompress = force_decompress
        self.warn = on_warning or warn
        self.received: list[ReceivedSubvol] = []
        self._cur: PendingSubvol | None = None
        #: the FS_IOC_SETFLAGS flags set when the subvolume is finished
        self._fileattrs = fileattrs.Pending()
        self._wpath: bytes | None = None
        self._wfd = -1
        self._clone_roots: dict[UUID, Sandbox] = {}
        self._warned: set[str] = set()
        fastapply = _native.live("fastapply")
        self._fast: Any = fastapply.Fast() if fastapply is not None and not dry_run else None
        if self._fast is not None and write_behind:
            self._fast.write_behind(WRITE_BEHIND)
        #: the C side may hold the write descriptor or have renamed cached directories
        self._fast_dirty = False
        self._handlers: dict[type, Callable[[Any], None]] = {
            Subvol: self.subvol,
            Snapshot: self.snapshot,
            Mkfile: self.mkfile,
            Mkdir: self.mkdir,
            Mknod: self.mknod,
            Mkfifo: self.mkfifo,
            Mksock: self.mksock,
            Symlink: self.symlink,
            Rename: self.rename,
            Link: self.link,
            Unlink: self.unlink,
            Rmdir: self.rmdir,
            SetXattr: self.set_xattr,
            RemoveXattr: self.remove_xattr,
            Write: self.write,
            Clone: self.clone,
            Truncate: self.truncate,
            Chmod: self.chmod,
            Chown: self.chown,
            Utimes: self.utimes,
            End: self.end,
            UpdateExtent: self.update_extent,
            Fallocate: self.fallocate,
            Fileattr: self.fileattr,
            EncodedWrite: self.encoded_write,
            EnableVerity: self.enable_verity,
        }

    # -- driver ------------------------------------------------------------------------

    @property
    def in_subvolume(self) -> bool:
        """True between SUBVOL/SNAPSHOT and the END that finishes it."""
        return self._cur is not None

    @property
    def current(self) -> PendingSubvol | None:
        """The subvolume being received (its counters say how far), if any."""
        return self._cur

    @property
    def fast(self) -> bool:
        """True when :meth:`apply_fast` can apply records (the C module is loaded)."""
        return self._fast is not None

    def apply_fast(self, batch: list[Any], start: int, base: int = 0) -> int:
        """Apply ``batch[start:]`` through the C fast path while it can (``base``: the
        records applied before ``batch[start]``, for :meth:`track`).

        Returns:
            The index of the first record not applied: one the fast path does not handle
            or whose system call failed (nothing of it was applied). Pass it to
            :meth:`apply`, which applies it or raises the located error.
        """
        fast = self._fast
        cur = self._cur
        if fast is None or cur is None:
            return start
        if self._wfd >= 0:
            assert self._wpath is not None
            fast.give_write(self._wpath, self._wfd)
            self._wfd = -1
            self._wpath = None
        self._fast_dirty = True
        stop, nbytes = fast.run(batch, start, base)
        cur.records += stop - start
        cur.data_bytes += nbytes
        return int(stop)

    def track(self, counter: Any) -> None:
        """Have the C fast path store the count of records applied in ``counter`` (an
        aligned writable buffer of 8 bytes, e.g. a shared mapping of a file) after each
        record it applies; :func:`~.receiver.receive` stores it after the others."""
        if self._fast is not None:
            self._fast.track(counter)

    def resume(self, pending: PendingSubvol) -> None:
        """Go on filling ``pending`` (a temporary subvolume an earlier receive of the same
        stream left with :meth:`detach`, reopened by
        :meth:`.subvolumes.Subvolumes.reopen`) as if its SUBVOL/SNAPSHOT had just come."""
        if self._cur is not None:
            raise StreamFormatError("resume inside a subvolume")
        self._cur = pending
        if pending.sandbox is not None:
            self._fast_reset(pending.sandbox.root_fd)

    def detach(self) -> None:
        """Stop without removing the unfinished subvolume (a receive to resume later)."""
        cur = self._release()
        if cur is not None:
            self.subvols.detach(cur)

    def _from_fast(self) -> None:
        """Take back the write descriptor and drop stale directories after C ran."""
        self._fast_dirty = False
        fast = self._fast
        taken = fast.take_write()
        if taken is not None:
            self._close_write()
            self._wpath, self._wfd = taken
        cur = self._cur
        if fast.take_dirs_changed() and cur is not None and cur.sandbox is not None:
            cur.sandbox.clear()

    def _fast_reset(self, root_fd: int) -> None:
        if self._fast is not None:
            self._fast_dirty = False
            self._fast.reset(root_fd, self.btrfs and not self.force_decompress)

    def start(self, header: StreamHeader) -> None:
        """A stream begins: nothing to do (its SUBVOL/SNAPSHOT record starts the work).

        With :meth:`apply` and :meth:`close` this makes the applier a
        :class:`~btrdelta.stream.sink.RecordSink`, driven by :func:`~btrdelta.stream.sink.feed`.
        """

    def apply(self, rec: Record, index: int | None = None) -> None:
        """Apply one record; errors carry ``index``, the command name and the path.

        Raises:
            UnsafePathError: a path that would leave the subvolume.
            MissingBaseError: parent or clone source not found.
            ApplyError: a system call failed.
            StreamFormatError: a record that makes no sense here.
        """
        if self._fast_dirty:
            self._from_fast()
        handler = self._handlers.get(rec.__class__)
        try:
            if handler is None:
                return  # records this version does not model pass (as progs ignores them)
            cur = self._cur
            if cur is not None:
                cur.records += 1
                if not cur.records & 63 and cur.sandbox is not None:
                    cur.sandbox.trim()
            elif rec.__class__ not in (Subvol, Snapshot, End):
                raise StreamFormatError("command before SUBVOL/SNAPSHOT")
            handler(rec)
        except BtrdeltaError as exc:
            raise exc.located(index=index, command=rec.cmd.name.lower(),
                              path=getattr(rec, "path", None)) from exc.__cause__
        except OSError as exc:
            op = rec.cmd.name.lower()
            name = exc.filename if isinstance(exc.filename, str | bytes) else ""  # (not fd's)
            where = f" ({os.fsdecode(name)})" if name and op in ("subvol", "snapshot") else ""
            raise ApplyError(f"{op} failed: {exc.strerror or exc}{where}", op=op, index=index,
                             command=op, path=getattr(rec, "path", None)) from exc
        except OverflowError as exc:  # a u64 of the stream a system call cannot take
            raise StreamFormatError(
                f"{_out_of_range(rec)} is out of range for this system", index=index,
                command=rec.cmd.name.lower(), path=getattr(rec, "path", None),
            ) from exc

    def close(self) -> None:
        """Abort any unfinished subvolume and release descriptors."""
        self.abort()
        if self._fast is not None:
            self._fast.track(None)
            self._fast.close()
        self.subvols.close()

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subvolume start / finish ------------------------------------------------------

    def _begin(self, rec: Subvol | Snapshot, parent_uuid: UUID | None) -> None:
        if self._cur is not None:
            self.finish()
        cur = self.subvols.begin(rec.path, rec.uuid, rec.ctransid, parent_uuid=parent_uuid,
                                 tmp=self.temp_name)
        self._cur = cur
        self.subvols.register_ahead(cur, self.pre_commit)  # (its fsyncs beside the records)
        if cur.sandbox is not None:
            self._fast_reset(cur.sandbox.root_fd)
            if self.apply_fileattr and cur.parent_path is not None:  # (see .fileattrs)
                self._fileattrs.from_parent(cur.parent_path, cur.sandbox.root_fd,
                                            copied=not self.btrfs)

    def subvol(self, rec: Subvol) -> None:
        """SUBVOL: start a new empty subvolume (or directory)."""
        self._begin(rec, None)

    def snapshot(self, rec: Snapshot) -> None:
        """SNAPSHOT: start from a writable snapshot (or copy) of the local parent."""
        self._begin(rec, rec.clone_uuid)

    def end(self, rec: End) -> None:
        """END: finish the current subvolume."""
        if self._cur is not None:
            self.finish()

    def finish(self) -> ReceivedSubvol | None:
        """Finish the current subvolume: file attributes, then received UUID, read-only,
        the pre-commit hook and its final name (:meth:`.subvolumes.Subvolumes.finish`)."""
        cur = self._cur
        if cur is None:
            return None
        if not self.dry_run:
            self._fast_reset(-1)
            self._close_write()
            self._close_clone_roots()
            if self._fileattrs:
                self._fileattrs.apply(self._sb.root_fd,
                                      lambda msg: self._warn_once("fileattr", msg))
        done = self.subvols.finish(cur, pre_commit=self.pre_commit, keep_on=self.detach_on)
        self._cur = None
        self.received.append(done)
        return done

    def abort(self) -> None:
        """Remove the unfinished subvolume (its temporary name) if there is one."""
        cur = self._release()
        if cur is not None:
            self.subvols.abort(cur)

    def _release(self) -> PendingSubvol | None:
        """Close every descriptor of the unfinished subvolume and forget it (returned)."""
        cur = self._cur
        self._cur = None
        self._fast_reset(-1)
        self._close_write()
        self._close_clone_roots()
        self._fileattrs.close()
        return cur

    # -- helpers -----------------------------------------------------------------------

    @property
    def _sb(self) -> Sandbox:
        cur = self._cur
        assert cur is not None
        assert cur.sandbox is not None
        return cur.sandbox

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(msg)

    def _close_write(self) -> None:
        if self._wfd >= 0:
            os.close(self._wfd)
        self._wfd = -1
        self._wpath = None

    def _write_fd(self, path: bytes) -> int:
        if self._wpath == path:
            return self._wfd
        self._close_write()
        self._wfd = self._sb.open_file(path, _WRITE_FLAGS)
        self._wpath = path
        return self._wfd

    def _close_clone_roots(self) -> None:
        for sb in self._clone_roots.values():
            sb.close()
        self._clone_roots.clear()

    def _check(self, *paths: bytes) -> bool:
        """In dry-run mode validate the paths and return True (the caller then stops)."""
        if self.dry_run:
            for p in paths:
                split_path(p)
            return True
        return False

    # -- entries -----------------------------------------------------------------------

    def mkfile(self, rec: Mkfile) -> None:
        """MKFILE: empty regular file, mode 0600 until CHMOD."""
        if self._check(rec.path):
            return
        fd, name = self._sb.parent(rec.path)
        new = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        # keep it as the write descriptor: the kernel renames the new file to its place
        # and writes it next (rename() moves the cached path along)
        self._close_write()
        self._wfd = new
        self._wpath = rec.path

    def mkdir(self, rec: Mkdir) -> None:
        """MKDIR: directory, mode 0700 until CHMOD."""
        if self._check(rec.path):
            return
        fd, name = self._sb.parent(rec.path)
        os.mkdir(name, 0o700, dir_fd=fd)

    def mknod(self, rec: Mknod) -> None:
        """MKNOD: device node (or other special file) with the type bits of ``mode``."""
        kind = stat.S_IFMT(rec.mode)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise StreamFormatError(f"mknod with unsupported file type {oct(rec.mode)}")
        if self._check(rec.path):
            return
        fd, name = self._sb.parent(rec.path)
        os.mknod(name, kind, rec.rdev, dir_fd=fd)

    def mkfifo(self, rec: Mkfifo) -> None:
        """MKFIFO: named pipe, mode 0600."""
        if self._check(rec.path):
            return
        fd, name = self._sb.parent(rec.path)
        os.mkfifo(name, 0o600, dir_fd=fd)

    def mksock(self, rec: Mksock) -> None:
        """MKSOCK: socket node, mode 0600."""
        if self._check(rec.path):
            return
        fd, name = self._sb.parent(rec.path)
        os.mknod(name, stat.S_IFSOCK | 0o600, 0, dir_fd=fd)

    def symlink(self, rec: Symlink) -> None:
        """SYMLINK: a link to any target (it is never followed by the receiver)."""
        if not rec.target or b"\0" in rec.target:
            raise StreamFormatError("empty symlink target or NUL in it")
        if self._check(rec.path):
            return
        fd, name = self._sb.parent(rec.path)
        os.symlink(rec.target, name, dir_fd=fd)

    def rename(self, rec: Rename) -> None:
        """RENAME: atomic rename inside the subvolume (never follows the last component)."""
        if self._check(rec.path, rec.path_to):
            return
        sb = self._sb
        sfd, sname = sb.parent(rec.path)
        dfd, dname = sb.parent(rec.path_to)
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        sb.invalidate(rec.path)
        sb.invalidate(rec.path_to)
        if self._fast is not None:
            self._fast.clear_dirs()
        wpath = self._wpath
        if wpath is not None:
            # the cached descriptor follows its inode to the new name
            if wpath == rec.path:
                self._wpath = rec.path_to
            elif wpath.startswith(rec.path + b"/"):
                self._wpath = rec.path_to + wpath[len(rec.path):]
            elif wpath == rec.path_to or wpath.startswith(rec.path_to + b"/"):
                self._close_write()

    def link(self, rec: Link) -> None:
        """LINK: new name ``path`` for the existing ``path_link`` (both inside)."""
        if self._check(rec.path, rec.path_link):
            return
        sb = self._sb
        sfd, sname = sb.parent(rec.path_link)
        dfd, dname = sb.parent(rec.path)
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def unlink(self, rec: Unlink) -> None:
        """UNLINK: remove a non-directory."""
        if self._check(rec.path):
            return
        if self._wpath == rec.path:
            self._close_write()
        fd, name = self._sb.parent(rec.path)
        os.unlink(name, dir_fd=fd)

    def rmdir(self, rec: Rmdir) -> None:
        """RMDIR: remove an empty directory."""
        if self._check(rec.path):
            return
        self._close_write()
        sb = self._sb
        sb.invalidate(rec.path)
        if self._fast is not None:
            self._fast.clear_dirs()
        fd, name = sb.parent(rec.path)
        os.rmdir(name, dir_fd=fd)

    # -- xattrs ------------------------------------------------------------------------

    def _xattr_unsupported(self, name: bytes, exc: OSError) -> bool:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP) and (
            not self.btrfs or name.startswith(b"btrfs.")
        ):
            shown = name.decode("utf-8", "backslashreplace")
            self._warn_once(f"xattr:{shown}",
                            f"extended attribute {shown} not supported here; skipped")
            return True
        return False

    def set_xattr(self, rec: SetXattr) -> None:
        """SET_XATTR: ``lsetxattr`` (``btrfs.*`` properties are skipped off btrfs)."""
        _check_xattr_name(rec.name)
        if self._check(rec.path):
            return
        if not self.btrfs and rec.name.startswith(b"btrfs."):
            self._xattr_unsupported(rec.name, OSError(errno.EOPNOTSUPP, "unsupported"))
            return
        try:
            if rec.path:
                os.setxattr(self._sb.proc_path(rec.path), rec.name, rec.data,
                            follow_symlinks=False)
            else:
                os.setxattr(self._sb.root_fd, rec.name, rec.data)
        except OSError as exc:
            if not self._xattr_unsupported(rec.name, exc):
                raise

    def remove_xattr(self, rec: RemoveXattr) -> None:
        """REMOVE_XATTR: ``lremovexattr``."""
        _check_xattr_name(rec.name)
        if self._check(rec.path):
            return
        try:
            if rec.path:
                os.removexattr(self._sb.proc_path(rec.path), rec.name, follow_symlinks=False)
            else:
                os.removexattr(self._sb.root_fd, rec.name)
        except OSError as exc:
            if not self._xattr_unsupported(rec.name, exc):
                raise

    # -- data --------------------------------------------------------------------------

    def write(self, rec: Write) -> None:
        """WRITE: ``pwrite`` the data at the offset."""
        if self._check(rec.path):
            return
        fd = self._write_fd(rec.path)
        data = rec.data
        n = len(data)
        done = os.pwrite(fd, data, rec.offset)
        while done < n:
            done += os.pwrite(fd, memoryview(data)[done:], rec.offset + done)
        assert self._cur is not None
        self._cur.data_bytes += n

    def _clone_source(self, clone_uuid: UUID) -> Sandbox | None:
        cur = self._cur
        assert cur is not None
        if clone_uuid == cur.uuid:
            return cur.sandbox
        sb = self._clone_roots.get(clone_uuid)
        if sb is not None:
            return sb
        found = (cur.parent_path if clone_uuid == cur.parent_uuid and cur.parent_path
                 else self.subvols.find(clone_uuid))  # the parent may lie outside DEST
        if found is None:
            raise MissingBaseError(f"cannot find clone source subvolume {clone_uuid}")
        if self.dry_run:
            return None
        sb = Sandbox.open(found)
        self._clone_roots[clone_uuid] = sb
        return sb

    def clone(self, rec: Clone) -> None:
        """CLONE: reflink (``FICLONERANGE``) a range, else copy it with ``copy_file_range``."""
        src_sb = self._clone_source(rec.clone_uuid)
        if self._check(rec.path, rec.clone_path) or src_sb is None:
            return
        if self._fast is not None:  # the next CLONEs from this subvolume are applied in C
            self._fast.set_clone_source(rec.clone_uuid.bytes, src_sb.root_fd)
        dst = self._write_fd(rec.path)
        src = src_sb.open_file(rec.clone_path, os.O_RDONLY, noatime=True)  # atime as a reflink
        try:
            try:
                btrfs.clone_range(dst, rec.offset, src, rec.clone_offset, rec.length)
                return
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise
            within_source(src, rec.clone_offset, rec.length, rec.clone_path)
            copy_range(src, rec.clone_offset, dst, rec.offset, rec.length)
        finally:
            os.close(src)

    def truncate(self, rec: Truncate) -> None:
        """TRUNCATE: set the size."""
        if self._check(rec.path):
            return
        os.ftruncate(self._write_fd(rec.path), rec.size)

    def update_extent(self, rec: UpdateExtent) -> None:
        """UPDATE_EXTENT: no-op (``--no-data`` streams), as in btrfs-progs."""
        self._check(rec.path)

    def fallocate(self, rec: Fallocate) -> None:
        """FALLOCATE: pass the mode to ``fallocate(2)``; zero-fill if holes are unsupported."""
        if self._check(rec.path):
            return
        fd = self._write_fd(rec.path)
        try:
            btrfs.fallocate(fd, rec.mode, rec.offset, rec.size)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            if rec.mode & 0x02:  # punch hole: write zeros inside the current size
                end = min(rec.offset + rec.size, os.fstat(fd).st_size)
                write_zeros(fd, rec.offset, end - rec.offset)
            elif rec.mode == 0:
                os.posix_fallocate(fd, rec.offset, rec.size)
            else:
                self._warn_once("fallocate", f"fallocate mode {rec.mode} unsupported; skipped")

    def fileattr(self, rec: Fileattr) -> None:
        """FILEATTR: ignored (like btrfs-progs) unless ``apply_fileattr``; see module doc."""
        if self._check(rec.path) or not self.apply_fileattr:
            return
        flags = fileattr_to_fsflags(rec.fileattr)
        sb = self._sb
        pfd = sb.open_path(rec.path)
        try:
            if not (stat.S_ISREG(mode := os.fstat(pfd).st_mode) or stat.S_ISDIR(mode)):
                return
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        finally:
            os.close(pfd)
        self._fileattrs.add(fd, flags, rec.path)

    def encoded_write(self, rec: EncodedWrite) -> None:
        """ENCODED_WRITE: encoded-write ioctl on btrfs; else decompress and ``pwrite``."""
        if rec.encryption:
            raise StreamFormatError(f"encrypted ENCODED_WRITE ({rec.encryption}) unsupported")
        if not 1 <= rec.compression <= 7:
            raise StreamFormatError(f"unsupported ENCODED_WRITE compression {rec.compression}")
        if (rec.unencoded_len > MAX_UNENCODED
                or rec.unencoded_offset + rec.unencoded_file_len > rec.unencoded_len):
            raise StreamFormatError(
                f"bad ENCODED_WRITE lengths (file_len {rec.unencoded_file_len}, "
                f"unencoded_len {rec.unencoded_len}, offset {rec.unencoded_offset})"
            )
        if rec.offset > _VALUE_MAX:  # the ioctl's offset is a signed loff_t, as pwrite's
            raise OverflowError("offset")
        if self._check(rec.path):
            return
        fd = self._write_fd(rec.path)
        assert self._cur is not None
        self._cur.data_bytes += rec.unencoded_file_len
        if self.btrfs and not self.force_decompress:
            try:
                btrfs.encoded_write(fd, rec.data, rec.offset, rec.unencoded_file_len,
                                 rec.unencoded_len, rec.unencoded_offset, rec.compression)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOSPC):
                    raise
        plain = decode_extent(rec.data, rec.compression, rec.unencoded_len)
        view = memoryview(plain)[rec.unencoded_offset : rec.unencoded_offset
                                 + rec.unencoded_file_len]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], rec.offset + done)

    def enable_verity(self, rec: EnableVerity) -> None:
        """ENABLE_VERITY: ``FS_IOC_ENABLE_VERITY``, or a warning where unsupported."""
        if self._check(rec.path):
            return
        if self._wpath == rec.path:
            self._close_write()
        fd = self._sb.open_file(rec.path, os.O_RDONLY)
        try:
            btrfs.enable_verity(fd, rec.algorithm, rec.block_size, rec.salt, rec.sig)
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            self.warn(
                f"fs-verity is not supported on this filesystem; "
                f"{os.fsdecode(rec.path)} received without verity"
            )
        finally:
            os.close(fd)

    # -- metadata ----------------------------------------------------------------------

    def chmod(self, rec: Chmod) -> None:
        """CHMOD: permission bits; never through a symlink (symlinks have none on Linux)."""
        if self._check(rec.path):
            return
        mode = rec.mode & 0o7777
        if not rec.path:
            os.chmod(self._sb.root_fd, mode)
            return
        if self._wpath == rec.path:  # the file just written: a regular file we hold open
            os.fchmod(self._wfd, mode)
            return
        pfd = self._sb.open_path(rec.path)
        try:
            if stat.S_ISLNK(os.fstat(pfd).st_mode):
                return
            os.chmod(f"/proc/self/fd/{pfd}", mode)
        finally:
            os.close(pfd)

    def chown(self, rec: Chown) -> None:
        """CHOWN: numeric owner, not following symlinks."""
        if self._check(rec.path):
            return
        if not rec.path:
            os.chown(self._sb.root_fd, rec.uid, rec.gid)
            return
        fd, name = self._sb.parent(rec.path)
        os.chown(name, rec.uid, rec.gid, dir_fd=fd, follow_symlinks=False)

    def utimes(self, rec: Utimes) -> None:
        """UTIMES: atime and mtime in ns, not following symlinks (ctime/otime cannot be set)."""
        if self._check(rec.path):
            return
        times = (rec.atime, rec.mtime)
        if not rec.path:
            os.utime(self._sb.root_fd, ns=times)
            return
        fd, name = self._sb.parent(rec.path)
        os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)
