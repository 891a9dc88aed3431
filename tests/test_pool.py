"""btrdelta._pool: the small thread pool of the delta expansion, threads started without
waiting for them to run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from btrdelta import _pool
from btrdelta._pool import Pool, StartedThread

#: StartedThread's start without the wait is for the CPython whose threading it knows
#: (3.11, 3.12); elsewhere (3.13: Debian 13) it is Thread.start, waiting as usual
_no_wait = pytest.mark.skipif(_pool._THREADING is None,
                              reason="StartedThread.start waits here (Python 3.13+)")


def _workers(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(f"{name}_"))


def test_results_in_order_and_exceptions_handed_over() -> None:
    pool = Pool(2, "pool-order")
    tasks = [pool.submit(pow, i, 2) for i in range(50)]
    bad = pool.submit(int, "x")
    assert [t.result() for t in tasks] == [i * i for i in range(50)]
    with pytest.raises(ValueError, match="invalid literal"):
        bad.result()
    pool.shutdown()
    assert _workers("pool-order") == 0


def test_submitters_at_once_start_one_set_of_workers() -> None:
    """The first submissions of several threads at once: each pool has ``workers``
    threads, not one set per submitter that saw none started."""
    for round_ in range(20):
        name = f"pool-race{round_}"
        pool = Pool(2, name)
        gate = threading.Barrier(8)
        got: list[int] = []

        def submit(pool: Pool = pool, gate: threading.Barrier = gate,
                   got: list[int] = got) -> None:
            gate.wait()
            got.append(pool.submit(lambda: 1).result())

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [1] * 8
        assert _workers(name) == 2
        pool.shutdown()


def test_shutdown_cancels_what_has_not_started() -> None:
    pool = Pool(1, "pool-cancel")
    gate, started = threading.Event(), threading.Event()

    def first_task() -> bool:
        started.set()
        return gate.wait()

    first = pool.submit(first_task)
    later = [pool.submit(int, "1") for _ in range(3)]
    # (the worker must have taken the first task before the shutdown: under load it had
    # not, and the shutdown cancelled it too)
    assert started.wait(60)
    threading.Timer(0.2, gate.set).start()
    pool.shutdown(cancel_futures=True)
    assert first.result() is True
    assert all(t.cancelled() for t in later)
    with pytest.raises(RuntimeError, match="cancelled"):
        later[0].result()


def test_started_runs_in_another_thread_and_join_waits_for_it() -> None:
    """``Started``: the caller does not wait for the new thread to run; ``join`` waits for
    its target to return."""
    import threading

    from btrdelta._pool import Started

    gate, ran = threading.Event(), []

    def target() -> None:
        assert gate.wait(5)
        ran.append(threading.get_ident())

    t = Started(target, "test-target")  # returns while the target waits
    assert ran == []
    gate.set()
    t.join()
    assert len(ran) == 1
    assert ran[0] != threading.get_ident()
    t.join()  # (again: returns at once)


def test_started_threads_carry_their_name_for_the_kernel() -> None:
    """A ``Started`` thread names itself for ``ps -L`` (/proc's comm, 15 bytes); it stays
    out of ``threading``'s count (which decides forks and ``os._exit``)."""
    import threading

    from btrdelta._pool import Started

    gate, seen = threading.Event(), []

    def target() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen.append(f.read().strip())
        assert gate.wait(5)

    count = threading.active_count()
    t = Started(target, "a-long-thread-name")
    for _ in range(500):
        if seen:
            break
        threading.Event().wait(0.01)
    assert seen == ["a-long-thread-n"]
    assert threading.active_count() == count
    gate.set()
    t.join()


class _Held:
    """A :class:`~btrdelta._pool.StartedThread` whose new thread waits for ``gate`` before
    it runs anything (``threading``'s own start-up included)."""

    @staticmethod
    def make(gate: threading.Event, target: Callable[[], object], name: str) -> StartedThread:
        class Held(StartedThread):
            def _bootstrap(self) -> None:
                gate.wait(5)
                super()._bootstrap()  # type: ignore[misc]

        return Held(target, name)


@_no_wait
def test_started_thread_start_returns_before_the_thread_runs() -> None:
    """``StartedThread.start`` returns before the new thread has run at all (held back
    here: ``Thread.start`` waited the 5 s of the gate); it is alive and listed by
    ``threading`` from then on, a daemon; ``join`` waits for it to start and end; the
    target runs in it under its name; a second start is refused."""
    gate, seen = threading.Event(), []
    t = _Held.make(gate, lambda: seen.append(threading.current_thread().name), "held-thread")
    began = time.monotonic()
    t.start()
    assert time.monotonic() - began < 2
    assert t.is_alive()
    assert t in threading.enumerate()
    assert t.daemon
    assert seen == []
    with pytest.raises(RuntimeError, match="only be started once"):
        t.start()
    threading.Timer(0.05, gate.set).start()
    t.join()
    assert seen == ["held-thread"]
    assert not t.is_alive()
    assert t not in threading.enumerate()


@_no_wait
def test_started_thread_join_with_a_timeout_before_it_runs() -> None:
    """``join(timeout)`` of a started thread that has not run yet returns after the
    timeout (as for one still running), not ``Thread.join``'s error."""
    gate = threading.Event()
    t = _Held.make(gate, lambda: None, "held-join")
    t.start()
    t.join(0.05)
    assert t.is_alive()
    gate.set()
    t.join()
    assert not t.is_alive()


@_no_wait
def test_started_thread_join_timeout_covers_the_start_and_the_run() -> None:
    """``join(timeout)`` waits ``timeout`` in all: the wait for the thread to start and the
    wait for it to end share it (each had its own: up to twice the timeout)."""
    gate, done = threading.Event(), threading.Event()
    t = _Held.make(gate, lambda: done.wait(5), "held-deadline")
    t.start()
    threading.Timer(0.6, gate.set).start()
    began = time.monotonic()
    t.join(1.0)
    took = time.monotonic() - began
    assert t.is_alive()
    assert took < 1.4, took  # (two waits of their own: 1.6 s)
    done.set()
    t.join()


def test_wait_first_error_ends_at_a_failure_or_when_all_are_done() -> None:
    """``_futures.wait_first_error`` waits as ``wait(fs, FIRST_EXCEPTION)``: not for a task
    still blocked once another failed; for every task when none fails."""
    from btrdelta._futures import ThreadPoolExecutor, cancel_all, wait_first_error

    release = threading.Event()

    def fail() -> None:
        raise ValueError("bad")

    with ThreadPoolExecutor(2) as pool:
        blocked = pool.submit(release.wait, 30)
        failed = pool.submit(fail)
        queued = pool.submit(time.sleep, 0)  # (no free worker: not begun)
        wait_first_error([blocked, failed, queued])
        assert failed.done()
        assert not blocked.done()
        cancel_all([blocked, failed, queued])
        release.set()
    assert isinstance(failed.exception(), ValueError)
    assert blocked.result() is True
    with ThreadPoolExecutor(2) as pool:
        fs = [pool.submit(time.sleep, 0.01 * i) for i in range(4)]
        wait_first_error(fs)
        assert all(f.done() for f in fs)
    wait_first_error([])
