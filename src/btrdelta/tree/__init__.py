"""Trees: the tree checksum (also incrementally, after a stream applied to a hashed parent:
:mod:`.incremental`) and, for receive/delta, path models while a stream flows."""

from .treesum import Entry, diff_manifests, manifest_sum, tree_manifest, tree_sum

__all__ = ["Entry", "diff_manifests", "manifest_sum", "tree_manifest", "tree_sum"]
