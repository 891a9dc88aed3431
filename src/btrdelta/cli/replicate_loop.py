"""``btrdelta replicate SOURCE DEST --every INTERVAL``: one process that replicates now and
then every INTERVAL (a service: systemd, a container), each round what a one-shot
``replicate`` does (the same protocol, sendshots, cursors and live snapshots: a one-shot
run or ``send --from-sendshot`` can follow a round, and a round them).

What stays warm between rounds: the interpreter and every module (the send side, and for a
local DEST the receive engine too, imported here once so each round's forked receiver has
it), the sendshot store's object with the records of the last base decoded (the next
round's base is the record this round wrote, a patch on them: only it is read;
:meth:`~btrdelta.send.store.SendshotStore.keep_decoded`). Each round opens its own
connection (a fork for a local DEST, an ssh session, a TCP/TLS connection): the protocol
is one conversation per transfer.

A round that fails (the peer gone, a cut, a full disk, a refusal) is one line (or one JSON
line) and is tried again after 1 s, then 2, 4, ... up to INTERVAL; the protocol's resume
makes a retry go on after what the receiver acknowledged. SIGTERM or SIGHUP stop the loop
with exit 0: at once between rounds (the wait is woken whichever thread took the signal),
during a round after the round's clean-up (the transfer resumable: the session's snapshot
named in the cursor until the receiver committed, the receiver's partial transfer kept).
SIGINT stops it alike: exit 0 between rounds, 130 during a round (as a one-shot run).
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
from typing import Any

from .._defaults import DEFAULT_STORE
from .._pool import signal_held
from ..errors import ApplyError, BtrdeltaError, ProtocolError, UsageError
from ._common import FULL, Interrupted, resent

#: the first retry of a failed round after this many seconds, doubling up to the interval
_BACKOFF = 1.0


def parse_interval(text: str) -> float:
    """An argparse type: '5m' -> 300.0 seconds (``ms``, ``s``, ``m``, ``h``, ``d``; a plain
    number is seconds; fractions allowed: ``0.5s``), more than 0."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    t = text.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h", "d") if t.endswith(u)), "")
    try:
        value = float(t[:len(t) - len(unit)]) * units.get(unit, 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an interval: {text!r} (e.g. 30s, 5m, 1h)"
                                         ) from None
    if not 0 < value <= _LONGEST:  # (a wait of 300 years overflowed: an internal error)
        raise argparse.ArgumentTypeError(f"not an interval: {text!r} (more than 0, at most "
                                         "100 years, e.g. 5m)")
    return value


#: the longest interval (seconds): Python's waits take at most ~292 years
_LONGEST = 100 * 365 * 86400.0


def one_heap() -> None:
    """Every thread's memory from the heap's one arena (``M_ARENA_MAX`` 1): the threads of
    each round are new ones, and glibc gives new threads arenas of their own (up to 8 a
    core) that keep what their rounds freed; with one, what a round frees is reused by the
    next and given back while the loop waits (:func:`give_back_freed_memory`)."""
    from .._malloc import one_arena

    try:
        from ..stream._speedups import mallopt
    except ImportError:
        return
    one_arena(mallopt)


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.0f} s"


