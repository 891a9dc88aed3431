"""Trees: the tree checksum (also incrementally, after a stream applied to a hashed parent:
:mod:`.incremental`) and, for receive/delta, path models while a stream flows.

The checksum's names load on first use: the sendshot record format (:mod:`.sendshot`) is
imported by every send against a record, which needs none of them.
"""

from __future__ import annotations

from .. import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from .treesum import Entry, diff_manifests, manifest_sum, tree_manifest, tree_sum

__all__ = ["Entry", "diff_manifests", "manifest_sum", "tree_manifest", "tree_sum"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import treesum

    return getattr(treesum, name)
