"""The one switch between btrdelta's C accelerators and its pure-Python code (floor 0).

Ten optional C modules are built when a compiler is present:

=============  ==============================  ===============================================
name           module                          what it runs instead of the Python code
=============  ==============================  ===============================================
``speedups``   ``btrdelta.stream._speedups``   batch decoding of commands, the writer's
                                               encoder, the dump renderer, CRC32C (SSE4.2)
``fastapply``  ``btrdelta.receive._fastapply`` the receive applier's common commands
``unfold``     ``btrdelta.delta._unfold``      unfolding the delta carrier's common commands
``buzhash``    ``btrdelta.chunk._buzhash``     casync's chunker (cut points of a seed)
``treewalk``   ``btrdelta.tree._treewalk``     the walk of an incremental tree-sum (lstat of
                                               every entry, lines taken or restated from the
                                               parent's)
``blockhash``  ``btrdelta.send._blockhash``    a sendshot record's seeded XXH3-128 of every
                                               4 KiB block of a buffer (one call, not one
                                               per block; needs ``xxhash.h`` to build); a
                                               file's XXH3-128 with its holes hashed by
                                               their length, not their zeros
``hpatch``     ``btrdelta.delta._hpatch``      applying an HDiffPatch (``hdiff``) patch,
                                               instead of the ``hdiffpatch`` library; the
                                               blocks of a patched file equal to its old
                                               file's (``receive`` clones them)
``sweep``      ``btrdelta.fs._sweep``          the inode items of a change sweep's search
                                               results (one call a buffer, not Python per
                                               item); ioctls with buffers over 1 KiB made
                                               without the GIL (``fcntl.ioctl`` keeps it);
                                               ``fstatfs`` and ``renameat2`` without ctypes
                                               (``fs.libc``)
``columns``    ``btrdelta.tree._columns``      a sendshot record's column offsets (running
                                               sums, the rows of the files) without a Python
                                               int per value; the kept rows' runs copied
                                               into the next record; a directory's entries
                                               and their rows; the files whose digest
                                               starts as a changed file's
``cells``      ``btrdelta.send._cells``        the digest input of a file's cells (a record's
                                               extent items past its bound) from a batch of
                                               its extent items, not Python per item
=============  ==============================  ===============================================

One setting picks the backend of all ten: ``BTRDELTA_PURE_PYTHON=1`` makes it
``"python"``, otherwise it is ``"c"`` and every accelerator that is built is used. This
module reads that variable once, at import: it is the only module besides ``cli`` that reads
the environment. The Python code stays the reference: it handles what the C code hands
back and produces every error, so both backends behave the same (the tests run both).

Code that uses an accelerator asks :func:`live` when it sets up an object (a parser, a
dumper, an applier, an expansion), never at import, so a backend chosen later applies to
every object made after it::

    from btrdelta import _native

    with _native.use_backend("python"):          # all ten
        ...
    with _native.use_backend("python", "fastapply"):   # only the applier's
        ...

:data:`BACKEND` is the backend asked for, :func:`backends` what each accelerator runs
now, :func:`available` whether one is built. The C modules get their tables (record
classes, decoding plans) from the floors above through :func:`on_load`, so this module
imports none of them. CRC32C is chosen once, at import of ``btrdelta.stream.crc`` (both of
its implementations are C).

This module owns the choice, not the accelerators: what each one does is documented
next to its C file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from . import TYPE_CHECKING, _import_module

if TYPE_CHECKING:
    from typing import Final, Literal

__all__ = [
    "ACCELERATORS",
    "BACKEND",
    "Backend",
    "available",
    "backends",
    "live",
    "on_load",
    "use_backend",
]

if TYPE_CHECKING:
    Backend = Literal["c", "python"]
else:
    Backend = str  # (the Literal for type checkers: typing is not imported at start-up)

#: accelerator name -> its C module
ACCELERATORS: Final[dict[str, str]] = {
    "speedups": "btrdelta.stream._speedups",
    "fastapply": "btrdelta.receive._fastapply",
    "unfold": "btrdelta.delta._unfold",
    "buzhash": "btrdelta.chunk._buzhash",
    "treewalk": "btrdelta.tree._treewalk",
    "blockhash": "btrdelta.send._blockhash",
    "hpatch": "btrdelta.delta._hpatch",
    "sweep": "btrdelta.fs._sweep",
    "columns": "btrdelta.tree._columns",
    "cells": "btrdelta.send._cells",
}

#: the backend asked for: ``"python"`` when ``BTRDELTA_PURE_PYTHON`` is set (not ``0``),
#: else ``"c"``; :func:`use_backend` changes it (for all accelerators) while it runs
BACKEND: Backend = (
    "python" if os.environ.get("BTRDELTA_PURE_PYTHON", "") not in ("", "0") else "c"
)

_asked: dict[str, Backend] = dict.fromkeys(ACCELERATORS, BACKEND)
_loaded: dict[str, ModuleType | None] = {}
_hooks: dict[str, list[Callable[[ModuleType], object]]] = {name: [] for name in ACCELERATORS}


def _check(name: str) -> None:
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r} (have: {', '.join(ACCELERATORS)})")


#: held while a C module is imported and configured: a thread that imports ahead (``update``
#: does, while it plans) and one that needs the module now must not both run its hooks
_loading = threading.RLock()
_configuring: dict[str, ModuleType] = {}


def _load(name: str) -> ModuleType | None:
    """The C module ``name``, imported and configured once (``None`` if not built)."""
    try:
        return _loaded[name]
    except KeyError:
        pass
    _check(name)
    with _loading:
        if name in _loaded:
            return _loaded[name]
        if name in _configuring:  # asked by one of its own hooks
            return _configuring[name]
        try:
            mod: ModuleType | None = _import_module(ACCELERATORS[name])
        except ImportError:  # no compiler at install time (or a dependency not built)
            mod = None
        if mod is not None:
            _configuring[name] = mod
            try:
                for hook in _hooks[name]:
                    hook(mod)
            finally:
                del _configuring[name]
        _loaded[name] = mod  # seen by other threads once configured
    return mod


def on_load(name: str, configure: Callable[[ModuleType], object]) -> None:
    """Call ``configure(module)`` when the C module ``name`` is loaded (at once if it is
    already): it gives the module the tables it needs from the floors above."""
    _check(name)
    with _loading:
        _hooks[name].append(configure)
        mod = _loaded.get(name)
        if mod is not None:
            configure(mod)


def available(name: str) -> bool:
    """Whether the C module ``name`` is built (and loads), whatever the backend."""
    return _load(name) is not None


def live(name: str) -> ModuleType | None:
    """The C module to use for ``name`` now: ``None`` means run the Python code (the
    backend is ``"python"``, or the module is not built)."""
    if _asked[name] != "c":
        return None
    return _load(name)


def backends() -> dict[str, Backend]:
    """What each accelerator runs now: ``"c"`` or ``"python"``."""
    return {name: "c" if live(name) is not None else "python" for name in ACCELERATORS}


@contextmanager
def use_backend(backend: Backend, *names: str) -> Iterator[None]:
    """Run the objects set up inside the ``with`` block on ``backend``: every accelerator,
    or only ``names``. Restores the previous choice on exit.

    Raises:
        RuntimeError: ``"c"`` is asked for an accelerator that is not built.
    """
    global BACKEND
    if backend not in ("c", "python"):
        raise ValueError(f"backend must be 'c' or 'python', not {backend!r}")
    chosen = names or tuple(ACCELERATORS)
    for name in chosen:
        _check(name)
        if backend == "c" and not available(name):
            raise RuntimeError(f"the C accelerator {ACCELERATORS[name]} is not built")
    saved = dict(_asked), BACKEND
    for name in chosen:
        _asked[name] = backend
    if not names:
        BACKEND = backend
    try:
        yield
    finally:
        _asked.update(saved[0])
        BACKEND = saved[1]