class _Stop:
    """The loop's SIGTERM, SIGHUP and SIGINT: noted, and while a round runs (``armed``)
    raised as the CLI's are (:class:`Interrupted`; ``KeyboardInterrupt``), so the round
    stops as a one-shot run's does. Between rounds nothing is raised: an exception raised
    where Python runs a finalizer or a weakref callback (the collection after each round)
    is printed and dropped, and the loop went on (a SIGTERM lost 1 time in 3 in a test);
    the note stops it. In a round such a dropped exception is raised again as the CLI's is
    (:func:`~._common.resent`: the signal sent again; before, the round ran on to its
    end)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        on = resent(self._on)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._old[sig] = signal.signal(sig, on)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on(self, signum: int, _frame: object) -> None:
        self.signum = signum
        if self.armed and not signal_held(signum):  # (else raised as the held block ends)
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def run_every(args: argparse.Namespace, ch: Any, peer: str) -> int:
    """Replicate every ``args.every`` seconds until a signal; ``ch``: the first round's
    connection (made before the send side was imported, as a one-shot run's)."""
    from .._malloc import give_back_freed_memory
    from ..send.store import SendshotStore
    from ..update.replicate import ReplicateResult
    from . import describe_os_error
    from .replicate_cmd import _connect, failed, replicate_round, wait_signalled

    store = SendshotStore(args.store or DEFAULT_STORE)
    store.keep_decoded()  # (the next round's base is a patch on this round's)
    failures = 0
    with _Stop() as stop:
        for n in range(1, sys.maxsize):
            began, cpu = time.monotonic(), time.process_time()
            error, code = "", 0
            try:
                stop.armed = stop.signum is None
                if ch is None:
                    ch, peer = _connect(args)
                result = replicate_round(args, store, ch, peer)
                stop.armed = False
                if failed(result):
                    error, code = result.message, ProtocolError.exit_code
            except UsageError:
                raise  # (the same mistake every round)
            except KeyboardInterrupt:
                if not args.quiet:
                    print(f"replicate round {n}: interrupted; stopped (the next run resumes "
                          "the transfer)", file=sys.stderr, flush=True)
                return 130 if stop.signum == signal.SIGINT else 0
            except BtrdeltaError as exc:
                result, error, code = ReplicateResult("failed"), str(exc), exc.exit_code
            except OSError as exc:  # (the codes a one-shot run exits with: cli.main's)
                result, error = ReplicateResult("failed"), describe_os_error(exc)
                code = ApplyError.exit_code if exc.errno in FULL else 1
            stop.armed, ch = False, None
            took = time.monotonic() - began
            failures = failures + 1 if error else 0
            wait = (args.every - took if not failures
                    else min(args.every - took, _BACKOFF * 2 ** min(failures - 1, 30)))
            wait = max(wait, 0.0)
            _say(args, n, result, error, code, took, time.process_time() - cpu, wait)
            if n == 1 and not args.dest.startswith(("ssh://", "tcp://")):
                _receive_engine()
            # the round's cyclic garbage (the CLI collects rarely: gc.set_threshold in
            # __main__; a round's left file bytes to its next full collection: 94 MB after
            # 36 rounds of a 2.3 MB directory), then what it freed given back
            gc.collect()
            give_back_freed_memory()
            if stop.signum is None:  # (woken by a signal)
                wait_signalled(timeout=max(0.0, began + took + wait - time.monotonic()),
                               stopped=lambda: stop.signum is not None)
            if stop.signum is not None:
                if not args.quiet:
                    print(f"replicate: stopped after {n} round(s)", file=sys.stderr,
                          flush=True)
                return 0
    return 0


def _receive_engine() -> None:
    """Import the receiving side here, once: a local DEST's receiver is a fork of this
    process each round, which then has it."""
    import btrdelta.receive.resume
    import btrdelta.receive.subvolumes
    import btrdelta.stream.reader
    import btrdelta.update.replica  # noqa: F401


def _say(args: argparse.Namespace, n: int, result: Any, error: str, code: int, took: float,
         cpu: float, wait: float) -> None:
    """A round's JSON line, or its lines on stderr (a failure's even with ``-q``)."""
    from .replicate_cmd import result_json, say_result

    if args.json:
        report = result_json(result)
        if error:
            report["message"] = error
        print(json.dumps({**report, "round": n, "seconds": round(took, 6),
                          "cpu_seconds": round(cpu, 6), "exit_code": code,
                          "next_in": round(wait, 3)}), flush=True)
        return
    if error:
        print(f"replicate round {n}: failed (exit code {code} in a one-shot run): {error}; "
              f"trying again in {_seconds(wait)}", file=sys.stderr, flush=True)
    elif not args.quiet:
        say_result(args, result, f"replicate round {n} ({_seconds(took)})")
        sys.stderr.flush()
