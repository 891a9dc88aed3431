"""A small thread pool for the start-up path: what :class:`concurrent.futures.ThreadPoolExecutor`
gives the delta expansion (``submit``, a task's ``done``/``result``/``cancelled``,
``shutdown(cancel_futures=True)``) without importing ``concurrent.futures``.

``concurrent.futures`` imports ``logging`` (and with it ``string``, ``traceback``,
``weakref``...): ~3-4 ms of every ``btrdelta receive`` of a delta stream, whose expansion
only needs a queue and a few threads (the recompression of extents, the old files'
checks). The threads start with the first task and take tasks in the order submitted.
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from . import TYPE_CHECKING

if TYPE_CHECKING:
    import signal as _signal
    from typing import Any, Generic, TypeVar

    _T = TypeVar("_T")

    class _Generic(Generic[_T]):
        pass
else:
    import _signal  # (``signal`` without its enums; built in)

    _T = None

    class _Generic:
        """``Task[X]`` at run time is ``Task`` (``typing.Generic`` for type checkers)."""

        def __class_getitem__(cls, _item: object) -> type:
            return cls

__all__ = ["Pool", "Started", "StartedThread", "Task", "signal_held", "signals_held"]

_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)


class Task(_Generic[_T]):
    """One submitted call: its result or exception once done."""

    __slots__ = ("_call", "_event", "_exc", "_result", "_state")

    def __init__(self, call: Callable[[], _T]) -> None:
        self._call: Callable[[], _T] | None = call
        self._state = _PENDING
        self._result: _T | None = None
        self._exc: BaseException | None = None
        self._event = threading.Event()

    def done(self) -> bool:
        """Finished (with a result or an exception) or cancelled."""
        return self._event.is_set()

    def cancelled(self) -> bool:
        """Dropped by :meth:`Pool.shutdown` before it started."""
        return self._state == _CANCELLED

    def result(self) -> _T:
        """Wait for the call; its result, or raise its exception."""
        self._event.wait()
        if self._state == _CANCELLED:
            raise RuntimeError("task cancelled")
        if self._exc is not None:
            raise self._exc
        return self._result  # type: ignore[return-value]

    def _run(self) -> None:
        call, self._call = self._call, None
        try:
            self._result = call()  # type: ignore[misc]
        except BaseException as exc:  # handed to result()
            self._exc = exc
        self._state = _DONE
        self._event.set()

    def _cancel(self) -> None:
        self._call = None
        self._state = _CANCELLED
        self._event.set()


class Pool:
    """``workers`` threads named ``<name>_<i>`` running submitted calls in order."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = max(1, workers)
        self._name = name
        self._queue: deque[Task[Any]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads: list[StartedThread] = []
        self._stopping = False

    def submit(self, fn: Callable[..., _T], *args: Any) -> Task[_T]:
        """Run ``fn(*args)`` in a worker thread."""
        task: Task[_T] = Task(lambda: fn(*args))
        with signals_held(), self._cond:
            if self._stopping:
                raise RuntimeError("submit after shutdown")
            self._queue.append(task)
            self._cond.notify()
            if not self._threads:  # under the lock: one set of workers, whoever submits
                for i in range(self._workers):
                    t = StartedThread(self._work, f"{self._name}_{i}")
                    t.start()
                    self._threads.append(t)
        return task

    def _work(self) -> None:
        cond, queue = self._cond, self._queue
        while True:
            with cond:
                while not queue and not self._stopping:
                    cond.wait()
                if not queue:
                    return
                task = queue.popleft()
            task._run()

    def shutdown(self, *, cancel_futures: bool = True, wait: bool = True) -> None:
        """Stop the threads and wait for them: tasks not started are cancelled (with
        ``cancel_futures``, else run first), running ones end. ``wait=False``: return at
        once (a Ctrl-C; the threads are daemons: a running task's result is dropped)."""
        with self._cond:
            self._stopping = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()._cancel()
            self._cond.notify_all()
        if not wait:
            return
        for t in self._threads:
            t.join()
        self._threads = []


_MAIN = threading.main_thread().ident


class _Hold:
    """The main thread's :class:`signals_held` blocks open, and the first signal held."""

    depth = 0
    signum = 0


def signal_held(signum: int) -> bool:
    """For a signal handler that raises (the CLI's): true if the main thread is in a
    :class:`signals_held` block, which then raises it as it ends (the handler returns at
    once without raising); false: raise now."""
    if not _Hold.depth:
        return False
    _Hold.signum = _Hold.signum or signum
    return True


class signals_held:
    """A signal whose handler raises (Ctrl-C, SIGTERM and SIGHUP in the CLI: see
    :func:`signal_held`) raises as the block ends, not inside it.

    A Ctrl-C raises ``KeyboardInterrupt`` at whatever line the main thread runs: inside a
    ``with lock:`` after the lock was taken but before the block began (a ``Condition``'s
    or ``Semaphore``'s ``__enter__``; ``concurrent.futures``' ``_AcquireFutures``, which
    takes every future's lock in a loop), the lock is never released. A pool's submission
    takes locks its workers need: a Ctrl-C in ``ThreadPoolExecutor.submit`` left its idle
    semaphore's lock taken, each worker blocked for ever on finishing a task, and the
    pool's shutdown waiting for them (``image clone`` hung in 1 run of 5 on a Ctrl-C while
    it checked its store). For blocks that take locks and do not wait long. Outside the
    main thread (where no signal handler runs) it does nothing."""

    __slots__ = ("_main",)

    def __init__(self) -> None:
        self._main = False

    def __enter__(self) -> None:
        if threading.get_ident() == _MAIN:
            self._main = True
            _Hold.depth += 1

    def __exit__(self, *exc: object) -> None:
        if not self._main:
            return
        self._main = False
        _Hold.depth -= 1
        if _Hold.depth or not _Hold.signum:
            return
        signum, _Hold.signum = _Hold.signum, 0
        handler = _signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)


