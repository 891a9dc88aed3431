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

from . import _import_module
from .errors import MissingDependencyError

__all__ = ["EXTRAS", "OPTIONAL", "missing", "need"]

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
    if got is not None and not getattr(getattr(got, "__spec__", None), "_initializing", False):
        return got
    # (one another thread is still importing: the import waits for it, as `import` does;
    # taken from sys.modules it was used unfinished, 'partially initialized module')
    try:
        return _import_module(module)
    except ImportError as exc:
        raise missing(module.split(".")[0], extra) from exc
