"""Optional dependencies: which extra brings each one, and importing them on first use.

A bare ``pip install btrdelta`` installs what a device needs to receive, expand and verify
(see the README's "Installing"); the rest comes with extras: ``[make]`` (send, delta make:
HDiffPatch, FastCDC, XXH3), ``[hdiff]`` (applying HDiffPatch patches), ``[image]``
(chunking images: FastCDC), ``[fuse]`` (``image mount``). A module that uses one imports it
through :func:`need` when the work starts, never at module level (``tests/test_optional.py``
holds that), so a missing extra is one line: ``needs the optional dependency pyfastcdc: pip
install 'btrdelta[image]'``, exit code 10.

Knows nothing of what the dependencies do.
"""

from __future__ import annotations

import sys
from types import ModuleType

from . import TYPE_CHECKING, _import_module
from .errors import MissingDependencyError

if TYPE_CHECKING:
    from typing import Any

__all__ = ["EXTRAS", "OPTIONAL", "lazy", "missing", "need"]

#: optional distribution (its import name) -> the extras that bring it, the one to suggest
#: first; ``[all]`` brings every one
OPTIONAL: dict[str, tuple[str, ...]] = {
    "hdiffpatch": ("hdiff", "make"),
    "pyfastcdc": ("image", "make"),
    "xxhash": ("make",),
    "mfusepy": ("fuse",),
}

#: extra -> the optional distributions it brings (pyproject.toml's, checked by a test)
EXTRAS: dict[str, tuple[str, ...]] = {
    extra: tuple(sorted(d for d, extras in OPTIONAL.items() if extra in extras))
    for extra in sorted({e for extras in OPTIONAL.values() for e in extras})
}


def missing(name: str, extra: str | None = None) -> MissingDependencyError:
    """The error for optional distribution ``name`` (``extra``: the one to suggest)."""
    return MissingDependencyError(name, extra or OPTIONAL[name][0])


def need(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` of an optional distribution (``"pyfastcdc.cy"``).

    Raises:
        MissingDependencyError: it is not installed (names the extra to install).
    """
    got = sys.modules.get(module)  # imported already: ~10x faster than import_module
    if got is not None:
        return got
    try:
        return _import_module(module)
    except ImportError as exc:
        raise missing(module.split(".")[0], extra) from exc



class _Deferred:
    """A module imported when one of its attributes is first used (by any thread:
    ``importlib.import_module`` holds the module's import lock)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = _import_module(self._name)
        return getattr(module, attr)


def lazy(module: str) -> Any:
    """``module`` (a core dependency), imported when one of its attributes is first used:
    httpx takes 40-60 ms to import, which a command reading a local repository, stream or
    archive never needs."""
    got = sys.modules.get(module)
    return got if got is not None else _Deferred(module)
