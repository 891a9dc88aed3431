"""Crash an install with SIGKILL after record k or at a named step, or any other device
command after its k-th durable step (a forked child)."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

from btrdelta import device
from btrdelta.device import roots
from btrdelta.device.boot import read_trial, select_root
from btrdelta.device.layout import Layout
from btrdelta.stream.reader import StreamHeader
from btrdelta.tree import tree_sum


class KillAfter:
    """Events handed over one at a time; SIGKILL once ``k`` records were applied."""

    def __init__(self, events: Any, k: int) -> None:
        self.events = events
        self.k = k

    def batches(self) -> Generator[list[Any], None, None]:
        n = 0
        for batch in self.events.batches():
            for ev in batch:
                if type(ev) is not StreamHeader:
                    if n == self.k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    n += 1
                yield [ev]

    def __iter__(self) -> Any:
        for b in self.batches():
            yield from b


def _child(mnt: str, source: str, after: int | None, step: str | None) -> None:
    """The install that gets killed (in a process of the fork server)."""
    if after is not None:
        real = roots.receive

        def receive(events: Iterable[Any], dest: Path, **kw: Any) -> Any:
            kw["read_ahead"] = False  # applied exactly up to the kill
            return real(KillAfter(events, after), dest, **kw)

        roots.receive = receive  # type: ignore[assignment]

    def on_step(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    device.install(mnt, source, booted="a", on_step=on_step)


#: the durable steps of the device commands: every subvolume or rename step, every sync,
#: the default subvolume, every state file write, the boot-counting file and the hook
DURABLE = (
    *(("btrdelta.device.layout", f"Layout.{m}")
      for m in ("snapshot", "create_subvolume", "delete", "rename", "exchange", "sync")),
    ("btrdelta.fs.btrfs", "set_default_subvolume"),
    ("btrdelta.device.state", "write_atomic"),
    *((mod, fn) for mod in ("btrdelta.device.control", "btrdelta.device.reset")
      for fn in ("clear_trial", "exhaust_trial", "call_hook")),
)


def _kill_after(k: int) -> None:
    """Patch every durable step: SIGKILL once ``k`` of them are done (nested ones count)."""
    done = 0

    def wrap(real: Any) -> Any:
        def step(*args: Any, **kw: Any) -> Any:
            nonlocal done
            out = real(*args, **kw)
            done += 1
            if done == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return step

    for module, attr in DURABLE:
        owner: Any = importlib.import_module(module)
        *outer, name = attr.split(".")
        for o in outer:
            owner = getattr(owner, o)
        if hasattr(owner, name):
            setattr(owner, name, wrap(getattr(owner, name)))


def _op_child(op: str, mnt: str, k: int, kwargs: dict[str, Any]) -> None:
    _kill_after(k)
    module, _, fn = op.rpartition(".")
    getattr(importlib.import_module(module), fn)(mnt, **kwargs)


def crash_op(op: str, mnt: Path, k: int, **kwargs: Any) -> bool:
    """Run ``op`` (``module.function``, called as ``function(mnt, **kwargs)``) in a child
    killed after its ``k``-th durable step (:data:`DURABLE`); True if it was killed (False:
    it finished with fewer steps)."""
    proc = _CTX.Process(target=_op_child, args=(op, str(mnt), k, kwargs))
    proc.start()
    proc.join()
    if proc.exitcode == -signal.SIGKILL:
        return True
    assert proc.exitcode == 0, f"{op} failed instead of being killed ({proc.exitcode})"
    return False


def _at_child(op: str, mnt: str, at: str, kwargs: dict[str, Any]) -> None:
    module, _, attr = at.partition(":")
    owner: Any = importlib.import_module(module)
    *outer, name = attr.split(".")
    for o in outer:
        owner = getattr(owner, o)

    def kill(*args: Any, **kw: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, kill)
    module, _, fn = op.rpartition(".")
    getattr(importlib.import_module(module), fn)(mnt, **kwargs)


def crash_at(op: str, mnt: Path, at: str, **kwargs: Any) -> None:
    """Run ``op`` as :func:`crash_op` does, killed when it calls ``at``
    (``module:Class.method`` or ``module:function``): it must get there."""
    proc = _CTX.Process(target=_at_child, args=(op, str(mnt), at, kwargs))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, f"{op} did not reach {at} ({proc.exitcode})"


# a fork server started without threads: each crash is a fork of it, modules preloaded (a
# fork of the test process could inherit locks held by its threads)
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["btrdelta.device", "btrdelta.device.reset",
                             "btrdelta.device.backup", "btrdelta.delta.expand", "btrdelta.send",
                             "tests.device.crash"])


def crash_install(mnt: Path, source: Path, *, after: int | None = None,
                  step: str | None = None) -> bool:
    """Run ``device.install`` in a child killed after ``after`` records or when it reaches
    ``step``; True if it was killed (False: it finished first)."""
    proc = _CTX.Process(target=_child, args=(str(mnt), str(source), after, step))
    proc.start()
    proc.join()
    if proc.exitcode == -signal.SIGKILL:
        return True
    assert proc.exitcode == 0, f"the install failed instead of being killed ({proc.exitcode})"
    return False


def check_after_crash(mnt: Path, old_sum: str, new_sum: str) -> None:
    """The oracles after a crash: the active root unchanged (tree-sum), nothing half-made
    selectable (the next boot takes a complete root), slot b old or new, never between."""
    layout = Layout(mnt)
    assert tree_sum(mnt / "roots/a") == old_sum
    trial = read_trial(layout)
    nxt, _ = select_root(layout, count=False)
    if trial is not None and trial.left > 0:
        assert nxt == trial.slot == "b"
        assert tree_sum(mnt / "roots/b") == new_sum  # committed only when complete
    else:
        assert nxt == "a"
    if (mnt / "roots/b").exists():
        assert tree_sum(mnt / "roots/b") in (old_sum, new_sum)


def rerun_and_reset(mnt: Path, source: Path, new_sum: str) -> None:
    """The re-run completes; then the trial is cancelled for the next crash."""
    res = device.install(mnt, source, booted="a")
    assert res.slot == "b"
    assert res.tree_sum == new_sum
    assert tree_sum(mnt / "roots/b") == new_sum
    st = device.status(mnt)
    assert st["next_boot"] == "b"
    assert st["pending"] is None
    assert sorted(os.listdir(mnt / "roots")) == ["a", "b", "factory"]
    device.rollback(mnt, booted="a")
