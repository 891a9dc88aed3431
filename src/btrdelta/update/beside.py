"""What ``update`` does beside a path's hops, in threads of their own.

* The next delta hop's download (:meth:`Beside.fetch`) starts once this hop's artifact is
  at hand, while this hop is applied (its expansion, the copy or snapshot of its parent,
  the records, the identity check): a short path's hops were each ~1-2 ms of download
  over keep-alive, one after the other, before anything else of the hop could start.
  The download is the one :meth:`~btrdelta.repo.mirror.Mirrors.download` makes (resumable,
  every mirror in turn, the BLAKE3 checked) into ``DEST/.btrdelta/downloads``; a failure
  is raised when the hop that needs it takes it (:meth:`Beside.take`), after the hops
  before it are verified and kept. Only an artifact of at most :data:`AHEAD_MAX` bytes is
  fetched ahead: a run that stops (an error, Ctrl-C) waits for what is in flight.
* A verified intermediate version is removed once the next one is verified
  (:meth:`Beside.remove`): a run cut after that resumes from the newer one, and the
  removal (a directory tree on ext4) overlaps the next hop instead of adding to the end.

The progress events of the bytes a thread receives are handed to the caller's thread
(:meth:`Beside.on_bytes`, given out when it next takes a download or waits), so the
caller's event handler is only ever called from one thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._pool import StartedThread
from . import holdings

__all__ = ["AHEAD_MAX", "Beside"]

#: the largest artifact fetched ahead of its hop (one range request of the mirror client)
AHEAD_MAX = 4 << 20


class _Job:
    """A call made by a thread of its own; :meth:`result` waits for it."""

    def __init__(self, func: Callable[[], Any], name: str) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = StartedThread(self._run, name, (func,))
        self._thread.start()

    def _run(self, func: Callable[[], Any]) -> None:
        try:
            self._result = func()
        except BaseException as exc:  # raised by result(), in the caller's thread
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result


class Beside:
    """The downloads made ahead and the removals of one update (see the module docstring);
    :meth:`wait` before the update's state is cleaned up or it returns, on every path."""

    def __init__(self, dest: Path, emit: Callable[[dict[str, Any]], None]) -> None:
        self.dest = dest
        self._emit = emit
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self._unsaid = 0
        self._fetches: dict[Path, _Job] = {}
        self._removals: list[_Job] = []

    def on_bytes(self, n: int) -> None:
        """The mirrors' byte count: an event at once in the caller's thread, else kept for
        it."""
        if threading.get_ident() == self._owner:
            self._emit({"event": "bytes", "n": n})
        else:
            with self._lock:
                self._unsaid += n

    def _say(self) -> None:
        with self._lock:
            n, self._unsaid = self._unsaid, 0
        if n:
            self._emit({"event": "bytes", "n": n})

    def fetch(self, out: Path, length: int, download: Callable[[], Path]) -> None:
        """Start ``download`` (of ``length`` bytes into ``out``) in a thread, unless it is
        larger than :data:`AHEAD_MAX` or started already."""
        if length <= AHEAD_MAX and out not in self._fetches:
            self._fetches[out] = _Job(download, "btrdelta-download")

    def take(self, out: Path, download: Callable[[], Path]) -> Path:
        """The file ``out``: the download started by :meth:`fetch` (its error raised
        here), else ``download()`` made now."""
        job = self._fetches.pop(out, None)
        try:
            return job.result() if job is not None else download()
        finally:
            self._say()

    def remove(self, name: str) -> None:
        """Remove entry ``name`` of DEST (an intermediate no longer needed) in a thread."""
        self._removals.append(_Job(lambda: holdings.remove_entry(self.dest, name),
                                   "btrdelta-remove"))

    def wait(self, *, raising: bool = True, removals: bool = True) -> None:
        """Wait for every thread (not the removals without ``removals``); raise the first
        removal's error (not with ``raising``: on the way out of a failed run). A download
        not taken is left as it ended: whole, or its ``.part`` for the next run to
        resume."""
        jobs, self._fetches = list(self._fetches.values()), {}
        for job in jobs:
            with contextlib.suppress(Exception):  # (its hop was not reached)
                job.result()
        self._say()
        if not removals:
            return
        pending, self._removals = self._removals, []
        errors = []
        for job in pending:
            try:
                job.result()
            except Exception as exc:
                errors.append(exc)
        if errors and raising:
            raise errors[0]
