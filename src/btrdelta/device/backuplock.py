"""The lock of one backup name at a destination: ``NAME.backups.lock``, held from a
backup's read of the index to its last write there, so that devices backing up one NAME
to one place take turns (at the same time two took the same number, one's file replaced
the other's and one index entry was lost).

- In a directory: an ``flock`` of the file, which then names its holder.
- Over HTTP (WebDAV): the holder's line is ``PUT`` under a name of its own and ``MOVE``-d
  to ``NAME.backups.lock`` with ``Overwrite: F``, which the server refuses (412) while the
  lock exists; ``DELETE`` releases it. A server that takes no ``MOVE`` (nginx with
  ``dav_methods PUT`` alone, an object store) is refused before anything is written: a
  conditional ``PUT`` (``If-None-Match``) is no lock there, nginx ignores it. A device
  notes the lock it takes in ``.btrdelta/backup-locks.json``; a lock left there by its own
  backup cut short (a power cut) is removed by its next backup to that place. The holder
  renews its lock: every :data:`RENEW` seconds it ``PUT``-s a count to its own name
  (``NAME.backups.lock.TOKEN``), which a waiter reads. A lock neither changed nor renewed
  for :data:`LEASE` seconds of a waiter's own clock (its device gone, or cut off) ends the
  wait with an error naming its holder; ``break_lock`` (``--break-lock``) takes it then.
  A live holder renews: its lock is never taken. The holder's release deletes the lock only
  while it still names the holder's token (``GET``, compared, ``DELETE``: a lock removed by
  hand and taken by another device stays that device's; on a server without conditional
  requests another device taking it between the two, after a removal by hand, is not seen).

A backup that waits says so once, after :data:`SAY_AFTER` seconds ("waiting for ..., held
by PID 1234 on host-a since ..."), and a Ctrl-C ends the wait.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .._pool import Started
from ..errors import BtrdeltaError, StreamFormatError, TransportError
from ..fs.atomic import write_atomic

if TYPE_CHECKING:
    from ..transport.client import Client

__all__ = ["LEASE", "NEEDS", "RENEW", "SAY_AFTER", "call", "held_in_directory",
           "held_over_http"]

#: seconds a backup waits for the lock before it says so
SAY_AFTER = 1.0
#: seconds between a holder's renewals of its HTTP lock
RENEW = 20.0
#: seconds a waiter sees an HTTP lock neither changed nor renewed before it ends its wait
#: (or, told ``break_lock``, takes the lock): six renewals missed
LEASE = 120.0
#: seconds between an HTTP lock's tries
_HTTP_POLL = 2.0
#: the holder's line read from a lock (the rest is not shown)
_HOLDER_LIMIT = 512
#: what a server must take for HTTP backups
NEEDS = ("a backup destination over HTTP needs a server taking PUT, MOVE and DELETE and "
         "serving GET (nginx: dav_methods PUT MOVE DELETE)")


def _holder(token: str = "") -> bytes:
    """This process's line in a lock: who holds it, since when."""
    doc = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3)}
    if token:
        doc["token"] = token
    return json.dumps(doc).encode() + b"\n"


def _who(raw: bytes) -> str:
    """``held by PID 1234 on host-a since 2026-12-07 14:50:02 UTC`` from a lock's line (the
    line of another device: shown, never trusted), or what is known."""
    try:
        doc = json.loads(raw[:_HOLDER_LIMIT])
        pid, host, since = int(doc["pid"]), str(doc["host"])[:64], float(doc["since"])
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
        return f"held by PID {pid} on {host!r} since {when}"
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        return "held by a holder it does not name"


def _token(raw: bytes) -> str | None:
    """The token of a lock's line; None unless a plain word (it goes into URLs: a token
    ``/../work.backups.json`` made ``--break-lock`` delete another name's index)."""
    try:
        token = json.loads(raw[:_HOLDER_LIMIT]).get("token")
    except (ValueError, AttributeError):
        return None
    return token if isinstance(token, str) and _WORD.fullmatch(token) else None


_WORD = re.compile(r"[0-9A-Za-z_-]{1,64}")


@contextlib.contextmanager
def held_in_directory(path: Path, on_wait: Callable[[str], None]
                      ) -> Iterator[Callable[[], None]]:
    """Hold the ``flock`` of lock file ``path`` (waited for; said once after
    :data:`SAY_AFTER` seconds; Ctrl-C ends the wait). Where the filesystem has no locks
    (``ENOLCK``: NFS without lockd) nothing is held. Yields :func:`held_over_http`'s check,
    here one with nothing to check (no one else takes an ``flock``)."""
    fd = _lock_file(path)
    try:
        try:
            if not _try_flock(fd):
                deadline = time.monotonic() + SAY_AFTER
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                    if _try_flock(fd):
                        break
                else:
                    on_wait(f"waiting for {path}, {_who(os.pread(fd, _HOLDER_LIMIT, 0))}")
                    fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder(), 0)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
        yield lambda: None
    finally:
        os.close(fd)


