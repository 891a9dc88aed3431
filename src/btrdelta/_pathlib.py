"""``pathlib`` imported without the modules it imports for what btrdelta never asks of it.

At import ``pathlib`` imports ``re`` and ``fnmatch`` (``glob`` and ``match`` compile
patterns with them), ``urllib.parse`` (``as_uri`` quotes with it; it imports ``ipaddress``),
``ntpath`` (Windows paths) and ``warnings`` (two deprecations): ~2.5 ms of the start of a
``btrdelta receive``, which uses none of them (``-X importtime``, session 20). The receive's
modules take paths as ``Path``, so :mod:`btrdelta.receive` imports this module first.

``pathlib`` is imported with a stand-in in ``sys.modules`` for each of those modules not
imported yet; the stand-ins leave ``sys.modules`` right after (a later import of any of
them gets the real module) but stay in ``pathlib``'s namespace, where each imports the real
module on first use: a module's stand-in when an attribute is first asked of it,
``urllib.parse``'s ``quote_from_bytes`` (the one name ``pathlib`` takes from it) when
called. Nothing is stood in for where ``pathlib`` is imported already or another thread
runs (it could import a stand-in meanwhile); where the import fails with the stand-ins (a
Python whose ``pathlib`` asks more of them at import), ``pathlib`` is imported for real.
"""

from __future__ import annotations

import sys
from types import ModuleType

from . import TYPE_CHECKING, _import_module

if TYPE_CHECKING:
    from typing import Any

__all__: list[str] = []

#: the modules ``pathlib`` imports whole and uses only in functions btrdelta does not call
_LATER = ("re", "fnmatch", "ntpath", "warnings")


class _Later(ModuleType):
    """Stands in for the module of its name: each attribute is taken from the module,
    imported when the first is asked for (by then the stand-in is out of ``sys.modules``)."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:  # asked during the import: fail it
            raise AttributeError(attr)
        return getattr(_import_module(self.__name__), attr)


def _quote_from_bytes(string: bytes, safe: str = "/") -> str:
    from urllib.parse import quote_from_bytes

    return quote_from_bytes(string, safe)


def _import() -> None:
    threading = sys.modules.get("threading")
    if "pathlib" in sys.modules or (threading is not None and threading.active_count() > 1):
        return
    stand_ins: dict[str, ModuleType] = {name: _Later(name) for name in _LATER
                                        if name not in sys.modules}
    if "urllib.parse" not in sys.modules:
        parse = ModuleType("urllib.parse")
        vars(parse)["quote_from_bytes"] = _quote_from_bytes
        stand_ins["urllib.parse"] = parse
    sys.modules.update(stand_ins)
    try:
        __import__("pathlib")
    except Exception:
        sys.modules.pop("pathlib", None)
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
    if "pathlib" not in sys.modules:
        __import__("pathlib")


_import()