class Started:
    """``target()`` in a thread of its own, started without waiting for it to run.

    ``threading.Thread.start`` returns only once the new thread runs: on a loaded machine
    the starting thread waits its turn for a CPU too (a replication's writer thread: 47 ms
    at load 7, between the ACCEPT and the first DATA). ``target`` must catch what it raises
    (an exception is only printed); :meth:`join` waits for it to return. The thread names
    itself ``name`` once running (:func:`_name_thread`: ``ps -L`` shows it)."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self._running = _thread.allocate_lock()
        self._running.acquire()

        def run() -> None:
            try:
                _name_thread(name)
                target()
            finally:
                self._running.release()

        _thread.start_new_thread(run, ())

    def join(self) -> None:
        """Until ``target`` returned."""
        with self._running:
            pass


#: ``threading`` as :class:`StartedThread` knows it (CPython 3.11 and 3.12: a thread is in
#: ``_limbo`` from its start until it runs), else None: ``start`` then waits as usual
_THREADING: Any = threading if sys.version_info < (3, 13) and all(
    hasattr(threading, n) for n in ("_limbo", "_active_limbo_lock")) else None


class StartedThread(threading.Thread):
    """A daemon :class:`threading.Thread` whose :meth:`start` returns at once, without
    waiting for the new thread to run.

    ``Thread.start`` returns only once the new thread runs: on a loaded machine the
    starting thread waits for the new one's turn on a CPU, then for its own again (an
    update of the regex path starts 19 threads: 38 ms of its 106 were spent in ``start``
    at load 4.5 without priority). Unlike :class:`Started` it is a ``threading`` thread
    (its name for ``current_thread()``, listed by ``enumerate()`` from :meth:`start` on,
    counted by ``active_count()``); :meth:`join` and :meth:`is_alive` count it as running
    from :meth:`start` on. Where ``threading`` is not the one this knows (CPython 3.13 and
    later), :meth:`start` waits as ``Thread.start`` does."""

    def __init__(self, target: Callable[..., object], name: str,
                 args: tuple[Any, ...] = ()) -> None:
        super().__init__(target=target, name=name, args=args, daemon=True)
        self._launched = False

    def start(self) -> None:
        if _THREADING is None:
            super().start()
            return
        if self._launched:
            raise RuntimeError("threads can only be started once")
        self._launched = True
        # (the thread takes itself out when it runs; a Ctrl-C must not leave the lock taken)
        with signals_held(), _THREADING._active_limbo_lock:
            _THREADING._limbo[self] = self
        try:
            _thread.start_new_thread(self._bootstrap, ())  # type: ignore[attr-defined]
        except BaseException:
            with _THREADING._active_limbo_lock:
                del _THREADING._limbo[self]
            self._launched = False
            raise

    def _began(self) -> threading.Event:
        started: threading.Event = self._started  # type: ignore[attr-defined]
        return started

    def join(self, timeout: float | None = None) -> None:
        if self._launched:
            until = None if timeout is None else time.monotonic() + timeout
            if not self._began().wait(timeout):
                return  # (not even running yet at the timeout)
            if until is not None:  # (one timeout for both waits)
                timeout = max(0.0, until - time.monotonic())
        super().join(timeout)

    def is_alive(self) -> bool:
        return (self._launched and not self._began().is_set()) or super().is_alive()


def _name_thread(name: str) -> None:
    """Give the running thread ``name`` for the kernel (``/proc/self/task/TID/comm``, 15
    bytes at most): ``ps -L``, ``top -H``, ``gdb`` and profilers show it. Not for
    ``threading``, on purpose: its ``active_count()`` says whether this process may fork a
    receiver or leave by ``os._exit``, and a ``_thread`` one is waited for by neither."""
    try:
        with open(f"/proc/self/task/{_thread.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:  # no /proc
        pass
