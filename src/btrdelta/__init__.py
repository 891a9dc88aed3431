"""btrdelta: small, fast and safe OS and application updates around btrfs send streams.

The public API (``docs/api.md``): one call per job, arguments in one order — what is read
first, then the base it applies to, then where the result goes; options as keywords::

    btrdelta.receive_any(stream, dest, **options)      # a send stream or a delta stream
    btrdelta.send_tree(tree, output, parent=None, **options)
    btrdelta.make_delta(stream, old, output, **options)
    btrdelta.expand_delta(delta, old, output, **options)
    btrdelta.clone_image(archive, target="STORE/NAME", output=None, **options)
    btrdelta.update_from_repository(url, dest, to=None, key=None, **options)
    btrdelta.tree_sum(tree)
    btrdelta.identify(file)                            # what an input is

Inputs and outputs are paths, ``"-"`` or binary files. (``receive_any``, ``send_tree`` and
``update_from_repository`` are not called ``receive``, ``send`` and ``update``: those are
subpackages.) Errors are :class:`BtrdeltaError` subclasses (``btrdelta.errors``). The names
are imported on first use, so ``import btrdelta`` costs nothing.
"""

from __future__ import annotations

import sys

#: (``typing.TYPE_CHECKING`` without importing ``typing``: ``import btrdelta`` imports nothing,
#: so ``python -m btrdelta`` sets the CLI's collector threshold before the CLI's imports.
#: The modules a ``send`` imports take it from here, ``from .. import TYPE_CHECKING``, and
#: their names of ``typing`` under it: ``typing`` is ~12 M instructions, ~3 % of a small send)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

    from .errors import BtrdeltaError
    from .update.api import expand_delta, make_delta, receive_any, send_tree, tree_sum
    from .update.clone import clone_image
    from .update.identify import identify
    from .update.versions import update as update_from_repository

__version__ = "0.1.0"
__all__ = [
    "BtrdeltaError",
    "__version__",
    "clone_image",
    "expand_delta",
    "identify",
    "make_delta",
    "receive_any",
    "send_tree",
    "tree_sum",
    "update_from_repository",
]

#: public name -> (module, name there)
_WHERE = {
    "BtrdeltaError": ("errors", "BtrdeltaError"),
    "expand_delta": ("update.api", "expand_delta"),
    "make_delta": ("update.api", "make_delta"),
    "receive_any": ("update.api", "receive_any"),
    "send_tree": ("update.api", "send_tree"),
    "tree_sum": ("update.api", "tree_sum"),
    "clone_image": ("update.clone", "clone_image"),
    "identify": ("update.identify", "identify"),
    "update_from_repository": ("update.versions", "update"),
}


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module(name)`` of an absolute ``name``, without ``importlib``: its
    package imports ``warnings`` (~0.45 ms of every command's start; the CLI, the send's
    modules and the accelerators import modules by name with this)."""
    __import__(name)
    return sys.modules[name]


def _module_found(name: str) -> bool:
    """``importlib.util.find_spec(name) is not None`` for a top-level ``name`` (a module
    looked for, not imported), without ``importlib``: the finders of ``sys.meta_path`` asked
    in turn, as ``find_spec`` asks them."""
    if name in sys.modules:  # (None there: blocked, which find_spec reports as not found)
        return sys.modules[name] is not None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is not None and find(name, None) is not None:
            return True
    return False


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{where[0]}"), where[1])
    globals()[name] = value
    return value
