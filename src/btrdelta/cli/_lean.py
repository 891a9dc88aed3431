"""``argparse`` and ``uuid`` as the CLI imports them: without ``gettext`` and ``platform``.

Both standard modules import another one at import time for something the CLI never uses:

- ``argparse`` imports ``gettext`` to translate its messages, which the CLI takes as
  written (``_common``); ``gettext``'s import compiles its plural-forms tokenizer (3.8 M
  instructions, ~1 % of a small ``send --from-sendshot``).
- ``uuid`` imports ``platform`` on Linux only to ask once whether the system is AIX;
  ``platform`` compiles nine regular expressions at import (8.6 M instructions, ~2.5 % of
  that send, ~5 ms of its start under load). It also loads ``_uuid`` (a C module linked
  with libuuid: two libraries loaded, ~0.3 ms) for ``uuid1``'s clock, which btrdelta never
  calls (its UUIDs are derived, parsed or ``uuid4``): ``uuid`` is imported with ``_uuid``
  absent (its own fallback, the pure-Python ``uuid1``, for any later caller).

Each is imported here with a stand-in in ``sys.modules`` that has just what the import
takes from the other module (``gettext.gettext`` and ``ngettext``: the message as written;
``platform.system()``: ``os.uname()``'s), and the stand-in is removed right after: an import
of ``gettext`` or ``platform`` later gets the real module. Where either module is imported
already, or where another thread runs (it could import the stand-in), nothing is stood in
for; where the import fails with the stand-in (a Python whose module takes more from the
other), both are imported for real. The CLI imports this module first (``uuid`` is
imported here then, before any other module of the CLI imports it); ``argparse`` only when
a parser is built (``_parser`` takes it from here): a command whose words
``_common.quick_parse`` reads builds none, and imports neither ``argparse`` nor ``re``.
"""

from __future__ import annotations

import os
import sys

from .. import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

__all__ = ["argparse", "uuid"]


def _message(message: str) -> str:
    return message


def _messages(singular: str, plural: str, n: int) -> str:
    return singular if n == 1 else plural


def _system() -> str:
    return os.uname().sysname


def _import_with(module: str, stand_in: str, functions: dict[str, Callable[..., str]],
                 absent: tuple[str, ...] = ()) -> None:
    """Import ``module`` with a module ``stand_in`` made of ``functions`` in
    ``sys.modules`` (unless either is imported already), and ``absent`` modules (those not
    imported yet) refused to it as if not installed; the stand-in and the refusals are
    removed after, the stand-in also from ``module``'s namespace if it bound it by name."""
    threading = sys.modules.get("threading")
    if module in sys.modules or stand_in in sys.modules or (
            threading is not None and threading.active_count() > 1):
        return  # (another thread could import the stand-in meanwhile: no stand-in then)
    fake = type(sys)(stand_in)
    vars(fake).update(functions)
    refused = [name for name in absent if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None  # type: ignore[assignment]  # ("import of ... halted")
    sys.modules[stand_in] = fake
    try:
        __import__(module)
    except Exception:
        # another Python's module wants more of the other one than the stand-in has:
        # import both for real
        sys.modules.pop(module, None)
        del sys.modules[stand_in]
        for name in refused:
            del sys.modules[name]
        refused = []
        __import__(module)
        return
    finally:
        if sys.modules.get(stand_in) is fake:
            del sys.modules[stand_in]
        for name in refused:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    namespace = vars(sys.modules[module])
    if namespace.get(stand_in) is fake:
        del namespace[stand_in]


_import_with("uuid", "platform", {"system": _system}, absent=("_uuid",))

import uuid  # noqa: E402  (imported above, with the stand-in)


def __getattr__(name: str) -> object:
    """``argparse``, imported (with its stand-in) when first asked for."""
    if name != "argparse":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_with("argparse", "gettext", {"gettext": _message, "ngettext": _messages})
    import argparse

    globals()["argparse"] = argparse
    return argparse
