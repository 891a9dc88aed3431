"""``zstandard`` for the start-up path: its C backend, imported without the package's
``__init__``.

On Python 3.11 ``import zstandard`` imports ``typing`` (for one alias) and ``platform`` (to
choose a backend); ``typing`` alone is ~12 M instructions (~3 %) of a small ``btrdelta send
--from-sendshot``, which otherwise imports no ``typing`` at all. ``zstd`` here is the module
``zstandard`` itself re-exports on CPython (``zstandard.backend_c``: the same classes and
``ZstdError``): loaded from the package's directory as ``zstandard.backend_c``, so a later
``import zstandard`` finds it and exports those same objects. Where that is not what
``import zstandard`` would do (another interpreter, ``PYTHON_ZSTANDARD_IMPORT_POLICY`` set,
no C backend), ``zstd`` is the package.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing)
if TYPE_CHECKING:
    import zstandard as zstd
else:
    def _backend_c() -> object:
        """``zstandard.backend_c`` loaded without ``zstandard/__init__.py``, or None."""
        name = "zstandard.backend_c"
        if name in sys.modules:
            return sys.modules[name]
        if sys.implementation.name != "cpython" or \
                os.environ.get("PYTHON_ZSTANDARD_IMPORT_POLICY", "default").strip() != "default":
            return None
        # (importlib.machinery's names from the import system's own modules: the package
        # ``importlib`` imports ``warnings``, ~0.45 ms of a command's start)
        from _frozen_importlib import ModuleSpec
        from _frozen_importlib_external import (
            EXTENSION_SUFFIXES,
            ExtensionFileLoader,
            PathFinder,
        )

        package = PathFinder.find_spec("zstandard")
        if package is None or not package.submodule_search_locations:
            return None
        for where in package.submodule_search_locations:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(where, "backend_c" + suffix)
                if os.path.isfile(path):
                    loader = ExtensionFileLoader(name, path)
                    spec = ModuleSpec(name, loader, origin=path)
                    spec.has_location = True
                    module = loader.create_module(spec)
                    module.__spec__, module.__loader__ = spec, loader
                    sys.modules[name] = module
                    try:
                        loader.exec_module(module)
                    except BaseException:
                        del sys.modules[name]
                        raise
                    return module
        return None

    zstd = _backend_c()
    if zstd is None:
        import zstandard as zstd

__all__ = ["zstd"]
