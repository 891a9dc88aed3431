"""``concurrent.futures``' thread pool with a submission a Ctrl-C cannot break.

``ThreadPoolExecutor.submit`` takes locks its workers need as they finish a task (the idle
semaphore's, the work queue's): a Ctrl-C raised in the main thread right after one was
taken left it taken, and the pool's shutdown waited for ever for workers blocked on it
(:class:`btrdelta._pool.signals_held`). Here a submission (and so ``map``) runs with the
CLI's signals held back; they raise as it returns. :func:`wait_first_error` waits as
``wait(fs, FIRST_EXCEPTION)`` does without taking every future's lock in a loop a Ctrl-C
may cut, :func:`cancel_all` cancels futures as a second Ctrl-C cannot break.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent import futures

from . import TYPE_CHECKING
from ._pool import signals_held

if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

__all__ = ["ThreadPoolExecutor", "cancel_all", "wait_first_error"]


class ThreadPoolExecutor(futures.ThreadPoolExecutor):
    """:class:`concurrent.futures.ThreadPoolExecutor` whose :meth:`submit` holds back
    Ctrl-C, SIGTERM and SIGHUP until it returns."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
               ) -> futures.Future[_T]:
        with signals_held():
            return super().submit(fn, *args, **kwargs)


def wait_first_error(fs: Sequence[futures.Future[Any]]) -> None:
    """Until every future of ``fs`` is done, or one failed (its exception not raised here:
    the caller asks each future), as ``wait(fs, return_when=FIRST_EXCEPTION)``."""
    ended = threading.Event()
    left = [len(fs)]
    lock = threading.Lock()

    def on_done(f: futures.Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = not left[0]
        if last or (not f.cancelled() and f.exception() is not None):
            ended.set()

    if not fs:
        return
    with signals_held():  # (each takes the future's lock)
        for f in fs:
            f.add_done_callback(on_done)
    ended.wait()


def cancel_all(fs: Sequence[futures.Future[Any]]) -> None:
    """Cancel every future of ``fs`` not yet running (each takes its future's lock: a
    second Ctrl-C is held back until the last)."""
    with signals_held():
        for f in fs:
            f.cancel()