def _lock_file(path: Path) -> int:
    """The lock file ``path`` opened (made when there is none).

    Raises:
        StreamFormatError: it is no regular file (DEST may be a stick's: a FIFO failed
            the backup as 'Invalid argument', naming nothing).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise StreamFormatError("not a regular file (a backup's lock must be one)",
                                source=str(path))
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def call(client: Callable[[], Client], method: str, url: str, *,
         headers: dict[str, str] | None = None,
         body: bytes | BinaryIO | None = None) -> tuple[int, bytes]:
    """Status and (the start of) the body of one request to a backup location (a client of
    its own: a lock's wait may be long).

    Raises:
        TransportError: it failed, or the server takes no such request (405, 501: what a
            backup location must take).
    """
    from ..transport.client import HTTPError

    try:
        with contextlib.ExitStack() as stack:
            content = body if body is None or not isinstance(body, bytes) else None
            if isinstance(body, bytes):
                content = stack.enter_context(tempfile.TemporaryFile())
                content.write(body)
                content.seek(0)
            resp = stack.enter_context(stack.enter_context(client()).stream(
                method, url, headers=headers, content=content))
            status, server = resp.status_code, resp.headers.get("server") or ""
            got = b""
            with contextlib.suppress(HTTPError):
                got = resp.read(_HOLDER_LIMIT)
    except HTTPError as exc:
        raise TransportError(f"{method} failed: {exc}", url=url) from exc
    if status in (405, 501):  # (Method Not Allowed, Not Implemented)
        who = "btrdelta serve answers GET and HEAD only; " \
            if server.startswith("btrdelta-serve") else ""
        raise TransportError(f"{method} answered {status}: {who}{NEEDS}", url=url,
                             status=status)
    return status, got


def _move(http: Callable[..., tuple[int, bytes]], own: str, url: str) -> int:
    return http("MOVE", own, headers={"Destination": url, "Overwrite": "F"})[0]


@contextlib.contextmanager
def held_over_http(url: str, client: Callable[[], Client], notes: Path,
                   on_wait: Callable[[str], None], *,
                   break_lock: bool = False) -> Iterator[Callable[[], None]]:
    """Hold HTTP lock ``url`` (``.../NAME.backups.lock``; see the module docstring),
    noted in the device's file ``notes`` from before it is taken until it is released,
    renewed while held. A lock not renewed for :data:`LEASE` seconds ends the wait
    (BtrdeltaError), or with ``break_lock`` is taken. Yields a check to call before a
    write that needs the lock: it raises BtrdeltaError when another holder took it
    meanwhile (this one cut off from the server past the lease, its lock broken).

    Raises:
        TransportError: the server takes no MOVE or DELETE there, or a request failed.
    """
    http = functools.partial(call, client)
    old = _load(notes).get(url, [])  # of this device's backups cut short
    for token in old:  # (their own names' leftovers)
        http("DELETE", f"{url}.{token}")
    token = secrets.token_hex(12)
    own = f"{url}.{token}"
    http("DELETE", own)  # (a server taking no DELETE or MOVE is refused here, at once)
    # (a server taking MOVE: no such source, or the lock exists, as nginx checks first)
    if (status := _move(http, own, url)) not in (404, 412):
        raise TransportError(f"MOVE answered {status} (404 expected)", url=own, status=status)
    _note(notes, url, [*old, token])
    status, _ = http("PUT", own, body=_holder(token))
    if status not in (200, 201, 204):
        raise TransportError(f"PUT answered {status}", url=own, status=status)
    said = False
    waited = time.monotonic()
    seen: tuple[bytes, bytes] | None = None  # (the lock's line and its renewal)
    try:
        while (status := _move(http, own, url)) not in (200, 201, 204):
            if status != 412:  # (Precondition Failed: the lock exists)
                raise TransportError(f"MOVE answered {status}", url=own, status=status)
            got, line = http("GET", url)
            if got == 200 and (stale := _token(line)) in old:
                http("DELETE", url)  # this device's, from a backup cut short
                old = [t for t in old if t != stale]  # (once: a refused DELETE is waited)
                continue
            now = time.monotonic()
            if not said and now - waited >= SAY_AFTER:
                on_wait(f"waiting for {url}, {_who(line) if got == 200 else 'held'}")
                said = True
            if got == 200:
                theirs = _token(line)
                beat = http("GET", f"{url}.{theirs}")[1] if theirs else b""
                if (line, beat) != seen:
                    seen, since = (line, beat), now
                elif now - since >= LEASE:
                    _stale(http, url, line, theirs, now - since, break_lock, on_wait)
                    seen = None
                    continue
            time.sleep(_HTTP_POLL if said else SAY_AFTER / 4)
    except BaseException:
        with contextlib.suppress(TransportError):
            http("DELETE", own)
        raise
    _note(notes, url, [token])
    renewing = _Renewal(http, own)

    def check() -> None:
        got, line = http("GET", url)
        if got == 200 and _token(line) != token:
            raise BtrdeltaError(f"{url}: no longer this backup's lock ({_who(line)}: "
                                "broken with --break-lock, or removed by hand and taken): "
                                "nothing more written (the file this backup put is not in "
                                "the index)")

    try:
        yield check
    except BaseException:
        renewing.stop()
        with contextlib.suppress(TransportError):
            _release(http, url, token, notes, on_wait)
        raise
    renewing.stop()
    _release(http, url, token, notes, on_wait)


def _stale(http: Callable[..., tuple[int, bytes]], url: str, line: bytes,
           theirs: str | None, idle: float, break_lock: bool,
           on_wait: Callable[[str], None]) -> None:
    """A lock ``line`` neither changed nor renewed for ``idle`` seconds: with
    ``break_lock`` deleted (while it is still that line: GET, compared, DELETE) and said,
    else the end of the wait (BtrdeltaError, naming the holder and ``--break-lock``)."""
    who = _who(line)
    if not break_lock:
        raise BtrdeltaError(
            f"{url}: {who}, not renewed for {idle:.0f} s (a live backup renews it every "
            f"{RENEW:g} s: its device is gone or cut off, or runs a btrdelta that does "
            "not renew locks); if no backup of that name runs there, run again with "
            "--break-lock to take it")
    got, now = http("GET", url)
    if got != 200 or now != line:  # (it changed meanwhile: judged again)
        return
    status, _ = http("DELETE", url)
    if status not in (200, 204, 404):
        raise TransportError(f"DELETE answered {status}: the lock stays", url=url,
                             status=status)
    if theirs:
        http("DELETE", f"{url}.{theirs}")  # (its renewals)
    on_wait(f"removed {url} ({who}, not renewed for {idle:.0f} s: --break-lock)")


class _Renewal:
    """A holder's renewals of its HTTP lock: a count ``PUT`` to its own name ``own`` every
    :data:`RENEW` seconds, by a thread of its own until :meth:`stop` (a failed one is
    tried again at the next; a waiter sees the lock stale only after :data:`LEASE`)."""

    def __init__(self, http: Callable[..., tuple[int, bytes]], own: str) -> None:
        self._stop = threading.Event()

        def run() -> None:
            n = 0
            while not self._stop.wait(RENEW):
                n += 1
                with contextlib.suppress(BtrdeltaError):
                    http("PUT", own, body=b"%d\n" % n)

        self._thread = Started(run, "lock-renewal")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _release(http: Callable[..., tuple[int, bytes]], url: str, token: str, notes: Path,
             on_wait: Callable[[str], None]) -> None:
    """Delete lock ``url`` if it is still this holder's (``token``), and its renewals."""
    got, line = http("GET", url)
    if got == 200 and _token(line) != token:  # (removed by hand, and taken by another)
        on_wait(f"{url} is no longer this backup's lock ({_who(line)}): left to its "
                "holder")
    elif got != 404:
        status, _ = http("DELETE", url)
        if status not in (200, 204, 404):
            raise TransportError(f"DELETE answered {status}: the lock stays (the next "
                                 "backup of this device removes it)", url=url, status=status)
    http("DELETE", f"{url}.{token}")
    _note(notes, url, [])


def _load(notes: Path) -> dict[str, list[str]]:
    try:
        doc = json.loads(notes.read_bytes())
        return {str(k): [str(t) for t in v] for k, v in doc["locks"].items()}
    # (json's RecursionError: arrays nested too deep were an internal error of a backup)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}  # none, or damaged: a lock of this device left on a server waits


def _note(notes: Path, url: str, tokens: list[str]) -> None:
    """Note ``tokens`` as this device's (possible) locks at ``url``; none: forget it."""
    locks = _load(notes)
    locks.pop(url, None)
    if tokens:
        locks[url] = tokens
    if locks or notes.exists():
        write_atomic(notes, json.dumps({"locks": locks}, indent=1).encode() + b"\n")
